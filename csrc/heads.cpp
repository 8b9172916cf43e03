// Device-generic masked_head_attention: checks, running pairs and per-pair attention masks.
#include "heads.h"

#include <limits>
#include <string>

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

int64_t check_backward_saved(const Sizes& s, const Tensor& grad_out, const Tensor& q, const Tensor& head_mask,
                             const Tensor& pairs, const Tensor& out, const Tensor& out_c, const Tensor& lse) {
  const char* op = "masked_head_attention_backward";
  TORCH_CHECK(grad_out.sizes() == q.sizes(), op, ": grad_out must be shaped like q ", q.sizes(), "; got ",
              grad_out.sizes());
  check_dev_dtype(grad_out, q, "grad_out");
  TORCH_CHECK(pairs.scalar_type() == at::kLong && pairs.dim() == 1, op, ": pairs must be int64 [P]; got ",
              pairs.scalar_type(), " ", pairs.sizes());
  TORCH_CHECK(pairs.device() == q.device(), op, ": pairs must be on q's device (", q.device(), "); got ",
              pairs.device());
  const int64_t n = s.B * s.H, P = pairs.size(0);
  TORCH_CHECK(P <= n, op, ": pairs must hold at most B * H = ", n, " pairs; got ", P);
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out must be shaped like q ", q.sizes(), " (as the forward returned "
              "it); got ", out.sizes());
  check_dev_dtype(out, q, "out");
  const bool work = P > 0 && s.Tq > 0;
  if (work && is_gated(head_mask)) {
    TORCH_CHECK(out_c.numel() == P * s.Tq * s.D, op, ": out_c must be [P, Tq, D] = [", P, ", ", s.Tq, ", ", s.D,
                "] for a float head_mask; got ", out_c.sizes());
    check_dev_dtype(out_c, q, "out_c");
  }
  if (work) {
    const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(lse.dim() == 2 && lse.size(0) == P && lse.size(1) == s.Tq && lse.scalar_type() == acc &&
                lse.device() == q.device(), op, ": lse must be ", acc, " [P, Tq] = [", P, ", ", s.Tq,
                "] on q's device; got ", lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  }
  // pairs: strictly increasing, in [0, B * H), each one running, as many as run.
  const Tensor run = run_mask(head_mask, s.B, s.H).reshape({-1});
  const char* what = ": pairs must be the sorted running pairs b * H + h of head_mask (as the forward returned them)";
  if (pairs.is_cpu()) {
    const Tensor pc = pairs.contiguous();
    const int64_t* pp = pc.data_ptr<int64_t>();
    for (int64_t p = 0; p < P; ++p) {
      TORCH_CHECK(pp[p] >= 0 && pp[p] < n, op, what, "; got ", pp[p], " at position ", p, ", outside [0, B * H) = [0, ",
                  n, ")");
      TORCH_CHECK(p == 0 || pp[p] > pp[p - 1], op, what, "; got ", pp[p], " after ", pp[p - 1], " at position ", p);
    }
    const int64_t running = run.sum().item<int64_t>();
    TORCH_CHECK(running == P && (P == 0 || run.index_select(0, pc).all().item<bool>()), op, what, "; got ", P,
                " pairs where ", running, " run, or a pair that does not run");
    return P;
  }
  if (P > 0) {
    Tensor ok = run.sum().eq(P).logical_and(pairs.min().ge(0)).logical_and(pairs.max().lt(n));
    if (P > 1) ok = ok.logical_and(pairs.slice(0, 1).gt(pairs.slice(0, 0, P - 1)).all());
    ok = ok.logical_and(run.index_select(0, pairs.clamp(0, n - 1)).all());
    at::_assert_async(ok, std::string(op) + what);
  } else {
    at::_assert_async(run.any().logical_not(), std::string(op) + what);
  }
  return P;
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
