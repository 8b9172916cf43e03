// CPU kernels of masked_head_attention: only the running (sample, head) pairs are computed,
// forward and backward.
//
// The running pairs of q, k, v ([B, H, T, D], any strides with unit stride on D: the
// [B, T, H, D] layout a fused QKV projection produces is read in place) are gathered into
// contiguous [P, 1, T, D] blocks by one parallel memcpy pass, ATen's CPU flash attention
// (at::_scaled_dot_product_flash_attention_for_cpu, and its _backward) runs on the P pairs,
// and one parallel pass writes the result into the output: copies (scaled by the gate) for
// running pairs, zeros for the others, each output row written once. The output is laid
// out [B, Tq, H, D] (returned as its [B, H, Tq, D] transpose), like ATen's own SDPA output,
// so `out.transpose(1, 2).reshape(B, Tq, H * D)` for the out-projection is a view.
// With every pair running there is nothing to gather: flash attention runs on q, k, v as
// they are.
//
// Why 4-D [P, 1, T, D]: F.scaled_dot_product_attention on 3-D [P, T, D] takes the slow
// math path; the 4-D form takes the flash kernel (DESIGN.md).
// Gather choice, measured (B=8, H=12, T=256, D=64, keep 0.5, fp32, 2 cores; q, k, v in the
// [B, T, H, D] projection layout): this memcpy loop gathers q, k and v in 0.30 ms; the
// alternative, at::index_select on a [B*H, T, D] view, needs a contiguous copy of the whole
// tensor first for that layout and took 1.9 ms (6.3x slower); next to ~13 ms of attention.
// Forward: out, pairs, out_c (the un-gated outputs of the running pairs, saved for backward
// only when the mask is a float gate; with a bool mask they are read back from out), lse.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "../heads.h"

namespace sparse_ops {
namespace heads {
namespace {

constexpr int64_t kGrainBytes = 1 << 15;

int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(row_bytes, 1)); }

// Scratch memory for the gathered pairs, kept per thread across calls. Fresh allocations of
// this size are mmapped and page-faulted in on every call: perf showed clear_page_erms at 15%
// of the op at keep 0.5 (B=8, H=12, T=256, D=64, 1 thread), ~4 ms of 18 ms. Reusing the
// buffer removes those faults. The gathered tensors are views of it that never leave a call.
class Workspace {
 public:
  explicit Workspace(int64_t bytes) {
    static thread_local Tensor buf;
    if (!buf.defined() || buf.numel() < bytes) buf = at::empty({std::max<int64_t>(bytes, 1)}, at::kByte);
    base_ = static_cast<char*>(buf.data_ptr());
    cap_ = buf.numel();
  }
  // An uninitialised contiguous tensor of the given sizes carved from the buffer.
  Tensor take(at::IntArrayRef sizes, const at::TensorOptions& opt) {
    int64_t n = 1;
    for (auto v : sizes) n *= v;
    const int64_t bytes = ((n * opt.dtype().itemsize() + 63) / 64) * 64;
    TORCH_CHECK(used_ + bytes <= cap_, "masked_head_attention: internal error: workspace too small");
    Tensor t = at::from_blob(base_ + used_, sizes, opt);
    used_ += bytes;
    return t;
  }
  static int64_t bytes_for(int64_t n, const Tensor& like) { return ((n * like.element_size() + 63) / 64) * 64; }

 private:
  char* base_ = nullptr;
  int64_t cap_ = 0, used_ = 0;
};

// x [B, H, T, D] (any strides) -> [P, 1, T, D] contiguous: the rows of the given pairs, written
// into `out` when it is given (a workspace tensor), else into a fresh tensor.
Tensor gather_pairs(const Tensor& x_in, const Tensor& pairs, Workspace* ws = nullptr) {
  const Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  const int64_t H = x.size(1), T = x.size(2), D = x.size(3), P = pairs.size(0);
  Tensor out = ws ? ws->take({P, 1, T, D}, x.options()) : at::empty({P, 1, T, D}, x.options());
  if (P == 0 || T == 0 || D == 0) return out;
  const Tensor pc = pairs.contiguous();
  const int64_t* pp = pc.data_ptr<int64_t>();
  const int64_t es = x.element_size(), s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  const size_t bytes = D * es;
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, P * T, grain_rows(bytes), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t p = r / T, t = r % T, b = pp[p] / H, h = pp[p] % H;
      std::memcpy(dst + r * bytes, src + (b * s0 + h * s1 + t * s2) * es, bytes);
    }
  });
  return out;
}

template <typename T>
inline void scale_row(T* dst, const T* row, T g, int64_t D) {
#pragma omp simd
  for (int64_t e = 0; e < D; ++e) dst[e] = row[e] * g;
}

