// CUDA forward kernel of masked_head_attention: flash attention (online softmax, fp32
// accumulation; fp64 for double) over the running (b, h) pairs only.
//
// Grid: one block per (running pair, block of BQ queries), flattened into blockIdx.x, so pairs
// that are off get no block at all. A block has W warps (W <= 4, fewer for short Tq), each warp
// owns kRows = 4 consecutive queries (BQ = 4 W). The block's queries (pre-scaled by `scale`) sit
// in shared memory in the accumulation type; K and V are streamed through shared memory in
// tiles of kBK = 32 keys (K rows padded to an odd stride, so the per-lane reads below are free
// of bank conflicts). Per tile, each warp:
//   scores:  lane j computes s[r] = q_r . k_j for its kRows queries (q broadcast from shared
//            memory), adds the additive mask, applies the causal bound (key j <= query i, top-left
//            aligned as in ATen) and the tile end;
//   softmax: running max m and sum l per query by warp shuffles; a row whose keys so far are all
//            masked keeps m = -inf and contributes exact zeros (no inf - inf);
//   P V:     lane e owns output dims e, e + 32, ... (DPL = ceil(D / 32) rounded up to 1, 2, 4 or 8,
//            a template parameter) and accumulates p_j * v_j with p_j broadcast by shuffle.
// Causal: key tiles after the block's last query are never loaded; warps skip tiles after their
// own last query. The output row is acc / l, written to `out` (times the pair's gate, rounded as
// the CPU op rounds: gate * T(o)) in the caller's layout, and un-gated to out_c when asked;
// lse = m + log(l) (-inf for a fully masked row, whose output is 0).
//
// Expected (not measured: no GPU on the machine this was written on): correct for every D in
// [1, 256], any Tq / Tk, all four dtypes; far from FlashAttention-2 speed since it uses CUDA
// cores (FMA), not tensor cores (mma), and decode (Tq = 1) runs one warp per pair with no split
// over keys. Its point is that work scales with the number of running pairs; for speed on
// H100 the next step is an mma-based tile (or calling ATen's flash kernel on the gathered pairs).
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "dtype.cuh"
#include "warp.cuh"
#include "heads_kernels.h"

namespace sparse_ops {
namespace cuda {
namespace {

constexpr int kBK = 32;        // keys per shared-memory tile: one per lane when scoring
constexpr int kRows = 4;       // queries per warp
constexpr int kMaxWarps = 4;   // warps per block
constexpr int kStaticSmem = 48 * 1024;

template <typename T, int DPL>
__global__ void __launch_bounds__(kMaxWarps * 32) heads_fwd_kernel(HeadsFwdArgs a, int64_t nqb) {
  using A = typename Acc<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  const A ninf = A(-INFINITY);
  const int D = int(a.D), Dk = D | 1;  // odd K-row stride: lane j reads Ks[j * Dk + d] without conflicts
  const int warps = int(blockDim.x >> 5), warp = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31);
  const int BQ = warps * kRows;
  A* Ks = reinterpret_cast<A*>(smem);  // [kBK][Dk]
  A* Vs = Ks + kBK * Dk;                // [kBK][D]
  A* Qs = Vs + kBK * D;                 // [BQ][D]

  const int64_t p = int64_t(blockIdx.x) / nqb;
  const int64_t q0 = (int64_t(blockIdx.x) % nqb) * BQ;
  const int64_t pair = a.pairs[p], b = pair / a.H, h = pair % a.H;
  const int64_t Tq = a.Tq, Tk = a.Tk;
  const T* q = static_cast<const T*>(a.q) + b * a.q_s0 + h * a.q_s1;
  const T* k = static_cast<const T*>(a.k) + b * a.k_s0 + h * a.k_s1;
  const T* v = static_cast<const T*>(a.v) + b * a.v_s0 + h * a.v_s1;
  const T* mask = a.mask ? static_cast<const T*>(a.mask) + p * a.mask_sp : nullptr;
  const A scale = A(a.scale);

  for (int e = threadIdx.x; e < BQ * D; e += blockDim.x) {
    const int r = e / D, d = e - r * D;
    const int64_t i = q0 + r;
    Qs[e] = i < Tq ? to_acc(q[i * a.q_s2 + d]) * scale : A(0);
  }
  // (The first tile's __syncthreads orders these writes before any read.)

  A m[kRows], l[kRows], acc[kRows][DPL];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = ninf;
    l[r] = A(0);
#pragma unroll
    for (int c = 0; c < DPL; ++c) acc[r][c] = A(0);
  }
  const int64_t row0 = q0 + int64_t(warp) * kRows;  // this warp's first query
  const int64_t kend = a.causal ? (Tk < q0 + BQ ? Tk : q0 + BQ) : Tk;
  const A* Qw = Qs + warp * kRows * D;

