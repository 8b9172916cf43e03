// CUDA registration of masked_head_attention: ATen glue around csrc/cuda/heads_kernels.cu.
//
// Forward: the device-generic preparation of csrc/heads.cpp (checks, running pairs, the
// attention mask of each running pair as an additive mask in q's dtype), then the flash
// kernel over the running pairs only. The output takes q's layout (at::empty_like(q), as the
// CPU op and the fake in sparse_ops/ops/heads.py); rows of pairs that are off are zero-filled,
// never computed. Also returned: pairs, out_c (un-gated outputs, float head_mask only) and
// lse [P, Tq] in float32 (float64 for double inputs).
//
// Backward: ATen ops on the gathered running pairs, in the accumulation type, in chunks of
// pairs that bound the [n, Tq, Tk] score matrices (~512 MiB of fp32 each): recompute
// P = exp(scale q k^T + mask - lse), dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
// dQ = scale dS K, dK = scale dS^T Q, then scatter into zeros laid out [B, Tq, H, D] (like
// the CPU op and the fake). The float-gate gradient follows the CPU op exactly: sum(dO * out_c)
// for running pairs, 0 for skipped ones unless dense_grad (then their attention output is
// computed here, backward only, by the forward kernel). Not measured: no GPU where this was
// written; a fused backward kernel would avoid materialising the scores.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "launch.h"
#include "../heads.h"
#include "heads_kernels.h"

