// The element types of the CUDA kernels as the launchers name them (plain C++: no CUDA or
// torch headers). Device-side traits and the type dispatch are in dtype.cuh; the mapping from
// a torch dtype is launch.h's dtype_of.
#pragma once

namespace sparse_ops {
namespace cuda {

enum class DType { F32, F64, F16, BF16 };

}  // namespace cuda
}  // namespace sparse_ops