  for (int64_t k0 = 0; k0 < kend; k0 += kBK) {
    __syncthreads();  // the previous tile has been consumed by every warp
    const int nk = int(Tk - k0 < kBK ? Tk - k0 : kBK);
    for (int e = threadIdx.x; e < kBK * D; e += blockDim.x) {
      const int j = e / D, d = e - j * D;
      A kv = A(0), vv = A(0);
      if (j < nk) {
        kv = to_acc(k[(k0 + j) * a.k_s2 + d]);
        vv = to_acc(v[(k0 + j) * a.v_s2 + d]);
      }
      Ks[j * Dk + d] = kv;
      Vs[j * D + d] = vv;
    }
    __syncthreads();
    // Warp-uniform skips (the warp still joins every __syncthreads above).
    if (row0 >= Tq) continue;
    if (a.causal && k0 > row0 + kRows - 1) continue;

    // Scores: lane = key k0 + lane.
    A s[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) s[r] = A(0);
    const A* kr = Ks + lane * Dk;
    for (int d = 0; d < D; ++d) {
      const A kd = kr[d];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] += Qw[r * D + d] * kd;
    }
    const int64_t j = k0 + lane;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = row0 + r;
      A sv = ninf;
      if (lane < nk && i < Tq && (!a.causal || j <= i)) {
        sv = s[r];
        if (mask) sv += to_acc(mask[i * a.mask_sr + j]);
      }
      const A mt = warp_max(sv);
      const A m_new = mt > m[r] ? mt : m[r];
      const A m_use = m_new == ninf ? A(0) : m_new;  // all masked so far: exp(-inf - 0) = 0
      const A pr = exp(sv - m_use);
      const A corr = exp(m[r] - m_use);
      l[r] = l[r] * corr + warp_sum(pr);
      m[r] = m_new;
      s[r] = pr;
#pragma unroll
      for (int c = 0; c < DPL; ++c) acc[r][c] *= corr;
    }
    // P V: lane owns dims lane + 32 c.
    for (int jj = 0; jj < nk; ++jj) {
      A pj[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) pj[r] = __shfl_sync(0xffffffffu, s[r], jj);
      const A* vr = Vs + jj * D;
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        const int d = lane + 32 * c;
        if (d < D) {
          const A vv = vr[d];
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r][c] += pj[r] * vv;
        }
      }
    }
  }

  if (row0 >= Tq) return;
  A* lse = static_cast<A*>(a.lse) + p * Tq;
  T* out = a.out ? static_cast<T*>(a.out) + b * a.o_s0 + h * a.o_s1 : nullptr;
  T* out_c = a.out_c ? static_cast<T*>(a.out_c) + p * Tq * D : nullptr;
  const A g = a.gate ? to_acc(static_cast<const T*>(a.gate)[p]) : A(1);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = row0 + r;
    if (i >= Tq) break;
    const bool any = l[r] > A(0);
    const A inv = any ? A(1) / l[r] : A(0);
    if (lane == 0) lse[i] = any ? m[r] + log(l[r]) : ninf;
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + 32 * c;
      if (d >= D) continue;
      const T o = from_acc<T>(acc[r][c] * inv);
      if (out_c) out_c[i * D + d] = o;
      if (out) out[i * a.o_s2 + d] = a.gate ? from_acc<T>(to_acc(o) * g) : o;
    }
  }
}

template <typename T, int DPL>
cudaError_t launch_fwd(const HeadsFwdArgs& a, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (optin < kStaticSmem) optin = kStaticSmem;
  const int64_t D = a.D, Dk = D | 1;
  const auto bytes = [&](int w) { return size_t(kBK * Dk + kBK * D + int64_t(w) * kRows * D) * sizeof(A); };
  int warps = int((a.Tq + kRows - 1) / kRows);
  if (warps > kMaxWarps) warps = kMaxWarps;
  if (warps < 1) warps = 1;
  while (warps > 1 && bytes(warps) > size_t(optin)) --warps;
  const size_t smem = bytes(warps);
  if (smem > size_t(optin)) return cudaErrorInvalidConfiguration;  // double with D near 256 on small-smem GPUs
  if (smem > size_t(kStaticSmem)) {
    err = cudaFuncSetAttribute(heads_fwd_kernel<T, DPL>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t BQ = int64_t(warps) * kRows, nqb = (a.Tq + BQ - 1) / BQ, blocks = a.P * nqb;
  if (blocks > int64_t(INT_MAX)) return cudaErrorInvalidConfiguration;
  heads_fwd_kernel<T, DPL><<<dim3(unsigned(blocks)), warps * 32, smem, stream>>>(a, nqb);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_typed(const HeadsFwdArgs& a, cudaStream_t stream) {
  if (a.D <= 32) return launch_fwd<T, 1>(a, stream);
  if (a.D <= 64) return launch_fwd<T, 2>(a, stream);
  if (a.D <= 128) return launch_fwd<T, 4>(a, stream);
  return launch_fwd<T, 8>(a, stream);
}

}  // namespace

cudaError_t masked_head_attention_fwd(const HeadsFwdArgs& a, cudaStream_t stream) {
  if (a.D < 1 || a.D > kHeadsMaxD) return cudaErrorInvalidValue;
  if (a.P == 0 || a.Tq == 0) return cudaSuccess;
  if (a.Tk == 0) return cudaErrorInvalidValue;
  return dispatch(a.dtype, [&](auto t) { return fwd_typed<typename decltype(t)::type>(a, stream); });
}

}  // namespace cuda
}  // namespace sparse_ops
