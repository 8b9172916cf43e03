// Device-generic masked_head_attention: checks, running pairs and per-pair attention masks.
#include "heads.h"

#include <limits>

namespace sparse_ops {
namespace heads {

static void check_dev_dtype(const Tensor& t, const Tensor& q, const char* name) {
  TORCH_CHECK(t.device() == q.device(), "masked_head_attention: ", name, " must be on the same device as q (",
              q.device(), "); got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "masked_head_attention: ", name,
              " must have the same dtype as q (", q.scalar_type(), "); got ", t.scalar_type());
}

Sizes check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& head_mask,
                   const OptTensor& attn_mask, bool is_causal) {
  TORCH_CHECK(q.dim() == 4, "masked_head_attention: q must be 4-D [B, H, Tq, D]; got ", q.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "masked_head_attention: q must be a floating tensor; got ",
              q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  check_dev_dtype(k, q, "k");
  check_dev_dtype(v, q, "v");
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(3) == D,
              "masked_head_attention: k must be [B, H, Tk, D] with B = ", B, ", H = ", H, ", D = ", D, "; got ",
              k.sizes());
  const int64_t Tk = k.size(2);
  TORCH_CHECK(v.sizes() == k.sizes(), "masked_head_attention: v must be shaped like k ", k.sizes(), "; got ",
              v.sizes());
  TORCH_CHECK(Tk > 0 || B * H * Tq == 0, "masked_head_attention: k and v need at least one key (Tk > 0)");
  // The causal mask is top-left aligned (key j visible to query i iff j <= i, as SDPA's): with
  // fewer queries than keys (a KV cache) it would hide the cached keys, so that case is refused.
  TORCH_CHECK(!is_causal || Tq >= Tk, "masked_head_attention: is_causal=True needs Tq >= Tk; got Tq = ", Tq,
              " < Tk = ", Tk, ". ", kCausalHint);
  TORCH_CHECK(head_mask.device() == q.device(), "masked_head_attention: head_mask must be on the same device as q (",
              q.device(), "); got ", head_mask.device());
  TORCH_CHECK(head_mask.scalar_type() == at::kBool || head_mask.scalar_type() == q.scalar_type(),
              "masked_head_attention: head_mask must be bool or have q's dtype (", q.scalar_type(), "); got ",
              head_mask.scalar_type());
  TORCH_CHECK((head_mask.dim() == 1 && head_mask.size(0) == H) ||
                  (head_mask.dim() == 2 && head_mask.size(0) == B && head_mask.size(1) == H),
              "masked_head_attention: head_mask must be [B, H] = [", B, ", ", H, "] or [H] = [", H, "]; got ",
              head_mask.sizes());
  if (attn_mask) {
    const Tensor& m = *attn_mask;
    TORCH_CHECK(m.device() == q.device(), "masked_head_attention: attn_mask must be on the same device as q (",
                q.device(), "); got ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(),
                "masked_head_attention: attn_mask must be bool or have q's dtype (", q.scalar_type(), "); got ",
                m.scalar_type());
    const int64_t want[4] = {B, H, Tq, Tk};
    bool ok = m.dim() <= 4;
    for (int64_t i = 0; ok && i < m.dim(); ++i) {
      const int64_t s = m.size(m.dim() - 1 - i), w = want[3 - i];
      ok = s == 1 || s == w;
    }
    TORCH_CHECK(ok, "masked_head_attention: attn_mask must be broadcastable to [B, H, Tq, Tk] = [", B, ", ", H,
                ", ", Tq, ", ", Tk, "]; got ", m.sizes());
  }
  return {B, H, Tq, Tk, D};
}

Tensor run_mask(const Tensor& head_mask, int64_t B, int64_t H) {
  Tensor m = is_gated(head_mask) ? head_mask.ne(0) : head_mask;
  return m.dim() == 1 ? m.unsqueeze(0).expand({B, H}) : m;
}

Tensor gate_bh(const Tensor& head_mask, int64_t B, int64_t H, at::ScalarType dt) {
  Tensor g = head_mask.to(dt);
  return g.dim() == 1 ? g.unsqueeze(0).expand({B, H}) : g;
}

Tensor running_pairs(const Tensor& run) {
  return at::nonzero(run.reshape({-1})).view({-1});
}

Tensor mask_4d(const OptTensor& attn_mask, const Sizes& s) {
  if (!attn_mask) return Tensor();
  Tensor m = *attn_mask;
  while (m.dim() < 4) m = m.unsqueeze(0);
  // The fused kernels need a real key dimension (unit stride).
  if (m.size(3) != s.Tk) m = m.expand({m.size(0), m.size(1), m.size(2), s.Tk});
  return m;
}

Tensor additive(const Tensor& mask, at::ScalarType dt) {
  if (!mask.defined()) return mask;
  Tensor m = mask;
  if (m.scalar_type() == at::kBool) {
    m = at::where(m, at::zeros({}, m.options().dtype(dt)),
                  at::full({}, -std::numeric_limits<double>::infinity(), m.options().dtype(dt)));
  }
  return m.stride(3) == 1 ? m : m.contiguous();
}

Tensor mask_for_pairs(const Tensor& mask4, const Tensor& pairs, int64_t H, at::ScalarType dt) {
  if (!mask4.defined()) return mask4;
  const int64_t mB = mask4.size(0), mH = mask4.size(1);
  if (mB == 1 && mH == 1) return additive(mask4, dt);
  Tensor idx;
  if (mB > 1 && mH > 1) idx = pairs;
  else if (mB > 1) idx = at::div(pairs, H, "floor");
  else idx = at::remainder(pairs, H);
  Tensor m3 = mask4.reshape({mB * mH, mask4.size(2), mask4.size(3)});
  return additive(m3.index_select(0, idx).unsqueeze(1), dt);
}

}  // namespace heads
}  // namespace sparse_ops
