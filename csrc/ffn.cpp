// Device-generic gated_ffn: checks, active-column resolution and the gathered-GEMM path.
//
// Many rows (prefill, training): the active rows of w1/w3 and the active columns of w2
// (rows when w2 is transposed) are gathered once per call and two dense GEMMs run on
// the compact [K, d] weights, so the GEMM work is K/F of the dense one. Inactive
// columns are never read. Measured (2-core EPYC, fp32, N=1024, d=768, F=3072):
// gathering 1536 rows of w1 costs 0.1 ms and 1536 columns of w2 0.7 ms, next to
// ~40 ms of GEMM at keep 0.5.
#include "ffn.h"

#include <ATen/Parallel.h>
#include <ATen/ops/gelu_backward.h>

#include <cstring>
#include <unordered_map>
#include <vector>

namespace sparse_ops {
namespace ffn {

Act parse_activation(const std::string& name) {
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "relu") return Act::Relu;
  if (name == "silu") return Act::Silu;
  TORCH_CHECK(false, "gated_ffn: activation must be one of 'gelu', 'gelu_tanh', 'relu', 'silu'; got '",
              name, "'");
}

static void check_same(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "gated_ffn: ", name, " must be on the same device as x (",
              x.device(), "); got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "gated_ffn: ", name,
              " must have the same dtype as x (", x.scalar_type(), "); got ", t.scalar_type());
}

void check_inputs(const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& b1,
                  const OptTensor& b2, const OptTensor& w3, const OptTensor& active,
                  const OptTensor& gate, bool w2_transposed) {
  TORCH_CHECK(x.dim() == 2, "gated_ffn: x must be 2-D [N, d] here (the Python wrapper flattens); got ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gated_ffn: x must be a floating tensor; got ",
              x.scalar_type());
  const int64_t N = x.size(0), d = x.size(1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == d, "gated_ffn: w1 must be [F, d] with d = ", d, "; got ",
              w1.sizes());
  const int64_t F = w1.size(0);
  check_same(w1, x, "w1");
  check_same(w2, x, "w2");
  if (w2_transposed) {
    TORCH_CHECK(w2.dim() == 2 && w2.size(0) == F && w2.size(1) == d,
                "gated_ffn: w2 must be [F, d] = [", F, ", ", d, "] with w2_transposed=True; got ", w2.sizes());
  } else {
    TORCH_CHECK(w2.dim() == 2 && w2.size(0) == d && w2.size(1) == F,
                "gated_ffn: w2 must be [d, F] = [", d, ", ", F, "] (nn.Linear layout); got ", w2.sizes());
  }
  if (b1) {
    check_same(*b1, x, "b1");
    TORCH_CHECK(b1->dim() == 1 && b1->size(0) == F, "gated_ffn: b1 must be [F] = [", F, "]; got ", b1->sizes());
  }
  if (b2) {
    check_same(*b2, x, "b2");
    TORCH_CHECK(b2->dim() == 1 && b2->size(0) == d, "gated_ffn: b2 must be [d] = [", d, "]; got ", b2->sizes());
  }
  if (w3) {
    check_same(*w3, x, "w3");
    TORCH_CHECK(w3->sizes() == w1.sizes(), "gated_ffn: w3 must be [F, d] like w1 ", w1.sizes(), "; got ",
                w3->sizes());
  }
  if (active) {
    const Tensor& a = *active;
    TORCH_CHECK(a.device() == x.device(), "gated_ffn: active must be on the same device as x (", x.device(),
                "); got ", a.device());
    if (a.scalar_type() == at::kBool) {
      TORCH_CHECK((a.dim() == 1 && a.size(0) == F) || (a.dim() == 2 && a.size(0) == N && a.size(1) == F),
                  "gated_ffn: a bool active mask must be [F] = [", F, "] or [N, F] = [", N, ", ", F,
                  "]; got ", a.sizes());
    } else {
      TORCH_CHECK(a.scalar_type() == at::kLong,
                  "gated_ffn: active must be int64 indices or a bool mask; got dtype ", a.scalar_type());
      TORCH_CHECK(a.dim() == 1, "gated_ffn: active indices must be 1-D [K]; got ", a.sizes());
      if (a.numel() > 0) {
        const int64_t lo = a.min().item<int64_t>(), hi = a.max().item<int64_t>();
        TORCH_CHECK(lo >= 0 && hi < F, "gated_ffn: active indices must be in [0, F) = [0, ", F, "); got min ",
                    lo, ", max ", hi);
      }
    }
  }
  if (gate) {
    check_same(*gate, x, "gate");
    TORCH_CHECK((gate->dim() == 1 && gate->size(0) == F) ||
                    (gate->dim() == 2 && gate->size(0) == N && gate->size(1) == F),
                "gated_ffn: gate must be [F] = [", F, "] or [N, F] = [", N, ", ", F, "] here; got ",
                gate->sizes());
  }
}

