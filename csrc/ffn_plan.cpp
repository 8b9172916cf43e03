// Device-generic planning of gated_ffn: checks, which columns run (idx), per-row masks and
// the CPU row groups. The forward's plan is returned to autograd (idx, row_mask, row_group)
// and the backward rebuilds it from those alone.
//
// Host synchronisation on CUDA: none for active = None or int64 indices without a gate (the
// indices are sorted and checked on the device); a bool mask or a gate needs one, for the
// count of running columns (mask_indices). The backward needs none.
#include "ffn_plan.h"

#include <ATen/Parallel.h>

#include <algorithm>
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
  if (name == "identity") return Act::Identity;
  TORCH_CHECK(false, "gated_ffn: activation must be one of 'gelu', 'gelu_tanh', 'relu', 'silu', 'identity'; got '",
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
      // Their values (distinct, in [0, F)) are checked by sorted_indices, when the plan is made.
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

bool is_per_row(const OptTensor& active, const OptTensor& gate) {
  return (active && active->scalar_type() == at::kBool && active->dim() == 2) || (gate && gate->dim() == 2);
}

void check_backward_inputs(const Tensor& grad_out, const Tensor& x, const Tensor& w1, const OptTensor& w3,
                           const OptTensor& active, const OptTensor& gate, const Tensor& idx, const Tensor& pre,
                           const Tensor& up, const Tensor& row_mask, const Tensor& row_group) {
  const int64_t N = x.size(0), d = x.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == d,
              "gated_ffn_backward: grad_out must be [N, d] = [", N, ", ", d, "]; got ", grad_out.sizes());
  check_same(grad_out, x, "grad_out");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1,
              "gated_ffn_backward: idx must be int64 [K] (saved by gated_ffn); got ", idx.scalar_type(), " ",
              idx.sizes());
  TORCH_CHECK(idx.device() == x.device(), "gated_ffn_backward: idx must be on the same device as x (", x.device(),
              "); got ", idx.device());
  const int64_t K = idx.size(0);
  TORCH_CHECK(K <= w1.size(0), "gated_ffn_backward: idx must have at most F = ", w1.size(0), " entries; got ", K);
  TORCH_CHECK(pre.dim() == 2 && pre.size(0) == N && pre.size(1) == K,
              "gated_ffn_backward: pre must be [N, K] = [", N, ", ", K, "] (saved by gated_ffn); got ", pre.sizes());
  check_same(pre, x, "pre");
  if (w3) {
    TORCH_CHECK(up.dim() == 2 && up.size(0) == N && up.size(1) == K,
                "gated_ffn_backward: up must be [N, K] = [", N, ", ", K, "] with w3 (saved by gated_ffn); got ",
                up.sizes());
    check_same(up, x, "up");
  }
  const bool per_row = is_per_row(active, gate);
  TORCH_CHECK(row_mask.device() == x.device() && row_group.device() == x.device(),
              "gated_ffn_backward: row_mask and row_group must be on the same device as x (", x.device(), "); got ",
              row_mask.device(), " and ", row_group.device());
  if (per_row) {
    TORCH_CHECK(row_mask.scalar_type() == at::kBool && row_mask.dim() == 2 && row_mask.size(0) == N &&
                    row_mask.size(1) == K,
                "gated_ffn_backward: row_mask must be bool [N, K] = [", N, ", ", K,
                "] for a per-row active mask or gate (saved by gated_ffn); got ", row_mask.scalar_type(), " ",
                row_mask.sizes());
    TORCH_CHECK(row_group.scalar_type() == at::kLong && row_group.dim() == 1 && row_group.size(0) == N,
                "gated_ffn_backward: row_group must be int64 [N] = [", N,
                "] for a per-row active mask or gate (saved by gated_ffn); got ", row_group.scalar_type(), " ",
                row_group.sizes());
  } else {
    TORCH_CHECK(row_mask.scalar_type() == at::kBool && row_mask.dim() == 1 && row_mask.size(0) == 0,
                "gated_ffn_backward: row_mask must be bool [0] without a per-row active mask or gate (saved by "
                "gated_ffn); got ", row_mask.scalar_type(), " ", row_mask.sizes());
    TORCH_CHECK(row_group.scalar_type() == at::kLong && row_group.dim() == 1 && row_group.size(0) == 0,
                "gated_ffn_backward: row_group must be int64 [0] without a per-row active mask or gate (saved by "
                "gated_ffn); got ", row_group.scalar_type(), " ", row_group.sizes());
  }
}

