// Device-generic parts of masked_head_attention: argument checks, which (sample, head)
// pairs run, and the attention mask brought to one [P, 1, Tq', Tk] block per running pair.
// The device kernels (gather/scatter of pairs, the attention itself) live in
// csrc/cpu/heads_cpu.cpp and csrc/cuda/heads_cuda.cpp (+ heads_kernels.cu).
//
// A pair is a flat index b * H + h into [B, H]. Running pairs are sorted.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace sparse_ops {
namespace heads {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

struct Sizes {
  int64_t B, H, Tq, Tk, D;
};

// What to do instead of is_causal with Tq < Tk (the message of check_inputs).
constexpr const char* kCausalHint =
    "The causal mask is top-left aligned, as F.scaled_dot_product_attention's, which with a KV cache "
    "would hide the cached keys from the new queries: for decode pass is_causal=False (one query sees "
    "every key), for a chunk of queries after a cache pass the bottom-right mask as attn_mask.";

// Throws a clear error (naming the argument) for any malformed input; returns the sizes.
// is_causal needs Tq >= Tk (kCausalHint).
Sizes check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& head_mask,
                   const OptTensor& attn_mask, bool is_causal);

inline bool is_gated(const Tensor& head_mask) { return head_mask.scalar_type() != at::kBool; }

// head_mask ([B, H] or [H], bool or float) as bool [B, H]: which pairs run (gate != 0).
Tensor run_mask(const Tensor& head_mask, int64_t B, int64_t H);

// The gate as a float [B, H] tensor in dtype `dt` (ones for a bool mask).
Tensor gate_bh(const Tensor& head_mask, int64_t B, int64_t H, at::ScalarType dt);

// Running pairs: int64 [P], sorted flat indices b * H + h where run is true.
Tensor running_pairs(const Tensor& run);

// The backward op is public (torch.ops.sparse_ops.masked_head_attention_backward) and indexes
// with what the forward returned: grad_out and out shaped like q, pairs the sorted running pairs
// of head_mask, out_c [P, Tq, D] for a float head_mask, lse [P, Tq] in the accumulation type.
// Checked before anything indexes with them: on the host with an error naming what is wrong
// (CPU), on the device with no host synchronisation (CUDA). Returns P.
int64_t check_backward_saved(const Sizes& s, const Tensor& grad_out, const Tensor& q, const Tensor& head_mask,
                             const Tensor& pairs, const Tensor& out, const Tensor& out_c, const Tensor& lse);

// attn_mask (bool or float, broadcastable to [B, H, Tq, Tk]) as a 4-D tensor [mB, mH, mTq, Tk]
// (mB in {1, B}, mH in {1, H}, mTq in {1, Tq}) with every broadcast dimension kept at size 1.
// Undefined when attn_mask is absent.
Tensor mask_4d(const OptTensor& attn_mask, const Sizes& s);

// The mask rows of the given pairs: [P, 1, mTq, Tk], or the mask itself ([1, 1, mTq, Tk]) when
// it is shared by all pairs; as an additive float mask in dtype `dt` (bool: 0 / -inf).
// Undefined in, undefined out.
Tensor mask_for_pairs(const Tensor& mask4, const Tensor& pairs, int64_t H, at::ScalarType dt);

// The same for all pairs (no gather): mask4 as an additive float mask, or undefined.
Tensor additive(const Tensor& mask, at::ScalarType dt);

}  // namespace heads
}  // namespace sparse_ops