Tensor effective_mask(int64_t N, int64_t F, const OptTensor& active, const OptTensor& gate,
                      const at::TensorOptions& like, bool include_gate) {
  Tensor m;
  if (active) {
    if (active->scalar_type() == at::kBool) {
      m = *active;
    } else {
      m = at::zeros({F}, like.dtype(at::kBool));
      m.index_fill_(0, *active, true);
    }
  }
  if (gate && include_gate) {
    Tensor g = gate->ne(0);
    m = m.defined() ? at::logical_and(m, g) : g;
  }
  if (!m.defined()) m = at::ones({F}, like.dtype(at::kBool));
  return m;
}

// ------------------------------------------------------------------ row groups
// Rows whose masks are equal (every token of a sample under a per-sample gate, say) form
// a group; each group runs the shared-mask GEMMs on its own columns, so per-row masks
// skip work too instead of running the union of all rows' columns.
// Groups of equal rows of the effective mask m [N, F] (CPU; at least 2 * kMinRowsPerGroup
// rows), or an empty vector when there are more than N / kMinRowsPerGroup groups (then the
// union path with a per-row where() is used). Group columns are positions in idx.
static std::vector<RowGroup> find_row_groups(const Tensor& m, const Tensor& idx, int64_t N) {
  std::vector<RowGroup> out;
  if (!m.is_cpu() || N < 2 * kMinRowsPerGroup) return out;
  const int64_t max_groups = N / kMinRowsPerGroup;
  const Tensor mc = m.contiguous();
  const int64_t F = mc.size(1);
  const bool* p = mc.data_ptr<bool>();
  std::vector<uint64_t> hash(N);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      uint64_t h = 1469598103934665603ull;  // FNV-1a over the row, 8 bytes at a time
      const bool* row = p + n * F;
      int64_t f = 0;
      for (; f + 8 <= F; f += 8) {
        uint64_t w;
        std::memcpy(&w, row + f, 8);
        h = (h ^ w) * 1099511628211ull;
      }
      for (; f < F; ++f) h = (h ^ uint64_t(row[f])) * 1099511628211ull;
      hash[n] = h;
    }
  });
  std::vector<int64_t> rep;  // representative row of each group
  std::vector<std::vector<int64_t>> members;
  std::unordered_map<uint64_t, std::vector<int64_t>> by_hash;  // hash -> group ids
  for (int64_t n = 0; n < N; ++n) {
    auto& cands = by_hash[hash[n]];
    int64_t g = -1;
    for (int64_t c : cands)
      if (std::memcmp(p + rep[c] * F, p + n * F, F) == 0) { g = c; break; }
    if (g < 0) {
      if (int64_t(rep.size()) == max_groups) return {};
      g = int64_t(rep.size());
      rep.push_back(n);
      members.emplace_back();
      cands.push_back(g);
    }
    members[g].push_back(n);
  }
  // Position of each column of F in idx (idx is sorted and unique).
  const Tensor ic = idx.contiguous();
  const int64_t* ip = ic.data_ptr<int64_t>();
  std::vector<int64_t> pos(F, -1);
  for (int64_t k = 0; k < ic.size(0); ++k) pos[ip[k]] = k;
  const auto lopt = at::TensorOptions().dtype(at::kLong);
  for (size_t g = 0; g < rep.size(); ++g) {
    std::vector<int64_t> cols;
    for (int64_t f = 0; f < F; ++f)
      if (p[rep[g] * F + f]) {
        TORCH_CHECK(pos[f] >= 0, "gated_ffn: internal error: a group column is not in idx");
        cols.push_back(pos[f]);
      }
    out.push_back({at::tensor(members[g], lopt), at::tensor(cols, lopt)});
  }
  return out;
}

