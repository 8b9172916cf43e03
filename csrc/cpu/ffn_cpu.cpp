// CPU implementation of gated_ffn.
//
// Few rows (decode, N <= kDecodeMaxRows, float/double): a fused gather-GEMV. For every
// column j that runs for some row it reads row j of w1 (and w3) once, computes the
// rows' dot products, the activation and gate, and - with w2 transposed to [F, d] -
// adds h[n, j] * w2t[j, :] into a per-thread accumulator: only active weight rows are
// ever read and nothing is copied. With w2 in nn.Linear layout [d, F] the down-projection
// gathers the active entries of each row of w2 (see forward_decode); their cache lines
// cover most of w2, which bounds that layout's decode speedup at about 2 / (1 + keep).
// Inner loops are `omp simd` and compiled for AVX-512, AVX2+FMA and baseline x86-64
// (target_clones picks at load time).
//
// Many rows: the gathered-GEMM path of csrc/ffn_compute.cpp (BLAS on the compact weights).
// Backward: csrc/ffn_compute.cpp on the compact weights; the gradients are written into
// full-size ones here (scatter_into_zeros).
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../ffn_compute.h"
#include "../ffn_plan.h"
#include "vectorize.h"

namespace sparse_ops {
namespace ffn {
namespace {

// Rolling prefetch: every 64 bytes a kernel steps along its weight rows, it asks for the same
// line of the rows the next piece of work reads (`next`: null pointers ask for nothing). Their
// lines are requested spread over the current work, a few in flight at a time, one step of
// work ahead, instead of a burst of a whole row's 48 line requests that overflows the miss
// queue (measured below, kColGroup).
template <typename T, int R>
SPARSE_OPS_INLINE void prefetch_lines(const T* const* next, int64_t i, int64_t lines) {
  if (!next) return;
  for (int r = 0; r < R; ++r)
    if (next[r])
      for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(next[r] + i + l * int64_t(64 / sizeof(T)), 0, 3);
}

// Dot product with kLanes independent partial sums, so the FMA latency is hidden
// (one accumulator vector is latency-bound at 4 cycles per FMA).
template <typename T>
SPARSE_OPS_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n, const T* next = nullptr) {
  constexpr int64_t kLanes = 64 / sizeof(T) * 4;  // four 64-byte vectors of partial sums
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    if (next) prefetch_lines<T, 1>(&next, i, 4);
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  T s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
#pragma omp simd reduction(+ : s)
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// Four rows against one weight row: the weight row is loaded once for all four
// (register blocking), which is what keeps N = 4..16 from being load-bound.
template <typename T>
SPARSE_OPS_INLINE void dot4(const T* __restrict w, const T* __restrict x, int64_t n, T* out, const T* next) {
  constexpr int64_t kLanes = 64 / sizeof(T) * 2;
  T a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  const T *x0 = x, *x1 = x + n, *x2 = x + 2 * n, *x3 = x + 3 * n;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    if (next) prefetch_lines<T, 1>(&next, i, 2);
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const T wv = w[i + l];
      a0[l] += wv * x0[i + l];
      a1[l] += wv * x1[i + l];
      a2[l] += wv * x2[i + l];
      a3[l] += wv * x3[i + l];
    }
  }
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (; i < n; ++i) {
    s0 += w[i] * x0[i]; s1 += w[i] * x1[i]; s2 += w[i] * x2[i]; s3 += w[i] * x3[i];
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    s0 += a0[l]; s1 += a1[l]; s2 += a2[l]; s3 += a3[l];
  }
  out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

// y[r] += h[r] * w for four rows r of y (stride n).
template <typename T>
SPARSE_OPS_INLINE void axpy4(const T* h, const T* __restrict w, T* __restrict y, int64_t n, const T* next) {
  constexpr int64_t kStep = 64 / sizeof(T);
  T* y0 = y; T* y1 = y + n; T* y2 = y + 2 * n; T* y3 = y + 3 * n;
  const T h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3];
  for (int64_t i0 = 0; i0 < n; i0 += kStep) {
    if (next && i0 + kStep <= n) prefetch_lines<T, 1>(&next, i0, 1);
    const int64_t i1 = std::min(n, i0 + kStep);
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const T wv = w[i];
      y0[i] += h0 * wv; y1[i] += h1 * wv; y2[i] += h2 * wv; y3[i] += h3 * wv;
    }
  }
}

template <typename T>
SPARSE_OPS_INLINE void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n, const T* next = nullptr) {
  constexpr int64_t kStep = 64 / sizeof(T);
  for (int64_t i0 = 0; i0 < n; i0 += kStep) {
    if (next && i0 + kStep <= n) prefetch_lines<T, 1>(&next, i0, 1);
    const int64_t i1 = std::min(n, i0 + kStep);
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) y[i] += alpha * x[i];
  }
}

// One input row against four weight rows: four independent memory streams.
template <typename T>
SPARSE_OPS_INLINE void dot_rows4(const T* __restrict x, const T* const* w, int64_t n, T* out,
                                 const T* const* next) {
  constexpr int64_t kLanes = 64 / sizeof(T);  // one cache line of each row per step
  T a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  const T *__restrict w0 = w[0], *__restrict w1 = w[1], *__restrict w2 = w[2], *__restrict w3 = w[3];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch_lines<T, 4>(next, i, 1);
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const T xv = x[i + l];
      a0[l] += w0[i + l] * xv;
      a1[l] += w1[i + l] * xv;
      a2[l] += w2[i + l] * xv;
      a3[l] += w3[i + l] * xv;
    }
  }
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (; i < n; ++i) {
    s0 += w0[i] * x[i]; s1 += w1[i] * x[i]; s2 += w2[i] * x[i]; s3 += w3[i] * x[i];
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    s0 += a0[l]; s1 += a1[l]; s2 += a2[l]; s3 += a3[l];
  }
  out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

// y += h[0] w[0] + h[1] w[1] + h[2] w[2] + h[3] w[3]: four weight rows, one pass over y.
template <typename T>
SPARSE_OPS_INLINE void axpy_rows4(const T* h, const T* const* w, T* __restrict y, int64_t n,
                                  const T* const* next) {
  constexpr int64_t kStep = 64 / sizeof(T);
  const T h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3];
  const T *__restrict w0 = w[0], *__restrict w1 = w[1], *__restrict w2 = w[2], *__restrict w3 = w[3];
  for (int64_t i0 = 0; i0 < n; i0 += kStep) {
    if (i0 + kStep <= n) prefetch_lines<T, 4>(next, i0, 1);
    const int64_t i1 = std::min(n, i0 + kStep);
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) y[i] += h0 * w0[i] + h1 * w1[i] + h2 * w2[i] + h3 * w3[i];
  }
}

