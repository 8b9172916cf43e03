// CUDA kernels of the row ops behind skip_layer: one block per kept row, grid-stride over
// the row's elements; 16-byte vector copies for gather when rows are 16-byte aligned.
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.cuh"
#include "rows_kernels.h"

namespace sparse_ops {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ x, const int64_t* __restrict__ idx, V* __restrict__ out,
                                   int64_t row) {
  const int64_t k = blockIdx.x;
  const int64_t i = idx[k];
  V* o = out + k * row;
  if (i < 0) {
    for (int64_t e = threadIdx.x; e < row; e += blockDim.x) o[e] = V{};
    return;
  }
  const V* s = x + i * row;
  for (int64_t e = threadIdx.x; e < row; e += blockDim.x) o[e] = s[e];
}

template <typename T>
__global__ void scatter_rows_kernel(const T* __restrict__ x, const T* __restrict__ src, const T* __restrict__ gate,
                                    const int64_t* __restrict__ idx, T* __restrict__ y, int64_t row) {
  using A = typename Acc<T>::type;
  const int64_t k = blockIdx.x;
  const int64_t i = idx[k];
  if (i < 0) return;
  const T* s = src + k * row;
  T* yo = y + i * row;
  if (!gate) {
    for (int64_t e = threadIdx.x; e < row; e += blockDim.x) yo[e] = s[e];
    return;
  }
  const T* xi = x + i * row;
  const A g = to_acc(gate[k]);
  for (int64_t e = threadIdx.x; e < row; e += blockDim.x) {
    const A xv = to_acc(xi[e]);
    yo[e] = from_acc<T>(xv + g * (to_acc(s[e]) - xv));
  }
}

template <typename T>
__global__ void scatter_rows_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                             const T* __restrict__ src, const T* __restrict__ gate,
                                             const int64_t* __restrict__ idx, T* __restrict__ dx,
                                             T* __restrict__ dsrc, T* __restrict__ dgate, int64_t row) {
  using A = typename Acc<T>::type;
  __shared__ A partial[kThreads];
  const int64_t k = blockIdx.x;
  const int64_t i = idx[k];
  if (i < 0) {  // padding row: no gradient
    if (dsrc)
      for (int64_t e = threadIdx.x; e < row; e += blockDim.x) dsrc[k * row + e] = from_acc<T>(A(0));
    if (dgate && threadIdx.x == 0) dgate[k] = from_acc<T>(A(0));
    return;
  }
  const T* gi = grad + i * row;
  const A g = gate ? to_acc(gate[k]) : A(1);
  A acc = 0;
  for (int64_t e = threadIdx.x; e < row; e += blockDim.x) {
    const A gv = to_acc(gi[e]);
    if (dx) dx[i * row + e] = from_acc<T>(gv * (A(1) - g));
    if (dsrc) dsrc[k * row + e] = from_acc<T>(gv * g);
    if (dgate) acc += (to_acc(src[k * row + e]) - to_acc(x[i * row + e])) * gv;
  }
  if (!dgate) return;
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) dgate[k] = from_acc<T>(partial[0]);
}

// Grid: one block per row; gridDim.x is limited to 2^31-1, far above any batch of rows.
template <typename T>
cudaError_t scatter_typed(const void* x, const void* src, const void* gate, const int64_t* idx, void* y,
                          int64_t K, int64_t row, cudaStream_t stream) {
  scatter_rows_kernel<T><<<dim3(unsigned(K)), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(src), static_cast<const T*>(gate), idx,
      static_cast<T*>(y), row);
  return cudaGetLastError();
}

template <typename T>
cudaError_t scatter_backward_typed(const void* grad, const void* x, const void* src, const void* gate,
                                   const int64_t* idx, void* dx, void* dsrc, void* dgate, int64_t K, int64_t row,
                                   cudaStream_t stream) {
  scatter_rows_backward_kernel<T><<<dim3(unsigned(K)), kThreads, 0, stream>>>(
      static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<const T*>(src),
      static_cast<const T*>(gate), idx, static_cast<T*>(dx), static_cast<T*>(dsrc), static_cast<T*>(dgate), row);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gather_rows(const void* x, const int64_t* idx, void* out, int64_t K, int64_t row_bytes,
                        cudaStream_t stream) {
  if (K == 0 || row_bytes == 0) return cudaSuccess;
  const auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  if (row_bytes % 16 == 0 && aligned(x) && aligned(out)) {
    gather_rows_kernel<uint4><<<dim3(unsigned(K)), kThreads, 0, stream>>>(
        static_cast<const uint4*>(x), idx, static_cast<uint4*>(out), row_bytes / 16);
  } else if (row_bytes % 4 == 0 && (reinterpret_cast<uintptr_t>(x) & 3) == 0 &&
             (reinterpret_cast<uintptr_t>(out) & 3) == 0) {
    gather_rows_kernel<uint32_t><<<dim3(unsigned(K)), kThreads, 0, stream>>>(
        static_cast<const uint32_t*>(x), idx, static_cast<uint32_t*>(out), row_bytes / 4);
  } else {
    gather_rows_kernel<uint8_t><<<dim3(unsigned(K)), kThreads, 0, stream>>>(
        static_cast<const uint8_t*>(x), idx, static_cast<uint8_t*>(out), row_bytes);
  }
  return cudaGetLastError();
}

cudaError_t scatter_rows(DType dt, const void* x, const void* src, const void* gate, const int64_t* idx,
                         void* y, int64_t K, int64_t row, cudaStream_t stream) {
  if (K == 0 || row == 0) return cudaSuccess;
  return dispatch(dt, [&](auto t) {
    return scatter_typed<typename decltype(t)::type>(x, src, gate, idx, y, K, row, stream);
  });
}

cudaError_t scatter_rows_backward(DType dt, const void* grad, const void* x, const void* src,
                                  const void* gate, const int64_t* idx, void* dx, void* dsrc, void* dgate,
                                  int64_t K, int64_t row, cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  return dispatch(dt, [&](auto t) {
    return scatter_backward_typed<typename decltype(t)::type>(grad, x, src, gate, idx, dx, dsrc, dgate, K, row,
                                                              stream);
  });
}

}  // namespace cuda
}  // namespace sparse_ops