// Columns idx of a bool [N, F] mask. ATen's index_select along dim 1 of a bool tensor
// measured 7.8 ms at N=1024, F=3072 (2 cores); this row-parallel loop does it in a pass.
static Tensor select_mask_cols(const Tensor& m, const Tensor& idx) {
  if (idx.size(0) == m.size(1)) return m;  // idx is sorted and unique: all columns
  if (!m.is_cpu()) return m.index_select(1, idx);
  const Tensor mc = m.contiguous(), ic = idx.contiguous();
  const int64_t N = mc.size(0), F = mc.size(1), K = ic.size(0);
  Tensor out = at::empty({N, K}, mc.options());
  const bool* src = mc.data_ptr<bool>();
  const int64_t* ip = ic.data_ptr<int64_t>();
  bool* dst = out.data_ptr<bool>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) dst[n * K + k] = src[n * F + ip[k]];
  });
  return out;
}

// Positions of the true entries of a 1-D bool mask, sorted. On CPU one serial pass: at::nonzero
// (a counting pass, then a parallel fill) was ~12% of a whole decode call (N=1, F=3072).
static Tensor mask_indices(const Tensor& m) {
  if (!m.is_cpu()) return at::nonzero(m).view({-1});
  const Tensor mc = m.contiguous();
  const bool* p = mc.data_ptr<bool>();
  const int64_t F = mc.numel();
  int64_t K = 0;
  for (int64_t f = 0; f < F; ++f) K += p[f];
  Tensor idx = at::empty({K}, mc.options().dtype(at::kLong));
  int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t f = 0, k = 0; f < F; ++f)
    if (p[f]) ip[k++] = f;
  return idx;
}

// Shared by forward (idx undefined: computed here) and backward (idx saved by forward).
static Active make_active(int64_t N, int64_t F, const OptTensor& active, const OptTensor& gate,
                          Tensor idx, const at::TensorOptions& like) {
  Active a;
  if (!active && !gate) {
    a.idx = idx.defined() ? idx : at::arange(F, like.dtype(at::kLong));
    a.all = true;
    return a;
  }
  Tensor m = effective_mask(N, F, active, gate, like);
  if (m.dim() == 2 && N == 1) m = m.select(0, 0);  // one row: its mask is a shared one
  if (m.dim() == 2) {
    if (!idx.defined()) idx = mask_indices(m.any(0));
    a.groups = find_row_groups(m, idx, N);
    if (a.groups.empty()) {
      Tensor rm = select_mask_cols(m, idx);
      if (!rm.all().item<bool>()) a.row_mask = rm;
    }
  } else if (!idx.defined()) {
    idx = mask_indices(m);
  }
  a.idx = idx;
  a.all = !a.row_mask.defined() && a.groups.empty() && idx.size(0) == F;
  if (gate) a.gate_a = a.all ? *gate : gate->index_select(gate->dim() - 1, idx);
  return a;
}

Active resolve_active(int64_t N, int64_t F, const OptTensor& active, const OptTensor& gate,
                      const at::TensorOptions& like) {
  return make_active(N, F, active, gate, Tensor(), like);
}

Active active_from_idx(int64_t N, int64_t F, const OptTensor& active, const OptTensor& gate,
                       const Tensor& idx, const at::TensorOptions& like) {
  return make_active(N, F, active, gate, idx, like);
}

Tensor gather_rows(const Tensor& w, const Active& a) {
  return a.all ? w : w.index_select(0, a.idx);
}

Tensor gather_w2(const Tensor& w2, bool w2_transposed, const Active& a) {
  if (a.all) return w2;
  return w2.index_select(w2_transposed ? 0 : 1, a.idx);
}

Tensor apply_act(const Tensor& pre, Act act) {
  switch (act) {
    case Act::Gelu: return at::gelu(pre);
    case Act::GeluTanh: return at::gelu(pre, "tanh");
    case Act::Relu: return at::relu(pre);
    case Act::Silu: return at::silu(pre);
  }
  return pre;
}

Tensor act_backward(const Tensor& grad, const Tensor& pre, Act act) {
  switch (act) {
    case Act::Gelu: return at::gelu_backward(grad, pre);
    case Act::GeluTanh: return at::gelu_backward(grad, pre, "tanh");
    case Act::Relu: return at::threshold_backward(grad, pre, 0);
    case Act::Silu: return at::silu_backward(grad, pre);
  }
  return grad;
}