template <typename T>
inline T act_scalar(T v, Act act) {
  switch (act) {
    case Act::Gelu: return T(0.5) * v * (T(1) + std::erf(v * T(M_SQRT1_2)));
    case Act::GeluTanh: {
      const T k = T(0.7978845608028654);  // sqrt(2 / pi)
      return T(0.5) * v * (T(1) + std::tanh(k * (v + T(0.044715) * v * v * v)));
    }
    case Act::Relu: return v > T(0) ? v : T(0);
    case Act::Silu: return v / (T(1) + std::exp(-v));
    case Act::Identity: return v;
  }
  return v;
}

// Pointers and sizes of one decode call.
template <typename T>
struct DecodeArgs {
  const T* x; const T* w1; const T* w3; const T* w2; const T* b1;
  const int64_t* idx; const bool* row_mask; const T* gate; bool gate_per_row;
  T* pre; T* up; T* hg; T* acc;  // acc: this thread's [N, d] accumulator (w2 transposed)
  int64_t N, d, F, K;
  bool w2_transposed;
  Act act;
};

// Columns are taken four at a time. Rows without a tile of four (all of them at N=1) compute
// one input row against the group's four weight rows (dot_rows4) and add four weight rows into
// their accumulator in one pass (axpy_rows4): four scattered rows read side by side are four
// memory streams in flight. Tiles of four rows keep their register blocking over one weight
// row (dot4, axpy4). Every kernel asks, line by line as it goes, for the rows of the column
// kColGroup ahead (the rolling prefetch, prefetch_lines): the same position in the next group.
// A plain read of the active rows (keep 0.25) of two [3072, 768] fp32 matrices, 2 threads, 16
// weight sets cycled so every read comes from DRAM (GB/s): one row at a time, whole rows
// prefetched 2 ahead 9.6-10.6; four side by side, the next four whole rows prefetched at the
// group's start 9.7-12.0; four side by side with the rolling prefetch 15.3-16.3; a sequential
// read of both matrices 17.6-19.9. (The kernel before column groups asked for whole rows 2
// columns ahead, into L2: 2.96x over dense at N=4 keep 0.5 against 1.99x without prefetch.)
constexpr int64_t kColGroup = 4;
constexpr int64_t kPhaseBlock = 64;

// Rows of weight matrix w (row length d) of the columns [k, k + nc); a group of fewer than
// four repeats its last row (those results are not used; the row is already in L1).
template <typename T>
SPARSE_OPS_INLINE void group_rows(const T* w, const int64_t* idx, int64_t k, int64_t nc, int64_t d, const T** rows) {
  for (int64_t c = 0; c < kColGroup; ++c) rows[c] = w + idx[k + std::min(c, nc - 1)] * d;
}

// Hidden value of row n, column k (position o = n * K + k): bias, activation, w3 product, gate.
template <typename T>
SPARSE_OPS_INLINE void hidden_epilogue(const DecodeArgs<T>& A, int64_t n, int64_t k, T p, const T* u) {
  const int64_t o = n * A.K + k, j = A.idx[k];
  p += A.b1 ? A.b1[j] : T(0);
  A.pre[o] = p;
  T h = act_scalar(p, A.act);
  if (u) {
    A.up[o] = *u;
    h *= *u;
  }
  if (A.gate) h *= A.gate_per_row ? A.gate[n * A.F + j] : A.gate[j];
  A.hg[o] = h;
}

// Up-projection of columns [b0, b1): pre, up and the gated hidden hg of every row (zeros where
// a row does not run a column), in groups of four columns. Register blocking: tiles of four
// rows share each weight row (dot4) when there is no row mask; the remaining rows (all of them
// at N=1) take the group's four weight rows side by side (dot_rows4); with a row mask each row
// computes the columns it runs. The rolling prefetch runs one group ahead; past the block it
// asks for the phase that follows (w2 transposed: this block's down-projection rows; else the
// next block's up-projection rows).
template <typename T>
SPARSE_OPS_INLINE void decode_up_block(const DecodeArgs<T>& A, int64_t b0, int64_t b1) {
  const int64_t N = A.N, d = A.d, K = A.K;
  // The row of w1 (w3 when `gate_w`) that column q's work reads next, for the prefetch.
  auto ahead = [&](int64_t q, bool gate_w) -> const T* {
    const T* w = gate_w ? A.w3 : A.w1;
    if (q < b1 || !A.w2_transposed) return w && q < A.K ? w + A.idx[q] * d : nullptr;
    const int64_t q2 = b0 + q - b1;  // the down-projection of this block comes next
    return !gate_w && q2 < b1 ? A.w2 + A.idx[q2] * d : nullptr;
  };
  for (int64_t k = b0; k < b1; k += kColGroup) {
    const int64_t nc = std::min(kColGroup, b1 - k);
    const T* r1[kColGroup];
    const T* r3[kColGroup];
    const T* n1[kColGroup];
    const T* n3[kColGroup];
    group_rows(A.w1, A.idx, k, nc, d, r1);
    if (A.w3) group_rows(A.w3, A.idx, k, nc, d, r3);
    for (int64_t c = 0; c < kColGroup; ++c) {
      n1[c] = ahead(k + kColGroup + c, false);
      n3[c] = ahead(k + kColGroup + c, true);
    }
    if (A.row_mask) {
      for (int64_t c = 0; c < nc; ++c) {
        bool first = true;  // the first row that runs the column does its prefetch
        for (int64_t n = 0; n < N; ++n) {
          const int64_t o = n * K + k + c;
          if (!A.row_mask[o]) {
            A.pre[o] = T(0);
            if (A.w3) A.up[o] = T(0);
            A.hg[o] = T(0);
            continue;
          }
          const T* xn = A.x + n * d;
          T u = A.w3 ? dot(xn, r3[c], d, first ? n3[c] : nullptr) : T(0);
          hidden_epilogue(A, n, k + c, dot(xn, r1[c], d, first ? n1[c] : nullptr), A.w3 ? &u : nullptr);
          first = false;
        }
      }
      continue;
    }
    for (int64_t c = 0; c < nc && N >= 4; ++c) {
      for (int64_t n = 0; n + 4 <= N; n += 4) {
        T p[4], u[4];
        dot4(r1[c], A.x + n * d, d, p, n == 0 ? n1[c] : nullptr);
        if (A.w3) dot4(r3[c], A.x + n * d, d, u, n == 0 ? n3[c] : nullptr);
        for (int r = 0; r < 4; ++r) hidden_epilogue(A, n + r, k + c, p[r], A.w3 ? u + r : nullptr);
      }
    }
    for (int64_t n = N / 4 * 4; n < N; ++n) {
      T p[kColGroup], u[kColGroup];
      const bool first = n == 0;  // with tiles of rows before, the tiles asked already
      dot_rows4(A.x + n * d, r1, d, p, first ? n1 : nullptr);
      if (A.w3) dot_rows4(A.x + n * d, r3, d, u, first ? n3 : nullptr);
      for (int64_t c = 0; c < nc; ++c) hidden_epilogue(A, n, k + c, p[c], A.w3 ? u + c : nullptr);
    }
  }
}

