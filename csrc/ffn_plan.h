// Device-generic planning of gated_ffn: argument checks and which hidden columns run for
// which rows (the Active plan). The forward plans from active/gate and returns the plan's
// tensors (idx, row_mask, row_group); the backward rebuilds the same plan from them without
// looking at active/gate's values again. ATen calls only; the compute on a plan is in
// ffn_compute.h, the device entry points in csrc/cpu and csrc/cuda.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace sparse_ops {
namespace ffn {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum class Act { Gelu, GeluTanh, Relu, Silu, Identity };
Act parse_activation(const std::string& name);

// Rows at or below this count take the fused gather-GEMV decode kernel.
constexpr int64_t kDecodeMaxRows = 16;

// Rows that share a mask (every token of a sample under a per-sample gate, say).
struct RowGroup {
  Tensor rows;  // int64 [n_g], rows of x in the group
  Tensor cols;  // int64 [k_g], positions in Active::idx of the columns that run for them
};

// Grouping pays when groups are large: at least this many rows per group on average.
constexpr int64_t kMinRowsPerGroup = 16;

// Which hidden columns run.
struct Active {
  Tensor idx;       // int64 [K], sorted, distinct: columns that run for at least one row
  Tensor row_mask;  // bool [N, K] for the union path's where(), else undefined
  Tensor gate_a;    // gate gathered at idx: [K] or [N, K], undefined when there is no gate
  std::vector<RowGroup> groups;  // per-row masks with few distinct rows (then no row_mask)
  bool all = false; // every column runs for every row (idx == arange(F), no row mask)
  // What gated_ffn returns for its backward (shapes fixed by the input shapes alone):
  Tensor saved_mask;   // per-row: bool [N, K], the effective mask at idx; else bool [0]
  Tensor saved_group;  // per-row: int64 [N], group ids (grouping ran) or all -1; else int64 [0]
  int64_t K() const { return idx.size(0); }
};

// Throws a clear error (naming the argument) for any malformed input. Looks at shapes,
// dtypes and devices only (no values: nothing here waits for the device).
void check_inputs(const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& b1,
                  const OptTensor& b2, const OptTensor& w3, const OptTensor& active,
                  const OptTensor& gate, bool w2_transposed);

// The tensors gated_ffn_backward takes besides the forward's inputs: grad_out [N, d],
// idx int64 [K], pre [N, K], up [N, K] (w3) or anything else, and the plan's row_mask /
// row_group in the shapes the schema gives them. Shapes and dtypes only.
void check_backward_inputs(const Tensor& grad_out, const Tensor& x, const Tensor& w1, const OptTensor& w3,
                           const OptTensor& active, const OptTensor& gate, const Tensor& idx, const Tensor& pre,
                           const Tensor& up, const Tensor& row_mask, const Tensor& row_group);

// Whether the plan has a mask per row: a 2-D bool active or a 2-D gate.
bool is_per_row(const OptTensor& active, const OptTensor& gate);

// The bool mask of `active` alone: [F] (None: all true; int64 indices) or the [N, F] mask.
Tensor active_mask(int64_t F, const OptTensor& active, const at::TensorOptions& like);

// The forward's plan: resolves active/gate (checking int64 indices: on the host on CPU, on the
// device on CUDA) and, on CPU, groups rows with equal masks.
Active plan_forward(int64_t N, int64_t F, const OptTensor& active, const OptTensor& gate,
                    const at::TensorOptions& like);

// The backward's plan, from what plan_forward returned (idx, row_mask, row_group), after
// checking idx against active and gate (on the device on CUDA); gate also gives gate_a. Call
// check_backward_inputs first. idx must be contiguous.
Active plan_backward(int64_t F, const OptTensor& active, const OptTensor& gate, const Tensor& idx,
                     const Tensor& row_mask, const Tensor& row_group);

}  // namespace ffn
}  // namespace sparse_ops
