// Device-generic parts of gated_ffn: argument checks, resolving which columns run,
// and the gathered-GEMM forward/backward (ATen calls that run on CPU and CUDA).
// The device-specific fused decode kernels live in csrc/cpu and csrc/cuda.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace sparse_ops {
namespace ffn {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum class Act { Gelu, GeluTanh, Relu, Silu };
Act parse_activation(const std::string& name);

// Rows at or below this count take the fused gather-GEMV decode kernel (float/double).
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
  Tensor idx;       // int64 [K], sorted: columns that run for at least one row
  Tensor row_mask;  // bool [N, K] when rows differ, else undefined
  Tensor gate_a;    // gate gathered at idx: [K] or [N, K], undefined when there is no gate
  std::vector<RowGroup> groups;  // per-row masks with few distinct rows (then no row_mask)
  bool all = false; // every column runs for every row (idx == arange(F), no row mask)
  int64_t K() const { return idx.size(0); }
};

// Throws a clear error (naming the argument) for any malformed input.
void check_inputs(const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& b1,
                  const OptTensor& b2, const OptTensor& w3, const OptTensor& active,
                  const OptTensor& gate, bool w2_transposed);

// The effective per-row mask [N, F] (or shared [F]) as bool: active & (gate != 0).
// dense_mask=true leaves out the gate (used by dense_grad: units a zero gate skipped).
Tensor effective_mask(int64_t N, int64_t F, const OptTensor& active, const OptTensor& gate,
                      const at::TensorOptions& like, bool include_gate = true);

Active resolve_active(int64_t N, int64_t F, const OptTensor& active, const OptTensor& gate,
                      const at::TensorOptions& like);

// Active columns of the weights, gathered (or the weights themselves when all run).
Tensor gather_rows(const Tensor& w, const Active& a);         // w [F, d] -> [K, d]
Tensor gather_w2(const Tensor& w2, bool w2_transposed, const Active& a);  // [K, d] or [d, K]

Tensor apply_act(const Tensor& pre, Act act);
Tensor act_backward(const Tensor& grad, const Tensor& pre, Act act);

// out [N, d], pre [N, K], up [N, K] or empty.
std::tuple<Tensor, Tensor, Tensor> forward_gathered(
    const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& b1, const OptTensor& b2,
    const OptTensor& w3, Act act, bool w2_transposed, const Active& a);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_gathered(
    const Tensor& grad_out, const Tensor& x, const Tensor& w1, const Tensor& w2,
    const OptTensor& b1, const OptTensor& w3, const OptTensor& active, const OptTensor& gate,
    const Tensor& idx, const Tensor& pre, const Tensor& up, Act act, bool w2_transposed,
    bool dense_grad, const std::array<bool, 3>& need);

// CPU: zeros shaped like the 2-D `like` with src's rows (dim 0) or columns (dim 1) at positions
// idx, each element written once (csrc/cpu/ffn_cpu.cpp).
Tensor scatter_into_zeros(const Tensor& like, int64_t dim, const Tensor& idx, const Tensor& src);

#ifdef SPARSE_OPS_WITH_CUDA
// dst.index_copy_(dim, idx, src) for CUDA tensors by the scatter kernel of csrc/cuda
// (defined in csrc/cuda/ffn_cuda.cpp); dim 0 scatters rows, dim 1 columns of a 2-D dst.
void cuda_scatter(Tensor& dst, int64_t dim, const Tensor& idx, const Tensor& src);
#endif

// Rebuild the Active of a forward call from its saved idx (backward).
Active active_from_idx(int64_t N, int64_t F, const OptTensor& active, const OptTensor& gate,
                       const Tensor& idx, const at::TensorOptions& like);

}  // namespace ffn
}  // namespace sparse_ops
