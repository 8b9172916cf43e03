// Device-generic checks of the row ops behind skip_layer (csrc/cpu/rows_cpu.cpp,
// csrc/cuda/rows_cuda.cpp). A row is x[i] (a sample, or a token of a flattened [B*T, ...]).
// idx [K] int64 names rows of x; -1 marks a padding row (gather writes zeros, scatter skips).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace sparse_ops {
namespace rows {

using at::Tensor;

inline int64_t row_numel(const Tensor& x) { return x.dim() == 0 ? 1 : x.numel() / std::max<int64_t>(x.size(0), 1); }

void check_gather(const Tensor& x, const Tensor& idx);
void check_scatter(const Tensor& x, const Tensor& idx, const Tensor& src, const std::optional<Tensor>& gate);

}  // namespace rows
}  // namespace sparse_ops
