// Plain-CUDA kernels of masked_head_attention (no torch headers; the ATen launcher is
// heads_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace sparse_ops {
namespace cuda {

// Largest head dimension of the forward kernel.
constexpr int64_t kHeadsMaxD = 256;

// One forward call over P running (b, h) pairs. Pointers are raw; every tensor has unit stride
// on its last dimension. Strides are in elements. Optional pointers may be null.
struct HeadsFwdArgs {
  DType dtype;
  const void* q;  // [B, H, Tq, D] with strides q_s0 (b), q_s1 (h), q_s2 (t)
  const void* k;  // [B, H, Tk, D]
  const void* v;  // [B, H, Tk, D]
  int64_t q_s0, q_s1, q_s2;
  int64_t k_s0, k_s1, k_s2;
  int64_t v_s0, v_s1, v_s2;
  const int64_t* pairs;  // [P] flat indices b * H + h
  // Additive mask in q's dtype, or null: element (p, i, j) at mask[p * mask_sp + i * mask_sr + j]
  // (mask_sp = 0: one mask shared by all pairs; mask_sr = 0: one row for all queries).
  const void* mask;
  int64_t mask_sp, mask_sr;
  const void* gate;  // [P] in q's dtype (multiplies out, not out_c), or null
  void* out;         // [B, H, Tq, D] with strides o_s0, o_s1, o_s2: rows of running pairs only; or null
  int64_t o_s0, o_s1, o_s2;
  void* out_c;       // [P, Tq, D] contiguous: un-gated outputs; or null
  void* lse;         // [P, Tq] contiguous, accumulation type (float; double for F64); -inf for a row
                     // whose keys are all masked (its output is 0)
  int64_t P, H, Tq, Tk, D;
  double scale;
  bool causal;       // key j attends query i only when j <= i (top-left aligned, as ATen)
};

// Flash-attention forward over the running pairs. D must be in [1, kHeadsMaxD].
cudaError_t masked_head_attention_fwd(const HeadsFwdArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparse_ops
