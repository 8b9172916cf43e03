// CUDA kernels of gated_ffn: the decode gather-GEMV and the weight-gradient scatter.
//
// Decode (N <= 16 rows): a block owns kCols active columns. Phase 1: each warp takes a
// column j, streams row j of w1 (and w3) once with coalesced loads, accumulates all N rows'
// dot products in registers, reduces them with shuffles, and applies bias, activation, GLU
// product, gate and the per-row mask; the gated hidden goes to shared memory (and pre/up/hg
// to global memory for backward). Phase 2 (w2 transposed [F, d]): the block's threads sweep
// d, reading rows j of w2t (coalesced) and accumulating sum_c h[n, c] * w2t[j_c, e] in
// registers, then one atomicAdd per (n, e) per block into a float accumulator: split over
// columns, as Deja Vu and TEAL do for their down-projection. Only active weight rows are
// ever read. With w2 in nn.Linear layout [d, F], a warp per output row gathers the active
// entries of that row of w2 (ffn_decode_down_cols_kernel).
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.cuh"
#include "warp.cuh"
#include "ffn_kernels.h"

namespace sparse_ops {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kCols = 32;  // active columns per block
constexpr int kMaxRows = kFfnDecodeMaxRows;
constexpr int kVec = 4;    // output elements per thread per sweep in phase 2

template <typename A>
__device__ __forceinline__ A activation(A v, FfnAct act) {
  switch (act) {
    case FfnAct::Gelu: return A(0.5) * v * (A(1) + erf(v * A(0.7071067811865476)));
    case FfnAct::GeluTanh: {
      const A u = A(0.7978845608028654) * (v + A(0.044715) * v * v * v);
      return A(0.5) * v * (A(1) + tanh(u));
    }
    case FfnAct::Relu: return v > A(0) ? v : A(0);
    case FfnAct::Silu: return v / (A(1) + exp(-v));
    case FfnAct::Identity: return v;
  }
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ffn_decode_kernel(FfnDecodeArgs a) {
  using A = typename Acc<T>::type;
  __shared__ A h_s[kMaxRows][kCols];
  const T* x = static_cast<const T*>(a.x);
  const T* w1 = static_cast<const T*>(a.w1);
  const T* w3 = static_cast<const T*>(a.w3);
  const T* b1 = static_cast<const T*>(a.b1);
  const T* gate = static_cast<const T*>(a.gate);
  T* pre = static_cast<T*>(a.pre);
  T* up = static_cast<T*>(a.up);
  T* hg = static_cast<T*>(a.hg);
  const int64_t N = a.N, d = a.d, K = a.K;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k0 = int64_t(blockIdx.x) * kCols;
  const int kc = int(K - k0 < kCols ? K - k0 : kCols);

  for (int c = warp; c < kc; c += kWarps) {
    const int64_t k = k0 + c;
    const int64_t j = a.idx[k];
    const T* w1j = w1 + j * d;
    const T* w3j = w3 ? w3 + j * d : nullptr;
    A s1[kMaxRows], s3[kMaxRows];
#pragma unroll
    for (int n = 0; n < kMaxRows; ++n) s1[n] = s3[n] = A(0);
    for (int64_t e = lane; e < d; e += 32) {
      const A w = to_acc(w1j[e]);
      const A w3v = w3j ? to_acc(w3j[e]) : A(0);
#pragma unroll
      for (int n = 0; n < kMaxRows; ++n) {
        if (n < N) {
          const A xv = to_acc(x[n * d + e]);
          s1[n] += w * xv;
          if (w3j) s3[n] += w3v * xv;
        }
      }
    }
#pragma unroll
    for (int n = 0; n < kMaxRows; ++n) {
      if (n < N) {
        const A p = warp_sum(s1[n]) + (b1 ? to_acc(b1[j]) : A(0));
        const A u = w3j ? warp_sum(s3[n]) : A(0);
        if (lane == 0) {
          const bool run = !a.row_mask || a.row_mask[n * K + k];
          A h = activation(p, a.act);
          if (w3j) h *= u;
          if (gate) h *= to_acc(gate[(a.gate_per_row ? n * a.F : 0) + j]);
          pre[n * K + k] = from_acc<T>(run ? p : A(0));
          if (w3j) up[n * K + k] = from_acc<T>(run ? u : A(0));
          h = run ? h : A(0);
          hg[n * K + k] = from_acc<T>(h);
          h_s[n][c] = h;
        }
      }
    }
  }
  if (!a.w2_transposed) return;
  __syncthreads();
  const T* w2t = static_cast<const T*>(a.w2);
  A* out = static_cast<A*>(a.out_acc);
  for (int64_t e0 = 0; e0 < d; e0 += int64_t(kThreads) * kVec) {
    A acc[kMaxRows][kVec];
#pragma unroll
    for (int n = 0; n < kMaxRows; ++n)
#pragma unroll
      for (int v = 0; v < kVec; ++v) acc[n][v] = A(0);
    for (int c = 0; c < kc; ++c) {
      const T* row = w2t + a.idx[k0 + c] * d;
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const int64_t e = e0 + int64_t(v) * kThreads + threadIdx.x;
        if (e < d) {
          const A w = to_acc(row[e]);
#pragma unroll
          for (int n = 0; n < kMaxRows; ++n)
            if (n < N) acc[n][v] += h_s[n][c] * w;
        }
      }
    }
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const int64_t e = e0 + int64_t(v) * kThreads + threadIdx.x;
      if (e < d) {
#pragma unroll
        for (int n = 0; n < kMaxRows; ++n)
          if (n < N) atomicAdd(out + n * d + e, acc[n][v]);
      }
    }
  }
}

