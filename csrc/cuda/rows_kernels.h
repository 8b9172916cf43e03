// Plain-CUDA kernels of the row ops behind skip_layer (no torch headers, so nvcc compiles
// them without a CUDA build of torch; the ATen launcher is rows_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace sparse_ops {
namespace cuda {

// out[k] = x[idx[k]] (zeros where idx[k] < 0); rows of row_bytes bytes.
cudaError_t gather_rows(const void* x, const int64_t* idx, void* out, int64_t K, int64_t row_bytes,
                        cudaStream_t stream);

// y (already a copy of x): y[idx[k]] = src[k], or x + gate[k] * (src[k] - x) with a gate.
cudaError_t scatter_rows(DType dt, const void* x, const void* src, const void* gate, const int64_t* idx,
                         void* y, int64_t K, int64_t row, cudaStream_t stream);

// dx (already a copy of grad, or null), dsrc [K, row] (or null), dgate [K] (or null).
cudaError_t scatter_rows_backward(DType dt, const void* grad, const void* x, const void* src,
                                  const void* gate, const int64_t* idx, void* dx, void* dsrc, void* dgate,
                                  int64_t K, int64_t row, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparse_ops