// The int64 indices of `active`, sorted, after checking they are distinct and in [0, F).
// CPU: on the host, with an error naming the offending value. CUDA: on the device (a host
// check would wait for it): the sorted indices must start at >= 0, end below F and increase
// strictly, else the device-side assert fires (asynchronously; the CUDA context is then lost).
static Tensor sorted_indices(const Tensor& active, int64_t F) {
  const int64_t K = active.size(0);
  if (!active.is_cpu()) {
    Tensor s = std::get<0>(at::sort(active));
    if (K > 0) {
      Tensor ok = s.select(0, 0).ge(0).logical_and_(s.select(0, K - 1).lt(F));
      if (K > 1) ok.logical_and_(s.slice(0, 1).gt(s.slice(0, 0, K - 1)).all());
      at::_assert_async(ok, "gated_ffn: active indices must be distinct and in [0, F)");
    }
    return s;
  }
  Tensor s = active.clone(at::MemoryFormat::Contiguous);
  int64_t* p = s.data_ptr<int64_t>();
  std::sort(p, p + K);
  if (K > 0) {
    TORCH_CHECK(p[0] >= 0 && p[K - 1] < F, "gated_ffn: active indices must be in [0, F) = [0, ", F, "); got min ",
                p[0], ", max ", p[K - 1]);
  }
  for (int64_t k = 1; k < K; ++k)
    TORCH_CHECK(p[k] != p[k - 1], "gated_ffn: active indices must be distinct; got ", p[k], " more than once");
  return s;
}

Tensor active_mask(int64_t F, const OptTensor& active, const at::TensorOptions& like) {
  if (!active) return at::ones({F}, like.dtype(at::kBool));
  if (active->scalar_type() == at::kBool) return *active;
  Tensor m = at::zeros({F}, like.dtype(at::kBool));
  m.index_fill_(0, *active, true);
  return m;
}

// ------------------------------------------------------------------ mask helpers
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
  // CUDA: nonzero waits for the device (its result's size is the count of true entries): the
  // one host synchronisation of a call with a bool mask or a gate.
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

// The columns of a bool [N, F] mask true in some row. On CPU one pass ORing rows 8 bytes at a
// time (bools are bytes 0 / 1): at::any(m, 0) took 2.3-3.2 ms at N=4096, F=1536 (2 threads).
static Tensor any_rows(const Tensor& m) {
  if (!m.is_cpu()) return m.any(0);
  const Tensor mc = m.contiguous();
  const int64_t N = mc.size(0), F = mc.size(1);
  Tensor out = at::zeros({F}, mc.options());
  bool* op = out.data_ptr<bool>();
  const bool* p = mc.data_ptr<bool>();
  const int64_t W = F / 8;
  std::vector<uint64_t> acc(size_t(W), 0);
  for (int64_t n = 0; n < N; ++n) {
    const bool* row = p + n * F;
    for (int64_t w = 0; w < W; ++w) {
      uint64_t v;
      std::memcpy(&v, row + w * 8, 8);
      acc[size_t(w)] |= v;
    }
    for (int64_t f = W * 8; f < F; ++f) op[f] = op[f] || row[f];
  }
  for (int64_t w = 0; w < W; ++w) std::memcpy(op + w * 8, &acc[size_t(w)], 8);
  return out;
}

