// Device-generic compute of gated_ffn on a plan (ffn_plan.h): the gathered-GEMM forward and
// the backward on the compact (active) weights. ATen calls only, no device kernels: the
// backward returns compact gradients and the device entry points (csrc/cpu/ffn_cpu.cpp,
// csrc/cuda/ffn_cuda.cpp) write them into full-size ones.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "ffn_plan.h"

namespace sparse_ops {
namespace ffn {

// Active columns of the weights, gathered (or the weights themselves when all run).
Tensor gather_rows(const Tensor& w, const Active& a);                     // w [F, d] -> [K, d]
Tensor gather_w2(const Tensor& w2, bool w2_transposed, const Active& a);  // [K, d] or [d, K]

Tensor apply_act(const Tensor& pre, Act act);
Tensor act_backward(const Tensor& grad, const Tensor& pre, Act act);

// out [N, d], pre [N, K], up [N, K] or empty.
std::tuple<Tensor, Tensor, Tensor> forward_gathered(
    const Tensor& x, const Tensor& w1, const Tensor& w2, const OptTensor& b1, const OptTensor& b2,
    const OptTensor& w3, Act act, bool w2_transposed, const Active& a);

// The op's outputs (out, idx, pre, up, row_mask, row_group) from a forward's (out, pre, up) and
// its plan; without save, pre and up come back as empty [0] tensors.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward_outputs(
    const std::tuple<Tensor, Tensor, Tensor>& r, const Active& a, bool save);

// Gradients of gated_ffn on the plan's columns. Each is undefined when not needed (or its input
// is absent), else defined, contiguous and in x's dtype:
//   dx [N, d]; db2 [d];
//   dW1a, dW3a [K, d]; dW2a [K, d] (w2_transposed) or [d, K]; db1a [K]: rows / columns at the
//     positions of idx; weights_full: they are already full-size (every column ran, idx = arange);
//   dgate: [K] / [N, K] at idx, or full-size [F] / [N, F] when gate_full (every column ran, or
//     dense_grad: then exact for every unit the active mask allows).
struct Grads {
  Tensor dx, dW1a, dW2a, dW3a, db1a, db2, dgate;
  bool weights_full = false;
  bool gate_full = false;
};

Grads backward_compact(const Tensor& grad_out, const Tensor& x, const Tensor& w1, const Tensor& w2,
                       const OptTensor& b1, const OptTensor& w3, const OptTensor& active, const OptTensor& gate,
                       const Active& a, const Tensor& pre, const Tensor& up, Act act, bool w2_transposed,
                       bool dense_grad, const std::array<bool, 3>& need);

}  // namespace ffn
}  // namespace sparse_ops