// The per-row/per-unit factor that multiplies the hidden units: gate, masked per row.
// Masking uses where(), not a multiply, so a non-finite value in a unit that did not run
// (a NaN planted in an inactive weight row, say) never reaches the result.
static Tensor scale_hidden(Tensor h, const Active& a) {
  if (a.gate_a.defined()) h = h.mul_(a.gate_a);
  if (a.row_mask.defined()) h = at::where(a.row_mask, h, at::zeros({}, h.options()));
  return h;
}

// The Active of one group: its columns, no row mask, its rows' gate.
static Active group_active(const Active& a, const RowGroup& g) {
  Active s;
  s.idx = a.idx.index_select(0, g.cols);
  if (a.gate_a.defined()) {
    s.gate_a = a.gate_a.dim() == 1 ? a.gate_a.index_select(0, g.cols)
                                   : a.gate_a.index_select(0, g.rows).index_select(1, g.cols);
  }
  s.all = false;
  return s;
}

// [n_g, k_g] block of a group, placed into rows g.rows and columns g.cols of dst [N, K].
static void place_block(Tensor& dst, const RowGroup& g, const Tensor& block) {
  Tensor rows = at::zeros({block.size(0), dst.size(1)}, dst.options());
  rows.index_copy_(1, g.cols, block);
  dst.index_copy_(0, g.rows, rows);
}

static Tensor take_block(const Tensor& src, const RowGroup& g) {
  return src.index_select(0, g.rows).index_select(1, g.cols);
}

// ------------------------------------------------------------------ forward
static std::tuple<Tensor, Tensor, Tensor> forward_block(
    const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& b1, const OptTensor& b2,
    const OptTensor& w3, Act act, bool w2_transposed, const Active& a) {
  const int64_t N = x.size(0), d = x.size(1);
  if (a.K() == 0 || N == 0) {
    Tensor out = b2 ? b2->expand({N, d}).contiguous() : at::zeros({N, d}, x.options());
    return {out, x.new_zeros({N, a.K()}), w3 ? x.new_zeros({N, a.K()}) : x.new_empty({0})};
  }
  Tensor W1a = gather_rows(w1, a);
  Tensor pre = b1 ? at::addmm(a.all ? *b1 : b1->index_select(0, a.idx), x, W1a.t()) : at::mm(x, W1a.t());
  Tensor up = w3 ? at::mm(x, gather_rows(*w3, a).t()) : x.new_empty({0});
  Tensor h = apply_act(pre, act);
  if (w3) h.mul_(up);
  h = scale_hidden(h, a);
  Tensor W2a = gather_w2(w2, w2_transposed, a);
  Tensor W2m = w2_transposed ? W2a : W2a.t();  // [K, d]
  Tensor out = b2 ? at::addmm(*b2, h, W2m) : at::mm(h, W2m);
  return {out, pre, up};
}

std::tuple<Tensor, Tensor, Tensor> forward_gathered(
    const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& b1, const OptTensor& b2,
    const OptTensor& w3, Act act, bool w2_transposed, const Active& a) {
  const auto& groups = a.groups;
  if (groups.empty()) return forward_block(x, w1, w2, b1, b2, w3, act, w2_transposed, a);
  const int64_t N = x.size(0), d = x.size(1), K = a.K();
  Tensor out = at::empty({N, d}, x.options());
  Tensor pre = at::zeros({N, K}, x.options());
  Tensor up = w3 ? at::zeros({N, K}, x.options()) : x.new_empty({0});
  for (const auto& g : groups) {
    auto r = forward_block(x.index_select(0, g.rows), w1, w2, b1, b2, w3, act, w2_transposed,
                           group_active(a, g));
    out.index_copy_(0, g.rows, std::get<0>(r));
    place_block(pre, g, std::get<1>(r));
    if (w3) place_block(up, g, std::get<2>(r));
  }
  return {out, pre, up};
}

// ------------------------------------------------------------------ backward
// Gradients of one block, compact: dx [n, d], dW1a/dW3a [K, d], dW2a ([K, d] or [d, K]),
// db1a [K], dgate_a ([K] or [n, K], 0 where a row's unit did not run). Any may be undefined
// when not needed.
struct BlockGrads { Tensor dx, dW1a, dW2a, dW3a, db1a, dgate_a; };