// Whether every entry of a CPU bool tensor is true (one memchr pass; bools are bytes 0 / 1).
static bool all_true_cpu(const Tensor& m) {
  if (m.numel() == 0) return true;
  const Tensor mc = m.contiguous();
  return std::memchr(mc.data_ptr<bool>(), 0, size_t(mc.numel())) == nullptr;
}

static Tensor no_rows(const at::TensorOptions& like, at::ScalarType t) { return at::empty({0}, like.dtype(t)); }

// at::full for the small plan tensors: on CPU filled in place. With at::ones / at::full the two
// plan tensors added 2.8 us to an N=1 per-row call, filled here 1.3 us (medians, d=16, F=64,
// one thread, alternating with the build before the plan was returned).
template <typename T>
static Tensor filled(at::IntArrayRef sizes, T value, const at::TensorOptions& opt) {
  if (!opt.device().is_cpu()) return at::full(sizes, value, opt);
  Tensor t = at::empty(sizes, opt);
  std::fill_n(t.data_ptr<T>(), t.numel(), value);
  return t;
}

// ------------------------------------------------------------------ row groups
// Rows whose masks are equal (every token of a sample under a per-sample gate, say) form
// a group; each group runs the shared-mask GEMMs on its own columns, so per-row masks
// skip work too instead of running the union of all rows' columns.
// Groups of equal rows of the effective mask m [N, F] (CPU; at least 2 * kMinRowsPerGroup
// rows), or an empty vector when there are more than N / kMinRowsPerGroup groups (then the
// union path with a per-row where() is used). Group columns are positions in idx. When
// groups are found, a.saved_group gets each row's group id and a.saved_mask the rows' masks
// at idx (each group's pattern copied into its rows).
static std::vector<RowGroup> find_row_groups(const Tensor& m, const Tensor& idx, int64_t N, Active& a) {
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
  std::vector<int64_t> group_of(N);
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
    group_of[n] = g;
  }
  // Position of each column of F in idx (idx is sorted and unique).
  const Tensor ic = idx.contiguous();
  const int64_t* ip = ic.data_ptr<int64_t>();
  const int64_t K = ic.size(0);
  std::vector<int64_t> pos(F, -1);
  for (int64_t k = 0; k < K; ++k) pos[ip[k]] = k;
  const auto lopt = at::TensorOptions().dtype(at::kLong);
  std::vector<uint8_t> pattern(size_t(rep.size()) * K, 0);  // each group's row of the mask at idx
  for (size_t g = 0; g < rep.size(); ++g) {
    std::vector<int64_t> cols;
    for (int64_t f = 0; f < F; ++f)
      if (p[rep[g] * F + f]) {
        TORCH_CHECK(pos[f] >= 0, "gated_ffn: internal error: a group column is not in idx");
        cols.push_back(pos[f]);
        pattern[g * K + pos[f]] = 1;
      }
    out.push_back({at::tensor(members[g], lopt), at::tensor(cols, lopt)});
  }
  a.saved_group = at::tensor(group_of, lopt);
  a.saved_mask = at::empty({N, K}, mc.options());
  if (K > 0) {
    bool* dst = a.saved_mask.data_ptr<bool>();
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) std::memcpy(dst + n * K, pattern.data() + group_of[n] * K, size_t(K));
    });
  }
  return out;
}