// w2 [d, F]: one warp per output row i; out_acc[n, i] = sum_k w2[i, idx[k]] * hg[n, k].
template <typename T>
__global__ void __launch_bounds__(kThreads) ffn_decode_down_cols_kernel(FfnDecodeArgs a) {
  using A = typename Acc<T>::type;
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= a.d) return;
  const T* w2i = static_cast<const T*>(a.w2) + i * a.F;
  const T* hg = static_cast<const T*>(a.hg);
  A s[kMaxRows];
#pragma unroll
  for (int n = 0; n < kMaxRows; ++n) s[n] = A(0);
  for (int64_t k = lane; k < a.K; k += 32) {
    const A w = to_acc(w2i[a.idx[k]]);
#pragma unroll
    for (int n = 0; n < kMaxRows; ++n)
      if (n < a.N) s[n] += w * to_acc(hg[n * a.K + k]);
  }
  A* out = static_cast<A*>(a.out_acc);
#pragma unroll
  for (int n = 0; n < kMaxRows; ++n) {
    if (n < a.N) {
      const A t = warp_sum(s[n]);
      if (lane == 0) out[n * a.d + i] = t;
    }
  }
}

// Element copies by size: the scatter does not look at values.
template <typename E>
__global__ void scatter_rows_kernel(const E* __restrict__ src, const int64_t* __restrict__ idx, E* __restrict__ dst,
                                    int64_t C) {
  const int64_t k = blockIdx.x;
  const E* s = src + k * C;
  E* o = dst + idx[k] * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) o[c] = s[c];
}

template <typename E>
__global__ void scatter_cols_kernel(const E* __restrict__ src, const int64_t* __restrict__ idx, E* __restrict__ dst,
                                    int64_t K, int64_t C, int64_t R) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= K * C) return;
  const int64_t r = t / K, k = t % K;  // consecutive threads read consecutive src entries
  dst[r * R + idx[k]] = src[r * K + k];
}

template <typename T>
cudaError_t decode_typed(const FfnDecodeArgs& a, cudaStream_t stream) {
  const unsigned blocks = unsigned((a.K + kCols - 1) / kCols);
  ffn_decode_kernel<T><<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t down_cols_typed(const FfnDecodeArgs& a, cudaStream_t stream) {
  const unsigned blocks = unsigned((a.d + kWarps - 1) / kWarps);
  ffn_decode_down_cols_kernel<T><<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

int elem_size(DType dt) {
  switch (dt) {
    case DType::F64: return 8;
    case DType::F32: return 4;
    default: return 2;
  }
}

}  // namespace

cudaError_t ffn_decode(const FfnDecodeArgs& a, cudaStream_t stream) {
  if (a.N <= 0 || a.K <= 0) return cudaSuccess;
  if (a.N > kMaxRows) return cudaErrorInvalidValue;
  return dispatch(a.dtype, [&](auto t) { return decode_typed<typename decltype(t)::type>(a, stream); });
}

cudaError_t ffn_decode_down_cols(const FfnDecodeArgs& a, cudaStream_t stream) {
  if (a.N <= 0 || a.d <= 0) return cudaSuccess;
  if (a.N > kMaxRows) return cudaErrorInvalidValue;
  return dispatch(a.dtype, [&](auto t) { return down_cols_typed<typename decltype(t)::type>(a, stream); });
}

cudaError_t scatter_rows_by_idx(DType dt, const void* src, const int64_t* idx, void* dst, int64_t K, int64_t C,
                                cudaStream_t stream) {
  if (K == 0 || C == 0) return cudaSuccess;
  switch (elem_size(dt)) {
    case 8: scatter_rows_kernel<uint64_t><<<unsigned(K), 256, 0, stream>>>(
                static_cast<const uint64_t*>(src), idx, static_cast<uint64_t*>(dst), C); break;
    case 4: scatter_rows_kernel<uint32_t><<<unsigned(K), 256, 0, stream>>>(
                static_cast<const uint32_t*>(src), idx, static_cast<uint32_t*>(dst), C); break;
    default: scatter_rows_kernel<uint16_t><<<unsigned(K), 256, 0, stream>>>(
                static_cast<const uint16_t*>(src), idx, static_cast<uint16_t*>(dst), C); break;
  }
  return cudaGetLastError();
}

cudaError_t scatter_cols_by_idx(DType dt, const void* src, const int64_t* idx, void* dst, int64_t K, int64_t C,
                                int64_t R, cudaStream_t stream) {
  if (K == 0 || C == 0) return cudaSuccess;
  const unsigned blocks = unsigned((K * C + 255) / 256);
  switch (elem_size(dt)) {
    case 8: scatter_cols_kernel<uint64_t><<<blocks, 256, 0, stream>>>(
                static_cast<const uint64_t*>(src), idx, static_cast<uint64_t*>(dst), K, C, R); break;
    case 4: scatter_cols_kernel<uint32_t><<<blocks, 256, 0, stream>>>(
                static_cast<const uint32_t*>(src), idx, static_cast<uint32_t*>(dst), K, C, R); break;
    default: scatter_cols_kernel<uint16_t><<<blocks, 256, 0, stream>>>(
                static_cast<const uint16_t*>(src), idx, static_cast<uint16_t*>(dst), K, C, R); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparse_ops
