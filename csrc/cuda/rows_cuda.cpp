// CUDA registration of the row ops behind skip_layer: ATen glue around rows_kernels.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launch.h"
#include "../rows.h"
#include "rows_kernels.h"

namespace sparse_ops {
namespace rows {
namespace {

cuda::DType rows_dtype(const Tensor& t) { return cuda::dtype_of(t, "scatter_rows"); }

void check_cuda(cudaError_t err, const char* kernel) { cuda::check_launch(err, "sparse_ops (row ops)", kernel); }

Tensor gather_rows_cuda(const Tensor& x, const Tensor& idx) {
  check_gather(x, idx);
  c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous(), ic = idx.contiguous();
  auto sizes = xc.sizes().vec();
  sizes[0] = ic.size(0);
  Tensor out = at::empty(sizes, xc.options());
  check_cuda(cuda::gather_rows(xc.data_ptr(), ic.data_ptr<int64_t>(), out.data_ptr(), ic.size(0),
                               row_numel(xc) * xc.element_size(), at::cuda::getCurrentCUDAStream()),
             "gather_rows");
  return out;
}

Tensor scatter_rows_cuda(const Tensor& x, const Tensor& idx, const Tensor& src, const std::optional<Tensor>& gate) {
  check_scatter(x, idx, src, gate);
  c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous(), ic = idx.contiguous(), sc = src.contiguous();
  const Tensor gc = gate ? gate->contiguous() : Tensor();
  Tensor y = xc.clone();
  check_cuda(cuda::scatter_rows(rows_dtype(xc), xc.data_ptr(), sc.data_ptr(), gate ? gc.data_ptr() : nullptr,
                                ic.data_ptr<int64_t>(), y.data_ptr(), ic.size(0), row_numel(xc),
                                at::cuda::getCurrentCUDAStream()),
             "scatter_rows");
  return y;
}

std::tuple<Tensor, Tensor, Tensor> scatter_rows_backward_cuda(const Tensor& grad, const Tensor& x, const Tensor& idx,
                                                              const Tensor& src, const std::optional<Tensor>& gate,
                                                              std::array<bool, 3> need) {
  check_scatter(x, idx, src, gate);
  TORCH_CHECK(grad.sizes() == x.sizes(), "scatter_rows_backward: grad must be shaped like x ", x.sizes(),
              "; got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "scatter_rows_backward: grad must match x's dtype and device (", x.scalar_type(), ", ", x.device(),
              "); got ", grad.scalar_type(), ", ", grad.device());
  c10::cuda::CUDAGuard guard(x.device());
  const Tensor gr = grad.contiguous(), xc = x.contiguous(), ic = idx.contiguous(), sc = src.contiguous();
  const Tensor gc = gate ? gate->contiguous() : Tensor();
  const bool need_g = need[2] && gate.has_value();
  Tensor dx = need[0] ? gr.clone() : x.new_empty({0});
  Tensor dsrc = need[1] ? at::empty_like(sc) : x.new_empty({0});
  Tensor dgate = need_g ? at::empty_like(gc) : x.new_empty({0});
  if (ic.size(0) == 0) return {dx, dsrc, dgate};
  check_cuda(cuda::scatter_rows_backward(rows_dtype(xc), gr.data_ptr(), xc.data_ptr(), sc.data_ptr(),
                                         gate ? gc.data_ptr() : nullptr, ic.data_ptr<int64_t>(),
                                         need[0] ? dx.data_ptr() : nullptr, need[1] ? dsrc.data_ptr() : nullptr,
                                         need_g ? dgate.data_ptr() : nullptr, ic.size(0), row_numel(xc),
                                         at::cuda::getCurrentCUDAStream()),
             "scatter_rows_backward");
  return {dx, dsrc, dgate};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
  m.impl("scatter_rows_backward", &scatter_rows_backward_cuda);
}

}  // namespace rows
}  // namespace sparse_ops