static BlockGrads backward_block(const Tensor& grad_out, const Tensor& x, const Tensor& w1,
                                 const Tensor& w2, const OptTensor& b1, const OptTensor& w3,
                                 const Active& a, const Tensor& pre, const Tensor& up, Act act,
                                 bool w2_transposed, bool need_x, bool need_w, bool need_g) {
  BlockGrads r;
  if (a.K() == 0 || x.size(0) == 0) return r;
  const Tensor zero = at::zeros({}, x.options());
  auto masked = [&](Tensor t) { return a.row_mask.defined() ? at::where(a.row_mask, t, zero) : t; };
  Tensor W2a = gather_w2(w2, w2_transposed, a);
  Tensor dhg = w2_transposed ? at::mm(grad_out, W2a.t()) : at::mm(grad_out, W2a);  // [n, K]
  Tensor act_v = apply_act(pre, act);
  Tensor h = w3 ? act_v * up : act_v;
  if (need_g) r.dgate_a = masked(dhg * h);
  if (need_w) {
    // h's last use was the gate gradient above, and act_v (which h aliases without w3) is
    // read again below only with w3: scaling h in place is safe and saves an [n, K] copy.
    Tensor hg = scale_hidden(h, a);
    r.dW2a = w2_transposed ? at::mm(hg.t(), grad_out) : at::mm(grad_out.t(), hg);
  }
  if (need_x || need_w) {
    Tensor dh = masked(a.gate_a.defined() ? dhg.mul_(a.gate_a) : dhg);
    Tensor dup, dact = dh;
    if (w3) {
      dup = masked(dh * act_v);
      dact = dh * up;
    }
    Tensor dpre = masked(act_backward(dact, pre, act));
    if (need_x) {
      r.dx = at::mm(dpre, gather_rows(w1, a));
      if (w3) r.dx.addmm_(dup, gather_rows(*w3, a));
    }
    if (need_w) {
      r.dW1a = at::mm(dpre.t(), x);
      if (w3) r.dW3a = at::mm(dup.t(), x);
      if (b1) r.db1a = dpre.sum(0);
    }
  }
  return r;
}

// dst[idx] (+)= src along dim; a copy when every column ran (idx = arange).
static void scatter_cols(Tensor& dst, int64_t dim, const Tensor& idx, const Tensor& src, bool all,
                         bool accumulate) {
  if (!src.defined()) return;
  if (all) dst.copy_(src);
  else if (accumulate) dst.index_add_(dim, idx, src);
#ifdef SPARSE_OPS_WITH_CUDA
  else if (dst.is_cuda()) cuda_scatter(dst, dim, idx, src);
#endif
  else dst.index_copy_(dim, idx, src);
}