// out [B, H, T, D] (any layout with unit stride on D) <- src [P, 1, T, D]: the pairs' rows (times
// g[p] when g is defined), zeros elsewhere. Every output row is written once.
void scatter_pairs_into(const Tensor& out, const Tensor& src_in, const Tensor& pairs, const Tensor& g) {
  if (out.numel() == 0) return;
  TORCH_CHECK(out.stride(3) == 1 || out.size(3) == 1, "masked_head_attention: internal error: output layout");
  const Tensor src = src_in.stride(3) == 1 ? src_in : src_in.contiguous();
  const int64_t B = out.size(0), H = out.size(1), T = out.size(2), D = out.size(3), P = pairs.size(0);
  const Tensor pc = pairs.contiguous();
  const int64_t* pp = pc.data_ptr<int64_t>();
  std::vector<int64_t> pos(B * H, -1);
  for (int64_t p = 0; p < P; ++p) pos[pp[p]] = p;
  const int64_t sp = src.stride(0), st = src.stride(2);
  const int64_t o0 = out.stride(0), o1 = out.stride(1), o2 = out.stride(2);
  const Tensor gc = g.defined() ? g.contiguous() : g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scatter_pairs", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    const scalar_t* gp = gc.defined() ? gc.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * H * T, grain_rows(D * sizeof(scalar_t)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t bh = r / T, t = r % T, p = pos[bh];
        scalar_t* dst = o + (bh / H) * o0 + (bh % H) * o1 + t * o2;
        if (p < 0) {
          std::memset(dst, 0, D * sizeof(scalar_t));
          continue;
        }
        const scalar_t* row = s + p * sp + t * st;
        if (!gp) {
          std::memcpy(dst, row, D * sizeof(scalar_t));
        } else {
          scale_row(dst, row, gp[p], D);
        }
      }
    });
  });
}

// Gradients come back laid out [B, T, H, D], like ATen's flash backward.
Tensor scatter_pairs(const Tensor& src, const Tensor& pairs, int64_t B, int64_t H, const Tensor& g) {
  Tensor out = at::empty({B, src.size(2), H, src.size(3)}, src.options()).transpose(1, 2);
  scatter_pairs_into(out, src, pairs, g);
  return out;
}

// An undefined tensor as an absent optional (ATen's kernels check a present mask's dtype).
OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

at::ScalarType acc_type(at::ScalarType t) {
  return (t == at::kFloat || t == at::kDouble) ? t : at::kFloat;
}