// Down-projection of columns [b0, b1) (w2 transposed): acc[n] += hg[n, k] * w2[idx[k]], in
// groups of four columns: tiles of four rows per weight row (axpy4) without a row mask, the
// remaining rows four weight rows at once (axpy_rows4); with a row mask only the columns a row
// runs (skipped, not multiplied by 0: an inf or NaN in their weight row must not reach the
// output). The rolling prefetch runs one group ahead; past the block it asks for the next
// block's first up-projection rows (w1 only).
template <typename T>
SPARSE_OPS_INLINE void decode_down_block(const DecodeArgs<T>& A, int64_t b0, int64_t b1) {
  const int64_t N = A.N, d = A.d, K = A.K;
  auto ahead = [&](int64_t q) -> const T* {
    if (q < b1) return A.w2 + A.idx[q] * d;
    return q < A.K ? A.w1 + A.idx[q] * d : nullptr;
  };
  for (int64_t k = b0; k < b1; k += kColGroup) {
    const int64_t nc = std::min(kColGroup, b1 - k);
    const T* r2[kColGroup];
    const T* n2[kColGroup];
    group_rows(A.w2, A.idx, k, nc, d, r2);
    for (int64_t c = 0; c < kColGroup; ++c) n2[c] = ahead(k + kColGroup + c);
    if (A.row_mask) {
      for (int64_t c = 0; c < nc; ++c) {
        bool first = true;
        for (int64_t n = 0; n < N; ++n) {
          if (!A.row_mask[n * K + k + c]) continue;
          axpy(A.hg[n * K + k + c], r2[c], A.acc + n * d, d, first ? n2[c] : nullptr);
          first = false;
        }
      }
      continue;
    }
    for (int64_t c = 0; c < nc && N >= 4; ++c) {
      for (int64_t n = 0; n + 4 <= N; n += 4) {
        const T h[4] = {A.hg[n * K + k + c], A.hg[(n + 1) * K + k + c], A.hg[(n + 2) * K + k + c],
                        A.hg[(n + 3) * K + k + c]};
        axpy4(h, r2[c], A.acc + n * d, d, n == 0 ? n2[c] : nullptr);
      }
    }
    for (int64_t n = N / 4 * 4; n < N; ++n) {
      const T* hg = A.hg + n * K + k;
      const bool first = n == 0;
      if (nc == kColGroup) {
        axpy_rows4(hg, r2, A.acc + n * d, d, first ? n2 : nullptr);
      } else {
        for (int64_t c = 0; c < nc; ++c) axpy(hg[c], r2[c], A.acc + n * d, d, first ? n2[c] : nullptr);
      }
    }
  }
}

// Columns [k0, k1): hidden units of every row, and (w2 transposed) their down-projection.
template <typename T>
SPARSE_OPS_INLINE void decode_columns_impl(const DecodeArgs<T>& A, int64_t k0, int64_t k1) {
  // Blocks of kPhaseBlock columns in two phases: the up-projection rows (w1, w3) of the block,
  // then (w2 transposed) its down-projection rows, so each phase streams one weight matrix.
  // Measured against one pass reading w1 and w2 rows alternately, side by side in one process
  // (4 weight sets cycled, 2 threads): N=1 per-row keep 0.25 0.572 -> 0.559 ms, keep 0.5
  // 1.034 -> 0.983; N=4 shared keep 0.25 0.988 -> 0.851, keep 0.5 1.526 -> 1.519. In
  // `python -m bench --ops ffn` (weights from DRAM), before -> after over dense: N=4 shared
  // keep 0.25 4.04-4.13x -> 5.46x, keep 0.5 2.35-2.55x -> 3.33x; N=1 per-row keep 0.25
  // 2.31-2.49x -> 2.67x (noisy machine: dense itself moved 1.7 -> 2.0 ms between the runs).
  // (Those numbers predate the column groups and the rolling prefetch.) Block size, with both,
  // against 64 in one process, alternating call by call after a dense call (median ms): 16 is
  // 5-7% slower at N=1 and N=4; 128 the same within 4% (N=1 keep 0.25 0.476 vs 0.469).
  for (int64_t b0 = k0; b0 < k1; b0 += kPhaseBlock) {
    const int64_t b1 = std::min(k1, b0 + kPhaseBlock);
    decode_up_block(A, b0, b1);
    if (A.w2_transposed) decode_down_block(A, b0, b1);
  }
}

// w2 in [d, F] layout: out[n, i] = sum_k w2[i, idx[k]] * hg[n, k] for rows i in [i0, i1).
template <typename T>
SPARSE_OPS_INLINE void decode_down_rows_impl(const T* __restrict w2, const int64_t* __restrict idx,
                                             const T* __restrict hg, T* __restrict out, T* __restrict buf,
                                             int64_t N, int64_t d, int64_t F, int64_t K, int64_t i0,
                                             int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const T* w2i = w2 + i * F;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) buf[k] = w2i[idx[k]];
    for (int64_t n = 0; n < N; ++n) out[n * d + i] = dot(buf, hg + n * K, K);
  }
}

SPARSE_OPS_CLONES void decode_down_rows(const float* w2, const int64_t* idx, const float* hg, float* out,
                                        float* buf, int64_t N, int64_t d, int64_t F, int64_t K, int64_t i0,
                                        int64_t i1) {
  decode_down_rows_impl(w2, idx, hg, out, buf, N, d, F, K, i0, i1);
}
SPARSE_OPS_CLONES void decode_down_rows(const double* w2, const int64_t* idx, const double* hg, double* out,
                                        double* buf, int64_t N, int64_t d, int64_t F, int64_t K, int64_t i0,
                                        int64_t i1) {
  decode_down_rows_impl(w2, idx, hg, out, buf, N, d, F, K, i0, i1);
}

