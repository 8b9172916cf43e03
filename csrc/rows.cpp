// Checks shared by the CPU and CUDA row ops: clear errors naming the argument.
#include "rows.h"

#include <string>

namespace sparse_ops {
namespace rows {

static void check_idx(const char* op, const Tensor& x, const Tensor& idx, bool unique) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a leading row dimension; got a 0-d tensor");
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": idx must be int64; got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1, op, ": idx must be 1-D [K]; got ", idx.sizes());
  TORCH_CHECK(idx.device() == x.device(), op, ": idx must be on x's device (", x.device(), "); got ",
              idx.device());
  if (idx.numel() == 0) return;
  const int64_t R = x.size(0);
  if (!idx.is_cpu()) {
    // On the device, as ATen's index kernels check: no host synchronisation; a bad index fails
    // the stream (reported at the next synchronising call) before any kernel reads it.
    Tensor ok = idx.min().ge(-1).logical_and(idx.max().lt(R));
    if (unique && R > 0) {
      Tensor counts = at::zeros({R + 1}, idx.options());
      counts.index_add_(0, idx.clamp(-1, R - 1) + 1, at::ones_like(idx));
      ok = ok.logical_and(counts.narrow(0, 1, R).max().le(1));
    }
    const std::string msg = std::string(op) + ": idx must be in [-1, rows of x)" +
                            (unique ? " and not repeat a row (other than -1 padding)" : "");
    at::_assert_async(ok, msg);
    return;
  }
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK(lo >= -1 && hi < R, op, ": idx must be in [-1, ", R, ") (-1 = padding); got min ", lo,
              ", max ", hi);
  if (unique) {
    // Kept rows must be distinct, or two results would race for one output row.
    Tensor counts = at::zeros({R + 1}, idx.options());
    counts.index_add_(0, idx + 1, at::ones_like(idx));
    const int64_t worst = R > 0 ? counts.narrow(0, 1, R).max().item<int64_t>() : 0;
    TORCH_CHECK(worst <= 1, op, ": idx must not repeat a row (other than -1 padding); a row appears ",
                worst, " times");
  }
}

// Gather rows must be distinct too: its gradient is a scatter into those rows.
void check_gather(const Tensor& x, const Tensor& idx) { check_idx("gather_rows", x, idx, true); }

void check_scatter(const Tensor& x, const Tensor& idx, const Tensor& src, const std::optional<Tensor>& gate) {
  check_idx("scatter_rows", x, idx, true);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "scatter_rows: x must be floating; got ", x.scalar_type());
  TORCH_CHECK(src.device() == x.device() && src.scalar_type() == x.scalar_type(),
              "scatter_rows: src must match x's device and dtype (", x.device(), ", ", x.scalar_type(),
              "); got ", src.device(), ", ", src.scalar_type());
  TORCH_CHECK(src.dim() == x.dim() && src.size(0) == idx.size(0) && src.sizes().slice(1) == x.sizes().slice(1),
              "scatter_rows: src must be [K, ...] with K = len(idx) = ", idx.size(0),
              " and the row shape of x ", x.sizes().slice(1), "; got ", src.sizes());
  if (gate) {
    TORCH_CHECK(gate->device() == x.device() && gate->scalar_type() == x.scalar_type(),
                "scatter_rows: gate must match x's device and dtype; got ", gate->device(), ", ",
                gate->scalar_type());
    TORCH_CHECK(gate->dim() == 1 && gate->size(0) == idx.size(0), "scatter_rows: gate must be [K] = [",
                idx.size(0), "]; got ", gate->sizes());
  }
}

}  // namespace rows
}  // namespace sparse_ops