Tensor zeros_bthd(int64_t B, int64_t H, int64_t T, int64_t D, const at::TensorOptions& o) {
  return at::zeros({B, T, H, D}, o).transpose(1, 2);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> masked_head_attention_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& head_mask, const OptTensor& attn_mask,
    bool is_causal, std::optional<double> scale, bool /*dense_grad*/) {
  const Sizes s = check_inputs(q, k, v, head_mask, attn_mask);
  const int64_t B = s.B, H = s.H, Tq = s.Tq, D = s.D;
  const bool gated = is_gated(head_mask);
  const auto dt = q.scalar_type();
  const Tensor pairs = running_pairs(run_mask(head_mask, B, H));
  const int64_t P = pairs.size(0);
  const auto lse_opt = q.options().dtype(acc_type(dt));
  if (P == 0 || Tq == 0) {
    return {at::zeros_like(q), pairs,
            gated ? at::empty({P, Tq, D}, q.options()) : q.new_empty({0}), at::empty({P, Tq}, lse_opt)};
  }
  const Tensor mask4 = mask_4d(attn_mask, s);
  if (P == B * H) {  // every pair runs: flash attention on q, k, v as they are
    auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, opt(additive(mask4, dt)),
                                                                  scale);
    Tensor lse = l.reshape({P, Tq});
    if (!gated) return {o, pairs, q.new_empty({0}), lse};
    Tensor out = at::empty_like(q);
    at::mul_out(out, o, gate_bh(head_mask, B, H, dt).view({B, H, 1, 1}));
    return {out, pairs, o.reshape({P, Tq, D}), lse};
  }
  Workspace ws(Workspace::bytes_for(P * Tq * D, q) + 2 * Workspace::bytes_for(P * s.Tk * D, q));
  const Tensor qc = gather_pairs(q, pairs, &ws), kc = gather_pairs(k, pairs, &ws), vc = gather_pairs(v, pairs, &ws);
  auto [oc, lc] = at::_scaled_dot_product_flash_attention_for_cpu(qc, kc, vc, 0.0, is_causal,
                                                                  opt(mask_for_pairs(mask4, pairs, H, dt)), scale);
  const Tensor gc = gated ? gate_bh(head_mask, B, H, dt).reshape({-1}).index_select(0, pairs) : Tensor();
  // The output takes q's layout, as ATen's flash kernel does (at::empty_like(q)).
  Tensor out = at::empty_like(q);
  if (out.stride(3) != 1 && D > 1) out = at::empty({B, H, Tq, D}, q.options());
  scatter_pairs_into(out, oc, pairs, gc);
  return {out, pairs, gated ? oc.reshape({P, Tq, D}) : q.new_empty({0}), lc.reshape({P, Tq})};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> masked_head_attention_backward_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& head_mask,
    const OptTensor& attn_mask, const Tensor& pairs, const Tensor& out, const Tensor& out_c, const Tensor& lse,
    bool is_causal, std::optional<double> scale, bool dense_grad, std::array<bool, 4> need) {
  const Sizes s = check_inputs(q, k, v, head_mask, attn_mask);
  const int64_t B = s.B, H = s.H, Tq = s.Tq, Tk = s.Tk, D = s.D;
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "masked_head_attention_backward: grad_out must be shaped like q ",
              q.sizes(), "; got ", grad_out.sizes());
  TORCH_CHECK(pairs.scalar_type() == at::kLong && pairs.dim() == 1,
              "masked_head_attention_backward: pairs must be int64 [P]; got ", pairs.scalar_type(), " ",
              pairs.sizes());
  const bool gated = is_gated(head_mask);
  const bool need_qkv = need[0] || need[1] || need[2];
  const bool need_g = need[3] && gated;
  const auto dt = q.scalar_type();
  const int64_t P = pairs.size(0);
  const Tensor mask4 = mask_4d(attn_mask, s);
  const Tensor gate = gated ? gate_bh(head_mask, B, H, dt) : Tensor();
  const Tensor empty = q.new_empty({0});
  Tensor dq, dk, dv, dg;  // dg: gate gradient [B, H]
  const bool work = P > 0 && Tq > 0;
  if (work && P == B * H) {
    const Tensor O = gated ? out_c.view({B, H, Tq, D}) : out;
    if (need_qkv) {
      const Tensor dO = gated ? grad_out * gate.view({B, H, 1, 1}) : grad_out;
      std::tie(dq, dk, dv) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          dO, q, k, v, O, lse.view({B, H, Tq}), 0.0, is_causal, opt(additive(mask4, dt)), scale);
    }
    if (need_g) dg = (grad_out * O).sum({2, 3});
  } else {
    Workspace ws(work ? 3 * Workspace::bytes_for(P * Tq * D, q) + 2 * Workspace::bytes_for(P * Tk * D, q) : 0);
    const Tensor gc_out = work ? gather_pairs(grad_out, pairs, &ws) : Tensor();
    Tensor Oc;
    if (work) Oc = gated ? out_c.view({P, 1, Tq, D}) : gather_pairs(out, pairs, &ws);
    if (need_qkv) {
      if (work) {
        const Tensor dOc = gated ? gc_out * gate.reshape({-1}).index_select(0, pairs).view({P, 1, 1, 1}) : gc_out;
        auto [dqc, dkc, dvc] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
            dOc, gather_pairs(q, pairs, &ws), gather_pairs(k, pairs, &ws), gather_pairs(v, pairs, &ws), Oc, lse.view({P, 1, Tq}),
            0.0, is_causal, opt(mask_for_pairs(mask4, pairs, H, dt)), scale);
        dq = scatter_pairs(dqc, pairs, B, H, Tensor());
        dk = scatter_pairs(dkc, pairs, B, H, Tensor());
        dv = scatter_pairs(dvc, pairs, B, H, Tensor());
      } else {
        dq = zeros_bthd(B, H, Tq, D, q.options());
        dk = zeros_bthd(B, H, Tk, D, q.options());
        dv = zeros_bthd(B, H, Tk, D, q.options());
      }
    }
    if (need_g) {
      dg = at::zeros({B * H}, q.options());
      if (work) dg.index_copy_(0, pairs, (gc_out * Oc).sum({1, 2, 3}));
      if (dense_grad && Tq > 0) {
        // Pairs a zero gate skipped: their exact gate gradient needs their attention output,
        // computed here (backward only).
        const Tensor skipped = at::nonzero(gate.reshape({-1}).eq(0)).view({-1});
        const int64_t S = skipped.size(0);
        if (S > 0) {
          auto [os, ls] = at::_scaled_dot_product_flash_attention_for_cpu(
              gather_pairs(q, skipped), gather_pairs(k, skipped), gather_pairs(v, skipped), 0.0, is_causal,
              opt(mask_for_pairs(mask4, skipped, H, dt)), scale);
          dg.index_copy_(0, skipped, (gather_pairs(grad_out, skipped) * os).sum({1, 2, 3}));
        }
      }
      dg = dg.view({B, H});
    }
  }
  if (need_g && head_mask.dim() == 1) dg = dg.sum(0);
  return {need[0] && dq.defined() ? dq : empty, need[1] && dk.defined() ? dk : empty,
          need[2] && dv.defined() ? dv : empty, need_g ? dg : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CPU, m) {
  m.impl("masked_head_attention", &masked_head_attention_cpu);
  m.impl("masked_head_attention_backward", &masked_head_attention_backward_cpu);
}

}  // namespace heads
}  // namespace sparse_ops