// Exact gate gradient for every unit the bool mask allows, the ones a zero gate skipped
// included: those are computed here, in backward only (dense_grad=True).
static void dense_gate_grad(Tensor& dgate, const Tensor& grad_out, const Tensor& x, const Tensor& w1,
                            const Tensor& w2, const OptTensor& b1, const OptTensor& w3,
                            const OptTensor& active, Act act, bool w2_transposed) {
  const int64_t N = x.size(0), F = w1.size(0);
  const Tensor zero = at::zeros({}, x.options());
  Tensor pre_f = b1 ? at::addmm(*b1, x, w1.t()) : at::mm(x, w1.t());
  Tensor h_f = apply_act(pre_f, act);
  if (w3) h_f.mul_(at::mm(x, w3->t()));
  Tensor dhg_f = w2_transposed ? at::mm(grad_out, w2.t()) : at::mm(grad_out, w2);
  Tensor gp = dhg_f.mul_(h_f);
  if (active) gp = at::where(effective_mask(N, F, active, std::nullopt, x.options()), gp, zero);
  dgate.copy_(dgate.dim() == 1 ? gp.sum(0) : gp);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_gathered(
    const Tensor& grad_out_in, const Tensor& x, const Tensor& w1, const Tensor& w2,
    const OptTensor& b1, const OptTensor& w3, const OptTensor& active, const OptTensor& gate,
    const Tensor& idx, const Tensor& pre, const Tensor& up, Act act, bool w2_transposed,
    bool dense_grad, const std::array<bool, 3>& need) {
  const int64_t N = x.size(0), F = w1.size(0);
  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor empty = x.new_empty({0});
  Active a = active_from_idx(N, F, active, gate, idx, x.options());
  const bool need_x = need[0], need_w = need[1], need_g = need[2] && gate.has_value();
  const bool gate_rows = need_g && gate->dim() == 2;

  const bool gate_grad_here = need_g && !dense_grad;
  const int64_t w2_dim = w2_transposed ? 0 : 1;
  Tensor db2 = need_w ? grad_out.sum(0) : empty;
  // Zero-filled gradients only where part of them stays zero: with every column active the
  // block's results are the full gradients and are returned as they are (zero-fill + copy of
  // w1/w2-sized tensors cost ~9% of a dense fwd+bwd step at N=1024, d=768, F=3072).
  auto zeros_if = [&](bool needed, const Tensor& like) { return needed ? at::zeros_like(like) : empty; };

  Tensor dgate = zeros_if(need_g, need_g ? *gate : x);
  Tensor dx, dw1, dw2, dw3, db1;
  const auto& groups = a.groups;
  if (groups.empty()) {
    BlockGrads r = backward_block(grad_out, x, w1, w2, b1, w3, a, pre, up, act, w2_transposed,
                                  need_x, need_w, gate_grad_here);
    // dx: the block covers every row (shared mask); it is undefined only when no column ran.
    dx = !need_x ? empty : r.dx.defined() ? r.dx : at::zeros_like(x);
    auto full = [&](bool needed, const Tensor& like, int64_t dim, const Tensor& src) {
      if (!needed) return empty;
      if (a.all && src.defined()) return src;
      if (like.is_cpu() && like.dim() == 2 && src.defined())
        return scatter_into_zeros(like, dim, idx, src);
      Tensor dst = at::zeros_like(like);
      scatter_cols(dst, dim, idx, src, false, false);
      return dst;
    };
    dw1 = full(need_w, w1, 0, r.dW1a);
    dw2 = full(need_w, w2, w2_dim, r.dW2a);
    dw3 = w3 ? full(need_w, *w3, 0, r.dW3a) : empty;
    db1 = b1 ? full(need_w, *b1, 0, r.db1a) : empty;
    if (r.dgate_a.defined()) {
      Tensor ga = gate_rows ? r.dgate_a : r.dgate_a.sum(0);
      scatter_cols(dgate, gate->dim() - 1, idx, ga, a.all, false);
    }
  } else {
    dx = zeros_if(need_x, x);
    dw1 = zeros_if(need_w, w1);
    dw2 = zeros_if(need_w, w2);
    dw3 = zeros_if(need_w && w3.has_value(), w3 ? *w3 : w1);
    db1 = zeros_if(need_w && b1.has_value(), b1 ? *b1 : w1);
    for (const auto& g : groups) {
      Active s = group_active(a, g);
      const Tensor& cols = s.idx;  // columns of w1 that ran for this group
      BlockGrads r = backward_block(grad_out.index_select(0, g.rows), x.index_select(0, g.rows), w1,
                                    w2, b1, w3, s, take_block(pre, g),
                                    w3 ? take_block(up, g) : up, act, w2_transposed, need_x, need_w,
                                    gate_grad_here);
      if (r.dx.defined()) dx.index_copy_(0, g.rows, r.dx);
      scatter_cols(dw1, 0, cols, r.dW1a, false, true);
      scatter_cols(dw2, w2_dim, cols, r.dW2a, false, true);
      scatter_cols(dw3, 0, cols, r.dW3a, false, true);
      scatter_cols(db1, 0, cols, r.db1a, false, true);
      if (r.dgate_a.defined()) {
        if (gate_rows) {
          Tensor rows = at::zeros({r.dgate_a.size(0), F}, x.options());
          rows.index_copy_(1, cols, r.dgate_a);
          dgate.index_copy_(0, g.rows, rows);
        } else {
          dgate.index_add_(0, cols, r.dgate_a.sum(0));
        }
      }
    }
  }
  if (need_g && dense_grad && N > 0) dense_gate_grad(dgate, grad_out, x, w1, w2, b1, w3, active, act,
                                                     w2_transposed);
  return {dx, dw1, dw2, dw3, db1, db2, dgate};
}

}  // namespace ffn
}  // namespace sparse_ops