SPARSE_OPS_CLONES void decode_columns(const DecodeArgs<float>& A, int64_t k0, int64_t k1) {
  decode_columns_impl(A, k0, k1);
}
SPARSE_OPS_CLONES void decode_columns(const DecodeArgs<double>& A, int64_t k0, int64_t k1) {
  decode_columns_impl(A, k0, k1);
}
template <typename T>
std::tuple<Tensor, Tensor, Tensor> forward_decode(const Tensor& x, const Tensor& w1, const Tensor& w2,
                                                  const OptTensor& b1, const OptTensor& b2,
                                                  const OptTensor& w3, const OptTensor& gate, Act act,
                                                  bool w2_transposed, const Active& a, bool save) {
  const int64_t N = x.size(0), d = x.size(1), F = w1.size(0), K = a.K();
  Tensor xc = x.contiguous(), w1c = w1.contiguous(), w2c = w2.contiguous();
  Tensor w3c = w3 ? w3->contiguous() : Tensor();
  Tensor b1c = b1 ? b1->contiguous() : Tensor();
  Tensor idx = a.idx.contiguous();
  Tensor rm = a.row_mask.defined() ? a.row_mask.contiguous() : Tensor();
  // pre and up are tensors only when they are outputs (save); the threads' [N, d] accumulators,
  // the gated hidden hg and unsaved pre / up live in one buffer from the CPU allocator, each part
  // starting on a 64-byte line (the accumulators take a load and a store per weight row, and an
  // unaligned one crosses lines: from malloc, N=4 keep 1.0 ran 8-13% slower). Each ATen
  // allocation is a dispatcher call, and a decode call runs right after large kernels that leave
  // that code out of cache: with pre, hg and acc as tensors, and the empty outputs of save=False
  // made after them, this path made 4 more of them than b31d13d's.
  const int nthreads = w2_transposed ? at::get_num_threads() : 1;
  const int64_t NK = N * K, line = 64 / int64_t(sizeof(T));
  const auto lines = [&](int64_t n) { return (n + line - 1) / line * line; };
  const int64_t acc_n = lines(int64_t(nthreads) * N * d), nk = lines(NK);
  const int64_t n_spare = save ? 0 : (w3 ? 2 : 1);
  Tensor pre = save ? at::empty({N, K}, x.options()) : x.new_empty({0});
  Tensor up = w3 && save ? at::empty({N, K}, x.options()) : x.new_empty({0});
  const size_t work_bytes = size_t(acc_n + nk * (1 + n_spare)) * sizeof(T);
  at::DataPtr work = c10::GetCPUAllocator()->allocate(work_bytes);
  T* acc_base = static_cast<T*>(work.get());
  std::memset(acc_base, 0, size_t(acc_n) * sizeof(T));
  T* hg = acc_base + acc_n;
  T* spare = hg + nk;  // unsaved pre, then unsaved up

  DecodeArgs<T> A{};
  A.x = xc.data_ptr<T>(); A.w1 = w1c.data_ptr<T>(); A.w3 = w3 ? w3c.data_ptr<T>() : nullptr;
  A.w2 = w2c.data_ptr<T>(); A.b1 = b1 ? b1c.data_ptr<T>() : nullptr;
  A.idx = idx.data_ptr<int64_t>(); A.row_mask = rm.defined() ? rm.data_ptr<bool>() : nullptr;
  A.pre = save ? pre.data_ptr<T>() : spare;
  A.up = !w3 ? nullptr : save ? up.data_ptr<T>() : spare + nk;
  A.hg = hg;
  A.N = N; A.d = d; A.F = F; A.K = K; A.w2_transposed = w2_transposed; A.act = act;
  // The kernel indexes the caller's gate by column j (a.gate_a is the gathered copy
  // the GEMM path uses).
  Tensor gate_c = gate ? gate->contiguous() : Tensor();
  if (gate) {
    A.gate = gate_c.data_ptr<T>();
    A.gate_per_row = gate_c.dim() == 2;
  }
  // Each thread takes a fixed contiguous range of columns (grain ~64 columns of 3 KB rows keeps
  // the split even on 2 threads), so what each accumulator sums, and so the output's rounding,
  // is the same from call to call. Blocks taken from a shared counter instead were measured in
  // one process, alternating call by call after a dense call (median ms, fixed -> counter):
  // N=1 per-row keep 0.25 0.469 -> 0.480, N=4 shared keep 0.5 1.442 -> 1.362, N=4 per-row
  // keep 0.5 2.422 -> 2.264: 0-7%, not worth an output that changes in its last bits between
  // identical calls.
  at::parallel_for(0, K, kPhaseBlock, [&](int64_t k0, int64_t k1) {
    DecodeArgs<T> L = A;
    L.acc = acc_base + (w2_transposed ? at::get_thread_num() : 0) * N * d;
    decode_columns(L, k0, k1);
  });

  if (w2_transposed) {
    // Sum of the threads' accumulators and b2 in one pass (acc.sum(0) then add_(b2) were
    // two more ATen calls on a path whose fixed cost is a visible share of a decode call).
    Tensor out = at::empty({N, d}, x.options());
    T* op = out.data_ptr<T>();
    const Tensor b2c = b2 ? b2->contiguous() : Tensor();
    const T* bp = b2 ? b2c.data_ptr<T>() : nullptr;
    for (int64_t n = 0; n < N; ++n) {
      T* o = op + n * d;
      for (int64_t i = 0; i < d; ++i) o[i] = bp ? bp[i] : T(0);
      for (int t = 0; t < nthreads; ++t) {
        const T* a = acc_base + (t * N + n) * d;
        for (int64_t i = 0; i < d; ++i) o[i] += a[i];
      }
    }
    return {out, pre, up};
  }
  // nn.Linear layout [d, F]: an inactive column j is a stride-F column of w2. Only the
  // active entries of each row of w2 are read (gathered once per row into an L1 buffer,
  // then one dot per input row); a dense GEMV over a zero-filled hidden would multiply
  // inactive columns by 0 and turn a NaN or inf there into NaN. With a scattered mask
  // every cache line of w2 still holds active entries, so this layout's decode speedup is
  // bounded by 2 / (1 + keep); w2_transposed=True avoids that.
  Tensor out = at::zeros({N, d}, x.options());
  T* op = out.data_ptr<T>();
  const T* hp = hg;
  const T* w2p = w2c.data_ptr<T>();
  at::parallel_for(0, d, 16, [&](int64_t i0, int64_t i1) {
    std::vector<T> buf(K);
    decode_down_rows(w2p, A.idx, hp, op, buf.data(), N, d, F, K, i0, i1);
  });
  if (b2) out.add_(*b2);
  return {out, pre, up};
}

