// ATen-side helpers shared by the CUDA launchers (ffn_cuda.cpp, heads_cuda.cpp, rows_cuda.cpp):
// a tensor's element type as the kernels name it, and the check of a kernel launch's status.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "dtype.h"

namespace sparse_ops {
namespace cuda {

// t's dtype as a DType; anything but the four float types is an error naming op.
inline DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(),
                         " on CUDA (float32, float64, float16, bfloat16)");
  }
}

// err (a launcher's cudaError_t) is cudaSuccess, else an error naming op and the kernel.
inline void check_launch(cudaError_t err, const char* op, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel ", kernel, " failed: ", cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace sparse_ops
