// CPU kernels of the row ops behind skip_layer: gather the kept rows (samples or tokens)
// into a compact batch, and scatter the layer's output back, blending with a gate.
// One pass each: rows are copied (or blended) directly between x, src and the output,
// parallel over rows; no index tensors or intermediate copies beyond the compact batch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../rows.h"

namespace sparse_ops {
namespace rows {
namespace {

// Rows of at least this many elements are worth a task of their own.
constexpr int64_t kGrainElems = 1 << 14;

int64_t grain_rows(int64_t row) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(row, 1)); }

Tensor gather_rows_cpu(const Tensor& x, const Tensor& idx) {
  check_gather(x, idx);
  const Tensor xc = x.contiguous(), ic = idx.contiguous();
  const int64_t K = ic.size(0), row = row_numel(xc);
  auto sizes = xc.sizes().vec();
  sizes[0] = K;
  Tensor out = at::empty(sizes, xc.options());
  if (K == 0 || row == 0) return out;
  const int64_t* ip = ic.data_ptr<int64_t>();
  const size_t bytes = row * xc.element_size();
  const char* src = static_cast<const char*>(xc.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, K, grain_rows(row), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      if (ip[k] >= 0) std::memcpy(dst + k * bytes, src + ip[k] * bytes, bytes);
      else std::memset(dst + k * bytes, 0, bytes);
    }
  });
  return out;
}

template <typename T>
void blend_rows(const T* x, const T* src, const T* gate, const int64_t* ip, T* y, int64_t K,
                int64_t row) {
  using acc_t = at::opmath_type<T>;
  at::parallel_for(0, K, grain_rows(row), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i = ip[k];
      if (i < 0) continue;
      const T* s = src + k * row;
      T* yo = y + i * row;
      if (!gate) {
        std::memcpy(yo, s, row * sizeof(T));
        continue;
      }
      const T* xi = x + i * row;
      const acc_t g = acc_t(gate[k]);
#pragma omp simd
      for (int64_t e = 0; e < row; ++e) yo[e] = T(acc_t(xi[e]) + g * (acc_t(s[e]) - acc_t(xi[e])));
    }
  });
}

Tensor scatter_rows_cpu(const Tensor& x, const Tensor& idx, const Tensor& src,
                        const std::optional<Tensor>& gate) {
  check_scatter(x, idx, src, gate);
  const Tensor xc = x.contiguous(), ic = idx.contiguous(), sc = src.contiguous();
  const Tensor gc = gate ? gate->contiguous() : Tensor();
  Tensor y = xc.clone();
  const int64_t K = ic.size(0), row = row_numel(xc);
  if (K == 0 || row == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "scatter_rows_cpu", [&] {
    blend_rows<scalar_t>(xc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
                         gate ? gc.data_ptr<scalar_t>() : nullptr, ic.data_ptr<int64_t>(),
                         y.data_ptr<scalar_t>(), K, row);
  });
  return y;
}

// Gradients of y = scatter_rows(x, idx, src, gate), in one pass over the kept rows:
//   dx = grad, with kept rows scaled by (1 - gate) (0 without a gate),
//   dsrc[k] = gate[k] * grad[idx[k]] (grad[idx[k]] without a gate; 0 for padding rows),
//   dgate[k] = sum_e (src[k, e] - x[idx[k], e]) * grad[idx[k], e].
template <typename T>
void scatter_backward_rows(const T* grad, const T* x, const T* src, const T* gate, const int64_t* ip,
                           T* dx, T* dsrc, T* dgate, int64_t K, int64_t row) {
  using acc_t = at::opmath_type<T>;
  at::parallel_for(0, K, grain_rows(row), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i = ip[k];
      if (i < 0) {
        if (dsrc) std::memset(dsrc + k * row, 0, row * sizeof(T));
        if (dgate) dgate[k] = T(0);
        continue;
      }
      const T* gi = grad + i * row;
      const acc_t g = gate ? acc_t(gate[k]) : acc_t(1);
      if (dx) {
        T* d = dx + i * row;
#pragma omp simd
        for (int64_t e = 0; e < row; ++e) d[e] = T(acc_t(gi[e]) * (acc_t(1) - g));
      }
      if (dsrc) {
        T* d = dsrc + k * row;
#pragma omp simd
        for (int64_t e = 0; e < row; ++e) d[e] = T(acc_t(gi[e]) * g);
      }
      if (dgate) {
        const T* s = src + k * row;
        const T* xi = x + i * row;
        acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t e = 0; e < row; ++e) acc += (acc_t(s[e]) - acc_t(xi[e])) * acc_t(gi[e]);
        dgate[k] = T(acc);
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> scatter_rows_backward_cpu(const Tensor& grad, const Tensor& x,
                                                             const Tensor& idx, const Tensor& src,
                                                             const std::optional<Tensor>& gate,
                                                             std::array<bool, 3> need) {
  check_scatter(x, idx, src, gate);
  TORCH_CHECK(grad.sizes() == x.sizes(), "scatter_rows_backward: grad must be shaped like x ", x.sizes(),
              "; got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "scatter_rows_backward: grad must match x's dtype and device (", x.scalar_type(), ", ", x.device(),
              "); got ", grad.scalar_type(), ", ", grad.device());
  const Tensor gr = grad.contiguous(), xc = x.contiguous(), ic = idx.contiguous(), sc = src.contiguous();
  const Tensor gc = gate ? gate->contiguous() : Tensor();
  const int64_t K = ic.size(0), row = row_numel(xc);
  const bool need_g = need[2] && gate.has_value();
  Tensor dx = need[0] ? gr.clone() : x.new_empty({0});
  Tensor dsrc = need[1] ? at::empty_like(sc) : x.new_empty({0});
  Tensor dgate = need_g ? at::empty_like(gc) : x.new_empty({0});
  if (K == 0 || row == 0) {
    if (need[1]) dsrc.zero_();
    if (need_g) dgate.zero_();
    return {dx, dsrc, dgate};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "scatter_rows_backward_cpu", [&] {
    scatter_backward_rows<scalar_t>(
        gr.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
        gate ? gc.data_ptr<scalar_t>() : nullptr, ic.data_ptr<int64_t>(),
        need[0] ? dx.data_ptr<scalar_t>() : nullptr, need[1] ? dsrc.data_ptr<scalar_t>() : nullptr,
        need_g ? dgate.data_ptr<scalar_t>() : nullptr, K, row);
  });
  return {dx, dsrc, dgate};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CPU, m) {
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
  m.impl("scatter_rows_backward", &scatter_rows_backward_cpu);
}

}  // namespace rows
}  // namespace sparse_ops
