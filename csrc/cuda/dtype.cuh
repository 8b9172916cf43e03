// Element types of the CUDA kernels: float, double, half and bfloat16, with the type they
// accumulate in (float; double for double) and conversions. Plain CUDA, no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "dtype.h"

namespace sparse_ops {
namespace cuda {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type to_acc(T v) { return float(v); }
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ double to_acc<double>(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return T(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// A type carried as a value, for the generic lambdas given to dispatch.
template <typename T> struct TypeTag { using type = T; };

// fn(TypeTag<T>{}) with T the element type dt names (float, double, __half, __nv_bfloat16):
//   dispatch(dt, [&](auto tag) { return launch<typename decltype(tag)::type>(...); });
template <typename Fn>
cudaError_t dispatch(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::F32: return fn(TypeTag<float>{});
    case DType::F64: return fn(TypeTag<double>{});
    case DType::F16: return fn(TypeTag<__half>{});
    case DType::BF16: return fn(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparse_ops