// The groups saved by a forward call: rows of group g are those with row_group == g, its
// columns the true entries of its first row's row_mask. Every row must carry an id in
// [0, N) and the same mask as its group's first row (the op is public: checked, N * K bytes).
static std::vector<RowGroup> groups_from_plan(const Tensor& row_mask, const Tensor& row_group) {
  const Tensor rm = row_mask.contiguous(), rg = row_group.contiguous();
  const int64_t N = rm.size(0), K = rm.size(1);
  const bool* mp = rm.data_ptr<bool>();
  const int64_t* gp = rg.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> members;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t g = gp[n];
    TORCH_CHECK(g >= 0 && g < N, "gated_ffn_backward: row_group must be -1 for every row or a group id in ",
                "[0, N) = [0, ", N, ") for every row (saved by gated_ffn); got ", g, " at row ", n);
    if (g >= int64_t(members.size())) members.resize(size_t(g) + 1);
    auto& rows = members[size_t(g)];
    if (!rows.empty() && K > 0)
      TORCH_CHECK(std::memcmp(mp + rows[0] * K, mp + n * K, size_t(K)) == 0,
                  "gated_ffn_backward: rows ", rows[0], " and ", n, " share row_group ", g,
                  " but not their row_mask (saved by gated_ffn)");
    rows.push_back(n);
  }
  const auto lopt = at::TensorOptions().dtype(at::kLong);
  std::vector<RowGroup> out;
  for (const auto& rows : members) {
    if (rows.empty()) continue;
    std::vector<int64_t> cols;
    const bool* first = mp + rows[0] * K;
    for (int64_t k = 0; k < K; ++k)
      if (first[k]) cols.push_back(k);
    out.push_back({at::tensor(rows, lopt), at::tensor(cols, lopt)});
  }
  return out;
}

// ------------------------------------------------------------------ plans
static void finish(Active& a, int64_t F, const OptTensor& gate) {
  a.all = !a.row_mask.defined() && a.groups.empty() && a.K() == F;
  // idx is sorted and distinct: K == F means idx = arange(F), and the gate at idx is the gate (a
  // per-sample gate's union is usually every column: at N=4096, F=1536 the gather took 4.7 ms).
  if (gate) a.gate_a = a.K() == F ? *gate : gate->index_select(gate->dim() - 1, a.idx);
}

Active plan_forward(int64_t N, int64_t F, const OptTensor& active, const OptTensor& gate,
                    const at::TensorOptions& like) {
  Active a;
  const bool per_row = is_per_row(active, gate);
  const bool indices = active && active->scalar_type() == at::kLong;
  if (!per_row) {
    a.saved_mask = no_rows(like, at::kBool);
    a.saved_group = no_rows(like, at::kLong);
  }
  if (!active && !gate) {
    a.idx = at::arange(F, like.dtype(at::kLong));
    a.all = true;
    return a;
  }
  if (indices && !gate) {  // K = len(active): no mask, no count, nothing that waits for the device
    a.idx = sorted_indices(*active, F);
    finish(a, F, gate);
    return a;
  }
  // The effective per-row [N, F] (or shared [F]) mask: active & (gate != 0).
  Tensor m = indices ? active_mask(F, sorted_indices(*active, F), like) : active_mask(F, active, like);
  if (gate) m = at::logical_and(m, gate->ne(0));
  if (!per_row) {
    a.idx = mask_indices(m);
  } else if (N == 1) {  // one row: its mask is a shared one, true at every column of idx
    a.idx = mask_indices(m.select(0, 0));
    a.saved_mask = filled<bool>({1, a.K()}, true, like.dtype(at::kBool));
    a.saved_group = filled<int64_t>({1}, -1, like.dtype(at::kLong));
  } else {
    a.idx = mask_indices(any_rows(m));
    a.groups = find_row_groups(m, a.idx, N, a);
    if (a.groups.empty()) {
      Tensor rm = select_mask_cols(m, a.idx);
      // select_mask_cols returns m itself when every column runs, m may be `active`, and an op's
      // outputs must not alias its inputs.
      a.saved_mask = rm.is_same(m) && active && m.is_same(*active) ? rm.clone() : rm;
      a.saved_group = filled<int64_t>({N}, -1, like.dtype(at::kLong));
      // On CPU a row mask that is all true needs no where() (the decode kernel and the GEMM
      // path then run a shared mask). On CUDA the where() always runs: the check would be a
      // second host synchronisation.
      if (!rm.is_cpu() || !all_true_cpu(rm)) a.row_mask = rm;
    }
  }
  finish(a, F, gate);
  return a;
}