// ------------------------------------------------------------------ row groups, in parallel
// Per-row masks whose rows fall into groups (every token of a sample under a per-sample mask,
// say): each group is one task, the groups run side by side on the threads, and each task
// gathers its columns' weights into its own buffers (they stay in the core's cache: a sample's
// gathered w1 and w2 are 1.2 MB each at d=384, k=768) and runs single-threaded GEMMs on them
// (MKL runs one thread inside a parallel region). The shared path (csrc/ffn_compute.cpp) ran the
// groups one after another with two-thread GEMMs on small blocks, gathered with index_select
// (~3.4 GB/s here) and placed pre with a 2-D index_put_: on MiniLM's FFN (32 samples x 128
// tokens, d 384, F 1536, half of each sample's columns) that path's gathers, placement and zero
// fills took ~45% of the FFN's time.
// Rows idx[cols[c]] of w (row stride ld) into dst [k, d]; a null idx reads rows cols[c].
template <typename T>
SPARSE_OPS_INLINE void gather_rows_into(const T* w, int64_t ld, const int64_t* idx, const int64_t* cols, int64_t k,
                                        int64_t d, T* dst) {
  for (int64_t c = 0; c < k; ++c) {
    const int64_t row = idx ? idx[cols[c]] : cols[c];
    std::memcpy(dst + c * d, w + row * ld, size_t(d) * sizeof(T));
  }
}

// Whether rows[0..n) are consecutive (a sample's tokens, laid out batch-major).
inline bool is_run(const int64_t* rows, int64_t n) {
  for (int64_t r = 1; r < n; ++r)
    if (rows[r] != rows[0] + r) return false;
  return true;
}

// Rows `rows` of a contiguous [N, C] tensor: a view when they are consecutive, else a copy.
template <typename T>
Tensor take_rows(const Tensor& t, const int64_t* rows, int64_t n, bool run) {
  if (run) return t.narrow(0, rows[0], n);
  const int64_t C = t.size(1);
  Tensor out = at::empty({n, C}, t.options());
  const T* src = t.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  for (int64_t r = 0; r < n; ++r) std::memcpy(dst + r * C, src + rows[r] * C, size_t(C) * sizeof(T));
  return out;
}

// [n, k]: entries (rows[r], cols[c]) of a contiguous [N, K] tensor (a group's block of pre / up).
template <typename T>
Tensor take_block(const Tensor& t, const int64_t* rows, int64_t n, const int64_t* cols, int64_t k) {
  const int64_t K = t.size(1);
  Tensor out = at::empty({n, k}, t.options());
  const T* src = t.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  for (int64_t r = 0; r < n; ++r) {
    const T* row = src + rows[r] * K;
    for (int64_t c = 0; c < k; ++c) dst[r * k + c] = row[cols[c]];
  }
  return out;
}

// The inverses: block [n, C] into rows `rows` of contiguous dst [N, C]; block [n, k] into entries
// (rows[r], cols[c]) of contiguous dst [N, K], the rest of those rows set to 0 when zero_rest.
template <typename T>
void put_rows(T* dst, int64_t C, const int64_t* rows, int64_t n, const Tensor& block) {
  const T* src = block.data_ptr<T>();
  for (int64_t r = 0; r < n; ++r) std::memcpy(dst + rows[r] * C, src + r * C, size_t(C) * sizeof(T));
}

template <typename T>
void put_block(T* dst, int64_t K, const int64_t* rows, int64_t n, const int64_t* cols, int64_t k,
               const Tensor& block, bool zero_rest) {
  const T* src = block.data_ptr<T>();
  for (int64_t r = 0; r < n; ++r) {
    T* row = dst + rows[r] * K;
    if (zero_rest) std::fill(row, row + K, T(0));
    for (int64_t c = 0; c < k; ++c) row[cols[c]] = src[r * k + c];
  }
}

// The down-projection weights of the groups as rows [*, d], read by take_w2: a transposed w2
// [F, d] as it is (column idx[k] is row idx[k]); w2 [d, F] transposed once per call into [K, d]
// (row k is column idx[k]), so that every group gathers whole rows with memcpy. Each group
// gathering its k entries from each of w2's d rows instead was 5.8% of the grouped forward's
// profile (MiniLM's FFN, 32 samples x 128 tokens, each sample its own half of 1536 columns),
// against 0.3 ms for the one transposed copy (K x d elements, the call's temporary).
struct W2Rows {
  Tensor rows;        // [F, d] (w2 transposed) or [K, d]
  const int64_t* ip;  // position in idx -> row of `rows`: idx, or null (the position itself)
};

inline W2Rows w2_rows(const Tensor& w2c, bool w2_transposed, const Tensor& ic, const int64_t* ip) {
  if (w2_transposed) return {w2c, ip};
  const bool every = ic.size(0) == w2c.size(1);  // idx sorted and distinct: arange(F)
  return {(every ? w2c : w2c.index_select(1, ic)).t().contiguous(), nullptr};
}

// A group's down-projection weights [k, d] (columns idx[cols]).
template <typename T>
Tensor take_w2(const W2Rows& w2, const int64_t* cols, int64_t k, int64_t d, const at::TensorOptions& opt) {
  Tensor W2g = at::empty({k, d}, opt);
  gather_rows_into(w2.rows.data_ptr<T>(), d, w2.ip, cols, k, d, W2g.data_ptr<T>());
  return W2g;
}

// A group's gate [k] (shared) or [n, k] (per row), from the gate gathered at idx (gate_a).
template <typename T>
Tensor take_gate(const Tensor& gate_a, const int64_t* rows, int64_t n, const int64_t* cols, int64_t k) {
  if (gate_a.dim() == 2) return take_block<T>(gate_a, rows, n, cols, k);
  Tensor out = at::empty({k}, gate_a.options());
  const T* src = gate_a.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  for (int64_t c = 0; c < k; ++c) dst[c] = src[cols[c]];
  return out;
}

