// CUDA registration of gated_ffn: ATen glue around csrc/cuda/ffn_kernels.cu.
// Few rows (decode): the fused gather-GEMV kernel. Many rows: the gathered-GEMM path of
// csrc/ffn_compute.cpp (cuBLAS on the compact weights). Backward: csrc/ffn_compute.cpp on the
// compact weights, its gradients written into the active rows/columns of zeroed full-size ones
// by the scatter kernels (cuda_scatter). With active = None or int64 indices and no gate,
// neither direction synchronises with the host (csrc/ffn_plan.cpp).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "launch.h"
#include "../ffn_compute.h"
#include "../ffn_plan.h"
#include "ffn_kernels.h"

namespace sparse_ops {
namespace ffn {
namespace {

cuda::DType ffn_dtype(const Tensor& t) { return cuda::dtype_of(t, "gated_ffn"); }

void check_cuda(cudaError_t err, const char* kernel) { cuda::check_launch(err, "gated_ffn", kernel); }

std::tuple<Tensor, Tensor, Tensor> forward_decode_cuda(const Tensor& x, const Tensor& w1, const Tensor& w2,
                                                       const OptTensor& b1, const OptTensor& b2,
                                                       const OptTensor& w3, const OptTensor& gate, Act act,
                                                       bool w2_transposed, const Active& a) {
  const int64_t N = x.size(0), d = x.size(1), F = w1.size(0), K = a.K();
  const Tensor xc = x.contiguous(), w1c = w1.contiguous(), w2c = w2.contiguous();
  const Tensor w3c = w3 ? w3->contiguous() : Tensor();
  const Tensor b1c = b1 ? b1->contiguous() : Tensor();
  const Tensor gc = gate ? gate->contiguous() : Tensor();
  const Tensor idx = a.idx.contiguous();
  const Tensor rm = a.row_mask.defined() ? a.row_mask.contiguous() : Tensor();
  Tensor pre = at::empty({N, K}, x.options());
  Tensor up = w3 ? at::empty({N, K}, x.options()) : x.new_empty({0});
  Tensor hg = at::empty({N, K}, x.options());
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor out_acc = at::zeros({N, d}, x.options().dtype(acc_type));

  cuda::FfnDecodeArgs args{};
  args.dtype = ffn_dtype(x);
  args.act = static_cast<cuda::FfnAct>(static_cast<int>(act));
  args.x = xc.data_ptr(); args.w1 = w1c.data_ptr(); args.w3 = w3 ? w3c.data_ptr() : nullptr;
  args.w2 = w2c.data_ptr(); args.b1 = b1 ? b1c.data_ptr() : nullptr;
  args.gate = gate ? gc.data_ptr() : nullptr;
  args.gate_per_row = gate && gc.dim() == 2;
  args.idx = idx.data_ptr<int64_t>();
  args.row_mask = rm.defined() ? rm.data_ptr<bool>() : nullptr;
  args.pre = pre.data_ptr(); args.up = w3 ? up.data_ptr() : nullptr; args.hg = hg.data_ptr();
  args.out_acc = out_acc.data_ptr();
  args.N = N; args.d = d; args.F = F; args.K = K;
  args.w2_transposed = w2_transposed;
  const auto stream = at::cuda::getCurrentCUDAStream();
  check_cuda(cuda::ffn_decode(args, stream), "ffn_decode");
  if (!w2_transposed) check_cuda(cuda::ffn_decode_down_cols(args, stream), "ffn_decode_down_cols");
  Tensor out = out_acc.to(x.scalar_type());
  if (b2) out.add_(*b2);
  return {out, pre, up};
}

// dst.index_copy_(dim, idx, src) for a contiguous CUDA dst by the scatter kernels of
// ffn_kernels.cu; dim 0 scatters rows (of a 1-D or 2-D dst), dim 1 columns of a 2-D dst.
void cuda_scatter(Tensor& dst, int64_t dim, const Tensor& idx, const Tensor& src_in) {
  TORCH_CHECK(dst.is_contiguous(), "gated_ffn: internal error: scatter destination is not contiguous");
  const Tensor src = src_in.contiguous(), ic = idx.contiguous();
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), "gated_ffn: internal error: scatter source ",
              src.scalar_type(), " into ", dst.scalar_type());
  const int64_t K = ic.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (dim == 0) {
    const int64_t C = dst.dim() == 1 ? 1 : dst.numel() / dst.size(0);
    TORCH_CHECK(src.numel() == K * C, "gated_ffn: internal error: scatter source ", src.sizes(), " for ", K,
                " rows of ", dst.sizes());
    check_cuda(cuda::scatter_rows_by_idx(ffn_dtype(dst), src.data_ptr(), ic.data_ptr<int64_t>(), dst.data_ptr(),
                                         K, C, stream),
               "scatter_rows_by_idx");
  } else {
    TORCH_CHECK(dim == 1 && dst.dim() == 2 && src.dim() == 2 && src.size(0) == dst.size(0) && src.size(1) == K,
                "gated_ffn: internal error: scatter of ", src.sizes(), " along dim ", dim, " into ", dst.sizes());
    check_cuda(cuda::scatter_cols_by_idx(ffn_dtype(dst), src.data_ptr(), ic.data_ptr<int64_t>(), dst.data_ptr(),
                                         K, dst.size(0), dst.size(1), stream),
               "scatter_cols_by_idx");
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_ffn_cuda(
    const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& b1, const OptTensor& b2,
    const OptTensor& w3, const OptTensor& active, const OptTensor& gate, std::string activation,
    bool w2_transposed, bool /*dense_grad*/, bool save) {
  check_inputs(x, w1, w2, b1, b2, w3, active, gate, w2_transposed);
  c10::cuda::CUDAGuard guard(x.device());
  const Act act = parse_activation(activation);
  const int64_t N = x.size(0), F = w1.size(0);
  Active a = plan_forward(N, F, active, gate, x.options());
  std::tuple<Tensor, Tensor, Tensor> r;
  // As on CPU: few rows take the gather-GEMV unless every column runs for more than 4 rows.
  const bool decode = N > 0 && N <= kDecodeMaxRows && a.K() > 0 && !(a.all && N > 4);
  if (decode) {
    r = forward_decode_cuda(x, w1, w2, b1, b2, w3, gate, act, w2_transposed, a);
  } else {
    r = forward_gathered(x, w1, w2, b1, b2, w3, act, w2_transposed, a);
  }
  return forward_outputs(r, a, save);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_ffn_backward_cuda(
    const Tensor& grad_out, const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& b1,
    const OptTensor& w3, const OptTensor& active, const OptTensor& gate, const Tensor& idx,
    const Tensor& pre, const Tensor& up, const Tensor& row_mask, const Tensor& row_group, std::string activation,
    bool w2_transposed, bool dense_grad, std::array<bool, 3> need) {
  check_inputs(x, w1, w2, b1, std::nullopt, w3, active, gate, w2_transposed);
  check_backward_inputs(grad_out, x, w1, w3, active, gate, idx, pre, up, row_mask, row_group);
  c10::cuda::CUDAGuard guard(x.device());
  const Act act = parse_activation(activation);
  const int64_t N = x.size(0), d = x.size(1), F = w1.size(0);
  // idx is checked against active and gate on the device (plan_backward): no host synchronisation.
  const Tensor ic = idx.contiguous();
  const Active a = plan_backward(F, active, gate, ic, row_mask, row_group);
  Grads g = backward_compact(grad_out, x, w1, w2, b1, w3, active, gate, a, pre, up, act, w2_transposed,
                             dense_grad, need);
  const Tensor empty = x.new_empty({0});
  // Full-size gradients, contiguous: the compact ones when every column ran, else zeros with
  // the compact rows/columns scattered into them.
  auto full = [&](const Tensor& c, bool is_full, std::vector<int64_t> sizes, int64_t dim) {
    if (!c.defined()) return empty;
    if (is_full) return c;
    Tensor dst = at::zeros(sizes, c.options());
    cuda_scatter(dst, dim, ic, c);
    return dst;
  };
  const bool wf = g.weights_full;
  Tensor dw1 = full(g.dW1a, wf, {F, d}, 0);
  Tensor dw2 = w2_transposed ? full(g.dW2a, wf, {F, d}, 0) : full(g.dW2a, wf, {d, F}, 1);
  Tensor dw3 = full(g.dW3a, wf, {F, d}, 0);
  Tensor db1 = full(g.db1a, wf, {F}, 0);
  Tensor dgate = !g.dgate.defined() ? empty
                 : g.dgate.dim() == 1 ? full(g.dgate, g.gate_full, {F}, 0)
                                      : full(g.dgate, g.gate_full, {N, F}, 1);
  return {g.dx.defined() ? g.dx : empty, dw1, dw2, dw3, db1, g.db2.defined() ? g.db2 : empty, dgate};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CUDA, m) {
  m.impl("gated_ffn", &gated_ffn_cuda);
  m.impl("gated_ffn_backward", &gated_ffn_backward_cuda);
}

}  // namespace ffn
}  // namespace sparse_ops