namespace sparse_ops {
namespace heads {
namespace {

using at::indexing::TensorIndex;

cuda::DType heads_dtype(const Tensor& t) { return cuda::dtype_of(t, "masked_head_attention"); }

void check_cuda(cudaError_t err, const char* kernel) { cuda::check_launch(err, "masked_head_attention", kernel); }

at::ScalarType acc_type(at::ScalarType t) { return (t == at::kFloat || t == at::kDouble) ? t : at::kFloat; }

double softmax_scale(std::optional<double> scale, int64_t D) {
  return scale ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
}

// The kernel reads rows with unit stride on D.
Tensor unit_last(const Tensor& x) { return (x.stride(3) == 1 || x.size(3) == 1) ? x : x.contiguous(); }

Tensor zeros_bthd(int64_t B, int64_t H, int64_t T, int64_t D, const at::TensorOptions& o) {
  return at::zeros({B, T, H, D}, o).transpose(1, 2);
}

// x [B, H, T, D] -> [n, T, D]: the rows of pairs (bi[p], hi[p]).
Tensor gather(const Tensor& x, const Tensor& bi, const Tensor& hi) {
  return x.index({TensorIndex(bi), TensorIndex(hi)});
}

void check_supported(const Tensor& q, const Sizes& s) {
  heads_dtype(q);
  TORCH_CHECK(s.D <= cuda::kHeadsMaxD, "masked_head_attention: head dim D must be at most ", cuda::kHeadsMaxD,
              " on CUDA; got ", s.D);
}

// The forward kernel over `pairs` (int64 [n] on q's device). maskp: the pairs' additive masks
// ([n or 1, 1, mTq, Tk] in q's dtype) or undefined; gate_p: [n] gates or undefined; out: the
// [B, H, Tq, D] output (only the pairs' rows are written) or undefined; out_c: [n, Tq, D]
// contiguous or undefined; lse: [n, Tq] contiguous in the accumulation type.
void run_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pairs, const Tensor& maskp,
                 const Tensor& gate_p, const Tensor& out, const Tensor& out_c, const Tensor& lse, const Sizes& s,
                 bool is_causal, double scale) {
  const int64_t n = pairs.size(0);
  if (n == 0 || s.Tq == 0) return;
  const Tensor qc = unit_last(q), kc = unit_last(k), vc = unit_last(v), pc = pairs.contiguous();
  cuda::HeadsFwdArgs a{};
  a.dtype = heads_dtype(q);
  a.q = qc.data_ptr(); a.k = kc.data_ptr(); a.v = vc.data_ptr();
  a.q_s0 = qc.stride(0); a.q_s1 = qc.stride(1); a.q_s2 = qc.stride(2);
  a.k_s0 = kc.stride(0); a.k_s1 = kc.stride(1); a.k_s2 = kc.stride(2);
  a.v_s0 = vc.stride(0); a.v_s1 = vc.stride(1); a.v_s2 = vc.stride(2);
  a.pairs = pc.data_ptr<int64_t>();
  Tensor mc;
  if (maskp.defined()) {
    mc = (maskp.stride(3) == 1 || s.Tk == 1) ? maskp : maskp.contiguous();
    TORCH_CHECK(mc.dim() == 4 && mc.scalar_type() == q.scalar_type() && (mc.size(0) == 1 || mc.size(0) == n),
                "masked_head_attention: internal error: per-pair mask ", mc.sizes(), " ", mc.scalar_type());
    a.mask = mc.data_ptr();
    a.mask_sp = mc.size(0) == 1 ? 0 : mc.stride(0);
    a.mask_sr = mc.size(2) == 1 ? 0 : mc.stride(2);
  }
  Tensor gc;
  if (gate_p.defined()) {
    gc = gate_p.contiguous();
    a.gate = gc.data_ptr();
  }
  if (out.defined()) {
    TORCH_CHECK(out.stride(3) == 1 || s.D == 1, "masked_head_attention: internal error: output layout");
    a.out = out.data_ptr();
    a.o_s0 = out.stride(0); a.o_s1 = out.stride(1); a.o_s2 = out.stride(2);
  }
  if (out_c.defined()) {
    TORCH_CHECK(out_c.is_contiguous(), "masked_head_attention: internal error: out_c layout");
    a.out_c = out_c.data_ptr();
  }
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == acc_type(q.scalar_type()),
              "masked_head_attention: internal error: lse layout");
  a.lse = lse.data_ptr();
  a.P = n; a.H = s.H; a.Tq = s.Tq; a.Tk = s.Tk; a.D = s.D;
  a.scale = scale;
  a.causal = is_causal;
  check_cuda(cuda::masked_head_attention_fwd(a, at::cuda::getCurrentCUDAStream()), "masked_head_attention_fwd");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> masked_head_attention_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& head_mask, const OptTensor& attn_mask,
    bool is_causal, std::optional<double> scale, bool /*dense_grad*/) {
  const Sizes s = check_inputs(q, k, v, head_mask, attn_mask, is_causal);
  check_supported(q, s);
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = s.B, H = s.H, Tq = s.Tq, D = s.D;
  const bool gated = is_gated(head_mask);
  const auto dt = q.scalar_type();
  const Tensor pairs = running_pairs(run_mask(head_mask, B, H));
  const int64_t P = pairs.size(0);
  const auto lse_opt = q.options().dtype(acc_type(dt));
  if (P == 0 || Tq == 0) {
    return {at::zeros_like(q), pairs, gated ? at::empty({P, Tq, D}, q.options()) : q.new_empty({0}),
            at::empty({P, Tq}, lse_opt)};
  }
  // The output takes q's layout, as on CPU (and as the fake promises).
  Tensor out = at::empty_like(q);
  if (out.stride(3) != 1 && D > 1) out = at::empty({B, H, Tq, D}, q.options());
  if (P < B * H) out.zero_();  // rows of pairs that are off: exact zeros, never computed
  Tensor out_c = gated ? at::empty({P, Tq, D}, q.options()) : q.new_empty({0});
  Tensor lse = at::empty({P, Tq}, lse_opt);
  const Tensor gate_p = gated ? gate_bh(head_mask, B, H, dt).reshape({-1}).index_select(0, pairs) : Tensor();
  const Tensor maskp = mask_for_pairs(mask_4d(attn_mask, s), pairs, H, dt);
  run_forward(q, k, v, pairs, maskp, gate_p, out, gated ? out_c : Tensor(), lse, s, is_causal,
              softmax_scale(scale, D));
  return {out, pairs, out_c, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> masked_head_attention_backward_cuda(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& head_mask,
    const OptTensor& attn_mask, const Tensor& pairs, const Tensor& out, const Tensor& out_c, const Tensor& lse,
    bool is_causal, std::optional<double> scale, bool dense_grad, std::array<bool, 4> need) {
  const Sizes s = check_inputs(q, k, v, head_mask, attn_mask, is_causal);
  check_supported(q, s);
  const int64_t B = s.B, H = s.H, Tq = s.Tq, Tk = s.Tk, D = s.D;
  c10::cuda::CUDAGuard guard(q.device());
  check_backward_saved(s, grad_out, q, head_mask, pairs, out, out_c, lse);
  const bool gated = is_gated(head_mask);
  const bool need_qkv = need[0] || need[1] || need[2];
  const bool need_g = need[3] && gated;
  const auto dt = q.scalar_type();
  const auto acc = acc_type(dt);
  const int64_t P = pairs.size(0);
  const double sc = softmax_scale(scale, D);
  const Tensor mask4 = mask_4d(attn_mask, s);
  const Tensor gate = gated ? gate_bh(head_mask, B, H, dt) : Tensor();
  const Tensor empty = q.new_empty({0});
  const bool work = P > 0 && Tq > 0;

  Tensor bi, hi, gO, Oc;  // gO: un-gated grad_out of the running pairs; Oc: their un-gated outputs
  if (work) {
    bi = at::div(pairs, H, "floor");
    hi = at::remainder(pairs, H);
    gO = gather(grad_out, bi, hi);
    Oc = gated ? out_c.view({P, Tq, D}) : gather(out, bi, hi);
  }
  Tensor dq, dk, dv, dg;
  if (need_qkv) {
    dq = zeros_bthd(B, H, Tq, D, q.options());
    dk = zeros_bthd(B, H, Tk, D, q.options());
    dv = zeros_bthd(B, H, Tk, D, q.options());
  }
  if (need_qkv && work) {
    const Tensor maskp = mask_for_pairs(mask4, pairs, H, dt);
    const Tensor gate_p = gated ? gate.reshape({-1}).index_select(0, pairs).view({P, 1, 1}) : Tensor();
    const Tensor causal =
        is_causal ? at::ones({Tq, Tk}, q.options().dtype(at::kBool)).triu(1) : Tensor();  // key after query
    const Tensor lse_safe =  // a fully masked row (lse = -inf) has P = exp(-inf - inf) = 0
        lse.to(acc).masked_fill(lse.isneginf(), std::numeric_limits<double>::infinity());
    // Chunks of pairs: at most ~2^27 score elements (512 MiB in fp32) per [n, Tq, Tk] matrix.
    const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 27) / std::max<int64_t>(Tq * Tk, 1));
    for (int64_t c0 = 0; c0 < P; c0 += chunk) {
      const int64_t n = std::min(chunk, P - c0);
      const Tensor bc = bi.narrow(0, c0, n), hc = hi.narrow(0, c0, n);
      Tensor dO = gO.narrow(0, c0, n);
      if (gated) dO = dO * gate_p.narrow(0, c0, n);  // in q's dtype, as the CPU op
      dO = dO.to(acc);
      const Tensor Qf = gather(q, bc, hc).to(acc), Kf = gather(k, bc, hc).to(acc), Vf = gather(v, bc, hc).to(acc);
      Tensor S = at::matmul(Qf, Kf.transpose(1, 2)).mul_(sc);  // [n, Tq, Tk]
      if (maskp.defined()) {
        const Tensor mc = maskp.size(0) == 1 ? maskp : maskp.narrow(0, c0, n);
        S.add_(mc.squeeze(1).to(acc));  // [n or 1, mTq, Tk] broadcasts
      }
      if (causal.defined()) S.masked_fill_(causal, -std::numeric_limits<double>::infinity());
      Tensor Pm = S.sub_(lse_safe.narrow(0, c0, n).unsqueeze(-1)).exp_();
      const Tensor dVc = at::matmul(Pm.transpose(1, 2), dO);
      Tensor dP = at::matmul(dO, Vf.transpose(1, 2));
      const Tensor delta = (dO * Oc.narrow(0, c0, n).to(acc)).sum(-1, /*keepdim=*/true);
      const Tensor dS = Pm.mul_(dP.sub_(delta));
      const Tensor dQc = at::matmul(dS, Kf).mul_(sc);
      const Tensor dKc = at::matmul(dS.transpose(1, 2), Qf).mul_(sc);
      dq.index_put_({TensorIndex(bc), TensorIndex(hc)}, dQc.to(dt));
      dk.index_put_({TensorIndex(bc), TensorIndex(hc)}, dKc.to(dt));
      dv.index_put_({TensorIndex(bc), TensorIndex(hc)}, dVc.to(dt));
    }
  }
  if (need_g) {
    dg = at::zeros({B * H}, q.options());
    if (work) dg.index_copy_(0, pairs, (gO * Oc).sum({1, 2}));
    if (dense_grad && Tq > 0) {
      // Pairs a zero gate skipped: their exact gate gradient needs their attention output,
      // computed here (backward only).
      const Tensor skipped = at::nonzero(gate.reshape({-1}).eq(0)).view({-1});
      const int64_t S = skipped.size(0);
      if (S > 0) {
        Tensor os = at::empty({S, Tq, D}, q.options());
        Tensor ls = at::empty({S, Tq}, q.options().dtype(acc));
        run_forward(q, k, v, skipped, mask_for_pairs(mask4, skipped, H, dt), Tensor(), Tensor(), os, ls, s,
                    is_causal, sc);
        const Tensor bs = at::div(skipped, H, "floor"), hs = at::remainder(skipped, H);
        dg.index_copy_(0, skipped, (gather(grad_out, bs, hs) * os).sum({1, 2}));
      }
    }
    dg = dg.view({B, H});
    if (head_mask.dim() == 1) dg = dg.sum(0);
  }
  return {need[0] && dq.defined() ? dq : empty, need[1] && dk.defined() ? dk : empty,
          need[2] && dv.defined() ? dv : empty, need_g ? dg : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CUDA, m) {
  m.impl("masked_head_attention", &masked_head_attention_cuda);
  m.impl("masked_head_attention_backward", &masked_head_attention_backward_cuda);
}

}  // namespace heads
}  // namespace sparse_ops