// Adds block [k, C] into rows cols of acc [K, C].
template <typename T>
void add_at(Tensor& acc, const Tensor& block_in, const int64_t* cols, int64_t k) {
  const Tensor block = block_in.contiguous();
  const T* b = block.data_ptr<T>();
  T* a = acc.data_ptr<T>();
  const int64_t C = acc.size(1);
  for (int64_t c = 0; c < k; ++c) {
    T* arow = a + cols[c] * C;
    const T* brow = b + c * C;
    for (int64_t j = 0; j < C; ++j) arow[j] += brow[j];
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> forward_groups(const Tensor& x, const Tensor& w1, const Tensor& w2,
                                                  const OptTensor& b1, const OptTensor& b2, const OptTensor& w3,
                                                  Act act, bool w2_transposed, const Active& a, bool save) {
  const int64_t N = x.size(0), d = x.size(1), K = a.K();
  const Tensor xc = x.contiguous(), w1c = w1.contiguous(), w2c = w2.contiguous();
  const Tensor w3c = w3 ? w3->contiguous() : Tensor();
  const Tensor b1c = b1 ? b1->contiguous() : Tensor();
  const Tensor ic = a.idx.contiguous();
  const Tensor gate_a = a.gate_a.defined() ? a.gate_a.contiguous() : Tensor();
  Tensor out = at::empty({N, d}, x.options());
  // pre / up for the backward (save), else empty and never written.
  Tensor pre = save ? at::empty({N, K}, x.options()) : x.new_empty({0});
  Tensor up = save && w3 ? at::empty({N, K}, x.options()) : x.new_empty({0});
  const T* w1p = w1c.data_ptr<T>();
  const T* w3p = w3 ? w3c.data_ptr<T>() : nullptr;
  const T* b1p = b1 ? b1c.data_ptr<T>() : nullptr;
  const Tensor b2c = b2 ? b2->contiguous() : Tensor();
  const T* b2p = b2 ? b2c.data_ptr<T>() : nullptr;
  const int64_t* ip = ic.data_ptr<int64_t>();
  const W2Rows w2r = w2_rows(w2c, w2_transposed, ic, ip);
  T* outp = out.data_ptr<T>();
  T* prep = save ? pre.data_ptr<T>() : nullptr;
  T* upp = save && w3 ? up.data_ptr<T>() : nullptr;
  const auto& groups = a.groups;
  const int64_t G = int64_t(groups.size());
  // Rows a group leaves untouched (a row in no group cannot happen: every row has a mask) get
  // zeros in pre/up, and each group's row is zero outside its columns, as the shared path gives.
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    // The pool's threads do not inherit the caller's dispatch state: below autograd here too (the
    // weights require grad; the op's autograd formula is registered above this kernel).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t g = g0; g < g1; ++g) {
      const RowGroup& grp = groups[size_t(g)];
      const Tensor rows_t = grp.rows.contiguous(), cols_t = grp.cols.contiguous();
      const int64_t n = rows_t.size(0), k = cols_t.size(0);
      const int64_t* rows = rows_t.data_ptr<int64_t>();
      const int64_t* cols = cols_t.data_ptr<int64_t>();
      if (n == 0) continue;
      const bool contiguous_rows = is_run(rows, n);
      if (k == 0) {  // no column runs for these rows: out = b2, pre = up = 0
        for (int64_t r = 0; r < n; ++r) {
          T* o = outp + rows[r] * d;
          if (b2p) std::memcpy(o, b2p, size_t(d) * sizeof(T));
          else std::fill(o, o + d, T(0));
          if (prep) std::fill(prep + rows[r] * K, prep + (rows[r] + 1) * K, T(0));
          if (upp) std::fill(upp + rows[r] * K, upp + (rows[r] + 1) * K, T(0));
        }
        continue;
      }
      const Tensor Xg = take_rows<T>(xc, rows, n, contiguous_rows);
      Tensor W1g = at::empty({k, d}, x.options());
      gather_rows_into(w1p, d, ip, cols, k, d, W1g.data_ptr<T>());
      Tensor Pg;
      if (b1p) {
        Tensor b1g = at::empty({k}, x.options());
        T* bp = b1g.data_ptr<T>();
        for (int64_t c = 0; c < k; ++c) bp[c] = b1p[ip[cols[c]]];
        Pg = at::addmm(b1g, Xg, W1g.t());
      } else {
        Pg = at::mm(Xg, W1g.t());
      }
      Tensor Ug;
      if (w3p) {
        gather_rows_into(w3p, d, ip, cols, k, d, W1g.data_ptr<T>());  // W1g is free again
        Ug = at::mm(Xg, W1g.t());
      }
      // pre / up rows: zero outside the group's columns, the group's values at them.
      if (prep) put_block<T>(prep, K, rows, n, cols, k, Pg, true);
      if (upp) put_block<T>(upp, K, rows, n, cols, k, Ug, true);
      Tensor Hg = apply_act(Pg, act);
      if (w3p) Hg.mul_(Ug);
      if (gate_a.defined()) Hg.mul_(take_gate<T>(gate_a, rows, n, cols, k));
      const Tensor W2g = take_w2<T>(w2r, cols, k, d, x.options());  // [k, d]
      if (contiguous_rows) {
        Tensor og = out.narrow(0, rows[0], n);
        if (b2) at::addmm_out(og, b2c, Hg, W2g);
        else at::mm_out(og, Hg, W2g);
      } else {
        put_rows<T>(outp, d, rows, n, b2 ? at::addmm(b2c, Hg, W2g) : at::mm(Hg, W2g));
      }
    }
  });
  return {out, pre, up};
}