// The backward trusts idx to address rows of w1 / w3 / w2 and of the gradients it writes, and
// the op is public (torch.ops.sparse_ops.gated_ffn_backward): idx must be what the forward
// returned for these active / gate, the sorted columns that run, before anything indexes with
// it. With run = active & (gate != 0) (the union over rows for per-row masks): idx increases
// strictly, lies in [0, F), runs at every entry, and has as many entries as run has columns.
// CPU: an error naming what is wrong. CUDA: on the device, so nothing waits for it (a bad idx
// fires the device-side assert before a kernel reads it; the CUDA context is then lost).
static void check_saved_idx(int64_t F, const OptTensor& active, const OptTensor& gate, const Tensor& idx) {
  const int64_t K = idx.size(0);
  const char* what = "gated_ffn_backward: idx must be the sorted columns that run for these active and gate "
                     "(as gated_ffn returned it)";
  if (idx.is_cpu()) {
    const int64_t* p = idx.data_ptr<int64_t>();
    for (int64_t k = 0; k < K; ++k) {
      TORCH_CHECK(p[k] >= 0 && p[k] < F, what, "; got ", p[k], " at position ", k, ", outside [0, F) = [0, ", F, ")");
      TORCH_CHECK(k == 0 || p[k] > p[k - 1], what, "; got ", p[k], " after ", p[k - 1], " at position ", k);
    }
    if (!active && !gate) {
      TORCH_CHECK(K == F, what, "; got ", K, " of the F = ", F, " columns with every column active");
      return;
    }
  }
  Tensor run = active ? active_mask(F, active, idx.options()) : at::ones({F}, idx.options().dtype(at::kBool));
  if (gate) run = at::logical_and(run, gate->ne(0));
  if (run.dim() == 2) run = any_rows(run);
  Tensor ok = run.sum().eq(K);
  if (K > 0) ok = ok.logical_and(run.index_select(0, idx.clamp(0, F - 1)).all());
  if (idx.is_cpu()) {
    TORCH_CHECK(ok.item<bool>(), what, "; got ", K, " indices where ", run.sum().item<int64_t>(),
                " columns run, or an index of a column that does not run");
    return;
  }
  if (K > 0) {
    ok = ok.logical_and(idx.min().ge(0)).logical_and(idx.max().lt(F));
    if (K > 1) ok = ok.logical_and(idx.slice(0, 1).gt(idx.slice(0, 0, K - 1)).all());
  }
  at::_assert_async(ok, what);
}

Active plan_backward(int64_t F, const OptTensor& active, const OptTensor& gate, const Tensor& idx,
                     const Tensor& row_mask, const Tensor& row_group) {
  check_saved_idx(F, active, gate, idx);
  Active a;
  a.idx = idx;
  if (row_mask.dim() == 2) {  // per-row (check_backward_inputs matched it to active / gate)
    if (!row_mask.is_cpu()) {
      // CUDA: the union path with row_mask. row_group's values are not read (that would wait for
      // the device); the grouping path is CPU-only, so a CUDA forward saved -1 for every row.
      a.row_mask = row_mask;
    } else {
      const Tensor rg = row_group.contiguous();
      const int64_t N = rg.size(0);
      const int64_t* gp = rg.data_ptr<int64_t>();
      const bool union_path = N == 0 || gp[0] == -1;
      if (union_path) {
        for (int64_t n = 0; n < N; ++n)
          TORCH_CHECK(gp[n] == -1, "gated_ffn_backward: row_group must be -1 for every row or a group id in "
                      "[0, N) for every row (saved by gated_ffn); got ", gp[n], " at row ", n, " after -1 at row 0");
        if (!all_true_cpu(row_mask)) a.row_mask = row_mask;
      } else {
        a.groups = groups_from_plan(row_mask, rg);
      }
    }
  }
  finish(a, F, gate);
  return a;
}

}  // namespace ffn
}  // namespace sparse_ops
