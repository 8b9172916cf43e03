// Plain-CUDA kernels of gated_ffn (no torch headers; the ATen launcher is ffn_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace sparse_ops {
namespace cuda {

enum class FfnAct { Gelu = 0, GeluTanh = 1, Relu = 2, Silu = 3, Identity = 4 };

// Largest row count of the decode kernels (matches kDecodeMaxRows in csrc/ffn_plan.h).
constexpr int kFfnDecodeMaxRows = 16;

// One decode call: raw pointers, all contiguous. Optional pointers may be null.
struct FfnDecodeArgs {
  DType dtype;
  FfnAct act;
  const void* x;          // [N, d]
  const void* w1;         // [F, d]
  const void* w3;         // [F, d] or null
  const void* w2;         // [F, d] (w2_transposed) or [d, F]
  const void* b1;         // [F] or null
  const void* gate;       // [F] or [N, F] (gate_per_row) or null
  const int64_t* idx;     // [K] active columns
  const bool* row_mask;   // [N, K] or null
  void* pre;              // [N, K] out
  void* up;               // [N, K] out (when w3)
  void* hg;               // [N, K] out: the gated hidden
  void* out_acc;          // [N, d] accumulator in the accumulation type (float, double for F64), zeroed
  int64_t N, d, F, K;
  bool gate_per_row;
  bool w2_transposed;
};

// Up-projection, activation, gate and (w2 transposed) the split-over-columns down-projection
// into out_acc. With w2 in [d, F] layout the down-projection is ffn_decode_down_cols.
cudaError_t ffn_decode(const FfnDecodeArgs& a, cudaStream_t stream);
// w2 in [d, F] layout: out_acc[n, i] = sum_k w2[i, idx[k]] * hg[n, k].
cudaError_t ffn_decode_down_cols(const FfnDecodeArgs& a, cudaStream_t stream);

// Weight-gradient scatter into a zeroed destination:
//  rows:  dst[idx[k], :] = src[k, :]  (dst [R, C], src [K, C]) for w1 / w3 / w2 transposed / b1
//  cols:  dst[:, idx[k]] = src[:, k]  (dst [C, R], src [C, K]) for w2 in [d, F] layout
cudaError_t scatter_rows_by_idx(DType dt, const void* src, const int64_t* idx, void* dst, int64_t K, int64_t C,
                                cudaStream_t stream);
cudaError_t scatter_cols_by_idx(DType dt, const void* src, const int64_t* idx, void* dst, int64_t K, int64_t C,
                                int64_t R, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparse_ops