// The backward of forward_groups: each group's gradients from its own gathered weights and its
// block of pre / up, groups side by side with single-threaded GEMMs. Rows' gradients (dx, a
// per-row gate's) are written in place (groups own disjoint rows); the weights' compact
// gradients are summed per thread, then over the threads. Returns what backward_compact returns
// (compact gradients at the positions of idx). Without dense_grad only (that computes every
// unit the mask allows, a dense pass: backward_compact).
// MiniLM's FFN (32 samples x 128 tokens, d 384, F 1536, each sample's own half of the columns,
// forward + backward): the sequential groups of backward_compact spent as long in index_select
// gathers, zero fills and index_put_ / index_add_ as in their GEMMs.
template <typename T>
Grads backward_groups(const Tensor& grad_out_in, const Tensor& x, const Tensor& w1, const Tensor& w2,
                      const OptTensor& b1, const OptTensor& w3, const Active& a, const Tensor& pre_in,
                      const Tensor& up_in, Act act, bool w2_transposed, const std::array<bool, 3>& need,
                      bool has_gate) {
  const int64_t N = x.size(0), d = x.size(1), K = a.K();
  const bool need_x = need[0], need_w = need[1], need_g = need[2] && has_gate;
  const auto opt = x.options();
  const Tensor go = grad_out_in.contiguous(), xc = x.contiguous(), w1c = w1.contiguous(), w2c = w2.contiguous();
  const Tensor w3c = w3 ? w3->contiguous() : Tensor();
  const Tensor pre = pre_in.contiguous(), up = w3 ? up_in.contiguous() : Tensor();
  const Tensor ic = a.idx.contiguous();
  const Tensor gate_a = a.gate_a.defined() ? a.gate_a.contiguous() : Tensor();
  const bool gate_rows = gate_a.defined() && gate_a.dim() == 2;
  const T* w1p = w1c.data_ptr<T>();
  const T* w3p = w3 ? w3c.data_ptr<T>() : nullptr;
  const int64_t* ip = ic.data_ptr<int64_t>();
  const W2Rows w2r = w2_rows(w2c, w2_transposed, ic, ip);

  Grads r;
  if (need_w) r.db2 = go.sum(0);
  if (need_x) r.dx = at::zeros({N, d}, opt);  // rows of a group with no column stay 0
  if (need_g && gate_rows) r.dgate = at::zeros({N, K}, opt);
  struct Acc { Tensor dW1a, dW2a, dW3a, db1a, dgate; };
  const int nt = at::get_num_threads();
  std::vector<Acc> acc(static_cast<size_t>(nt));
  const auto& groups = a.groups;
  at::parallel_for(0, int64_t(groups.size()), 1, [&](int64_t g0, int64_t g1) {
    // The pool's threads do not inherit the caller's dispatch state: below autograd here too.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Acc& t = acc[static_cast<size_t>(at::get_thread_num())];
    auto acc_of = [&](Tensor& into, at::IntArrayRef sizes) -> Tensor& {
      if (!into.defined()) into = at::zeros(sizes, opt);
      return into;
    };
    for (int64_t gi = g0; gi < g1; ++gi) {
      const RowGroup& grp = groups[size_t(gi)];
      const Tensor rows_t = grp.rows.contiguous(), cols_t = grp.cols.contiguous();
      const int64_t n = rows_t.size(0), k = cols_t.size(0);
      if (n == 0 || k == 0) continue;
      const int64_t* rows = rows_t.data_ptr<int64_t>();
      const int64_t* cols = cols_t.data_ptr<int64_t>();
      const bool run = is_run(rows, n);
      const Tensor Gg = take_rows<T>(go, rows, n, run);
      const Tensor Pg = take_block<T>(pre, rows, n, cols, k);
      const Tensor Ug = w3 ? take_block<T>(up, rows, n, cols, k) : Tensor();
      const Tensor gg = gate_a.defined() ? take_gate<T>(gate_a, rows, n, cols, k) : Tensor();
      const Tensor W2g = take_w2<T>(w2r, cols, k, d, opt);  // [k, d]
      Tensor dhg = at::mm(Gg, W2g.t());                                             // [n, k]
      const Tensor act_v = apply_act(Pg, act);
      const Tensor h = w3 ? act_v * Ug : act_v;
      if (need_g) {
        const Tensor dgb = dhg * h;
        if (gate_rows) {
          put_block<T>(r.dgate.data_ptr<T>(), K, rows, n, cols, k, dgb, false);  // zeros elsewhere already
        } else {
          add_at<T>(acc_of(t.dgate, {K, 1}), dgb.sum(0).view({k, 1}), cols, k);
        }
      }
      if (!need_x && !need_w) continue;
      const Tensor Xg = need_w ? take_rows<T>(xc, rows, n, run) : Tensor();
      if (need_w) {
        const Tensor hg = gg.defined() ? h * gg : h;
        // Summed as [K, d] rows whatever w2's layout (contiguous row adds), transposed at the end.
        add_at<T>(acc_of(t.dW2a, {K, d}), at::mm(hg.t(), Gg), cols, k);
      }
      const Tensor dh = gg.defined() ? dhg.mul_(gg) : dhg;
      Tensor dup, dact = dh;
      if (w3) {
        dup = dh * act_v;
        dact = dh * Ug;
      }
      const Tensor dpre = act_backward(dact, Pg, act);
      if (need_x) {
        Tensor W1g = at::empty({k, d}, opt);
        gather_rows_into(w1p, d, ip, cols, k, d, W1g.data_ptr<T>());
        Tensor dxg = at::mm(dpre, W1g);
        if (w3) {
          gather_rows_into(w3p, d, ip, cols, k, d, W1g.data_ptr<T>());
          dxg.addmm_(dup, W1g);
        }
        put_rows<T>(r.dx.data_ptr<T>(), d, rows, n, dxg);
      }
      if (need_w) {
        add_at<T>(acc_of(t.dW1a, {K, d}), at::mm(dpre.t(), Xg), cols, k);
        if (w3) add_at<T>(acc_of(t.dW3a, {K, d}), at::mm(dup.t(), Xg), cols, k);
        if (b1) add_at<T>(acc_of(t.db1a, {K, 1}), dpre.sum(0).view({k, 1}), cols, k);
      }
    }
  });
  auto total = [&](Tensor Acc::*field, bool needed, at::IntArrayRef sizes) {
    if (!needed) return Tensor();
    Tensor out;
    for (auto& t : acc) {
      const Tensor& v = t.*field;
      if (!v.defined()) continue;
      if (out.defined()) out.add_(v);
      else out = v;
    }
    return out.defined() ? out.view(sizes) : at::zeros(sizes, opt);
  };
  r.dW1a = total(&Acc::dW1a, need_w, {K, d});
  r.dW2a = total(&Acc::dW2a, need_w, {K, d});
  if (r.dW2a.defined() && !w2_transposed) r.dW2a = r.dW2a.t().contiguous();  // [d, K]
  r.dW3a = total(&Acc::dW3a, need_w && w3.has_value(), {K, d});
  r.db1a = total(&Acc::db1a, need_w && b1.has_value(), {K});
  if (need_g && !gate_rows) r.dgate = total(&Acc::dgate, true, {K});
  return r;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_ffn_cpu(
    const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& b1, const OptTensor& b2,
    const OptTensor& w3, const OptTensor& active, const OptTensor& gate, std::string activation,
    bool w2_transposed, bool /*dense_grad*/, bool save) {
  check_inputs(x, w1, w2, b1, b2, w3, active, gate, w2_transposed);
  const Act act = parse_activation(activation);
  const int64_t N = x.size(0), F = w1.size(0);
  Active a = plan_forward(N, F, active, gate, x.options());
  std::tuple<Tensor, Tensor, Tensor> r;
  const auto st = x.scalar_type();
  // All columns active and more than a few rows: nothing to skip, and BLAS's GEMM beats
  // the GEMV kernel once weights are reused across rows (measured 0.74x of dense at N=8).
  const bool decode = N > 0 && N <= kDecodeMaxRows && a.K() > 0 && !(a.all && N > 4) &&
                      (st == at::kFloat || st == at::kDouble);
  if (decode) {
    // pre and up come back empty already when they are not saved.
    r = st == at::kFloat ? forward_decode<float>(x, w1, w2, b1, b2, w3, gate, act, w2_transposed, a, save)
                         : forward_decode<double>(x, w1, w2, b1, b2, w3, gate, act, w2_transposed, a, save);
    return {std::get<0>(r), a.idx, std::get<1>(r), std::get<2>(r), a.saved_mask, a.saved_group};
  } else if (a.groups.size() > 1 && (st == at::kFloat || st == at::kDouble)) {
    r = st == at::kFloat ? forward_groups<float>(x, w1, w2, b1, b2, w3, act, w2_transposed, a, save)
                         : forward_groups<double>(x, w1, w2, b1, b2, w3, act, w2_transposed, a, save);
  } else {
    r = forward_gathered(x, w1, w2, b1, b2, w3, act, w2_transposed, a);
  }
  return forward_outputs(r, a, save);
}

// A tensor of zeros [R, C] (contiguous) holding src's rows (dim 0) or columns (dim 1) at the
// positions idx, written in one pass: each element once. (zeros_like, then index_copy_, wrote
// the active part twice and read it once more: at::fill_ plus index_copy_ were ~7% of a
// training step at keep 0.5, N=1024, d=768, F=3072. That step, in one process alternating
// with the old path, medians of 16: w2 [d, F] 171.4 -> 160.4 ms, w2 transposed 149.8 -> 139.2
// ms; gradients bitwise equal.) A 1-D src [K] gives a 1-D result [R] (C = 1, dim 0).
Tensor scatter_into_zeros(int64_t R, int64_t C, int64_t dim, const Tensor& idx, const Tensor& src_in) {
  if (src_in.dim() == 1) {
    TORCH_CHECK(dim == 0 && C == 1, "gated_ffn: internal error: 1-D scatter along dim ", dim);
    return scatter_into_zeros(R, 1, 0, idx, src_in.view({-1, 1})).view({R});
  }
  TORCH_CHECK(dim == 0 || dim == 1, "gated_ffn: internal error: scatter_into_zeros along dim ", dim);
  const int64_t L = dim == 0 ? R : C;
  const Tensor src = src_in.contiguous(), ic = idx.contiguous();
  const int64_t K = ic.size(0);
  TORCH_CHECK(src.dim() == 2 && src.size(0) == (dim == 0 ? K : R) && src.size(1) == (dim == 0 ? C : K),
              "gated_ffn: internal error: scatter source ", src.sizes(), " for ", K, " indices into [", R, ", ", C,
              "] along dim ", dim);
  const int64_t* ip = ic.data_ptr<int64_t>();
  std::vector<int64_t> pos(dim == 0 ? R : 0, -1);
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(ip[k] >= 0 && ip[k] < L, "gated_ffn: idx must be in [0, ", L, "); got ", ip[k]);
    if (dim == 0) pos[ip[k]] = k;
  }
  Tensor out = at::empty({R, C}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scatter_into_zeros", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (dim == 0) {
      at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          if (pos[r] >= 0) std::memcpy(o + r * C, s + pos[r] * C, C * sizeof(scalar_t));
          else std::fill(o + r * C, o + (r + 1) * C, scalar_t(0));
        }
      });
    } else {  // a row of dst (C elements) stays in L1 between its zero fill and its scatter
      at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* orow = o + r * C;
          const scalar_t* srow = s + r * K;
          std::fill(orow, orow + C, scalar_t(0));
          for (int64_t k = 0; k < K; ++k) orow[ip[k]] = srow[k];
        }
      });
    }
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_ffn_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& b1,
    const OptTensor& w3, const OptTensor& active, const OptTensor& gate, const Tensor& idx,
    const Tensor& pre, const Tensor& up, const Tensor& row_mask, const Tensor& row_group, std::string activation,
    bool w2_transposed, bool dense_grad, std::array<bool, 3> need) {
  check_inputs(x, w1, w2, b1, std::nullopt, w3, active, gate, w2_transposed);
  check_backward_inputs(grad_out, x, w1, w3, active, gate, idx, pre, up, row_mask, row_group);
  const Act act = parse_activation(activation);
  // idx comes from the forward call, but the op is public: plan_backward checks it against
  // active and gate before anything indexes with it.
  const Tensor ic = idx.contiguous();
  const int64_t N = x.size(0), d = x.size(1), F = w1.size(0);
  const Active a = plan_backward(F, active, gate, ic, row_mask, row_group);
  const auto st = x.scalar_type();
  const bool groups = a.groups.size() > 1 && !(need[2] && gate && dense_grad) &&
                      (st == at::kFloat || st == at::kDouble);
  Grads g = !groups ? backward_compact(grad_out, x, w1, w2, b1, w3, active, gate, a, pre, up, act, w2_transposed,
                                       dense_grad, need)
            : st == at::kFloat
                ? backward_groups<float>(grad_out, x, w1, w2, b1, w3, a, pre, up, act, w2_transposed, need, gate.has_value())
                : backward_groups<double>(grad_out, x, w1, w2, b1, w3, a, pre, up, act, w2_transposed, need,
                                          gate.has_value());
  // Full-size gradients: with every column active the compact ones are the full ones, returned
  // as they are (zero-fill + copy of w1/w2-sized tensors cost ~9% of a dense fwd+bwd step at
  // N=1024, d=768, F=3072); else written into zeros in one pass.
  const Tensor empty = x.new_empty({0});
  // idx is sorted and distinct: with K == F it is arange(F), and the compact gradients are the
  // full ones already (a per-sample mask's union is usually every column).
  const bool every_column = ic.size(0) == F;
  auto full = [&](const Tensor& c, bool is_full, int64_t R, int64_t C, int64_t dim) {
    if (!c.defined()) return empty;
    return is_full || every_column ? c : scatter_into_zeros(R, C, dim, ic, c);
  };
  const bool wf = g.weights_full;
  Tensor dw1 = full(g.dW1a, wf, F, d, 0);
  Tensor dw2 = w2_transposed ? full(g.dW2a, wf, F, d, 0) : full(g.dW2a, wf, d, F, 1);
  Tensor dw3 = full(g.dW3a, wf, F, d, 0);
  Tensor db1 = full(g.db1a, wf, F, 1, 0);
  Tensor dgate = !g.dgate.defined() ? empty
                 : g.dgate.dim() == 1 ? full(g.dgate, g.gate_full, F, 1, 0)
                                      : full(g.dgate, g.gate_full, N, F, 1);
  return {g.dx.defined() ? g.dx : empty, dw1, dw2, dw3, db1, g.db2.defined() ? g.db2 : empty, dgate};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CPU, m) {
  m.impl("gated_ffn", &gated_ffn_cpu);
  m.impl("gated_ffn_backward", &gated_ffn_backward_cpu);
}

}  // namespace ffn
}  // namespace sparse_ops
