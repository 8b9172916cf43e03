// Every schema of the sparse_ops library, in one place.
//
// Implementations register themselves with TORCH_LIBRARY_IMPL beside their kernels:
//   csrc/cpu/*.cpp   CPU
//   csrc/cuda/*.cpp  CUDA (launchers; the kernels are plain CUDA in csrc/cuda/*.cu)
// Fake (meta) kernels and autograd formulas are registered in Python, beside the
// wrappers in sparse_ops/ops/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing sparse_ops._C loads this shared object, which runs the static
// TORCH_LIBRARY initialisers below. The module itself has no Python members.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "sparse_ops compiled ops (see torch.ops.sparse_ops)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sparse_ops, m) {
  // ---------------------------------------------------------------- gated FFN
  // x [N, d]; w1, w3 [F, d]; w2 [d, F] (or [F, d] when w2_transposed).
  // active: None, int64 indices [K] (distinct, in [0, F); any order) or bool [F] (shared by all
  // rows), or bool [N, F]. gate: None, or float [F] / [N, F] in x's dtype; a gate of exactly 0
  // skips its unit. "Per-row": active is a 2-D bool mask or gate is 2-D.
  // Returns out [N, d] and the plan the backward runs on (shapes depend on input shapes only):
  //   idx [K] int64: the columns that ran for at least one row (sorted); K = F without active
  //     and gate, len(active) for int64 indices without a gate,
  //   pre [N, K]: x w1[idx]^T + b1[idx] (entries of columns a row did not run hold 0 or that
  //     value; they do not affect the gradients),
  //   up  [N, K]: x w3[idx]^T for GLU, else an empty tensor,
  //   row_mask: per-row, bool [N, K]: the effective mask (active & gate != 0) at idx; else bool [0],
  //   row_group: per-row, int64 [N]: each row's group id when rows were grouped by equal masks
  //     (CPU), else -1 for every row; else int64 [0].
  // dense_grad is read by the autograd formula only (skipped units' gate gradient).
  // save=False: the call is not differentiated (sparse_ops.gated_ffn passes it when autograd does
  // not see the call): pre and up come back as empty [0] tensors, and the CPU row groups do not
  // write them (an [N, K] write each: ~3.5% of the op's time at MiniLM's per-sample masks, 8% of
  // the whole forward with per-sample FFN masks alone).
  m.def(
      "gated_ffn(Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, Tensor? w3, "
      "Tensor? active, Tensor? gate, str activation, bool w2_transposed, bool dense_grad, bool save=True) "
      "-> (Tensor out, Tensor idx, Tensor pre, Tensor up, Tensor row_mask, Tensor row_group)");
  // Gradients of gated_ffn, on the plan gated_ffn returned (idx, pre, up, row_mask, row_group;
  // active is read again only for dense_grad's gate gradient). need = [x, weights and biases,
  // gate]. Gradients that are not needed, or whose input is absent, come back as empty tensors;
  // the others are contiguous. Weight rows/columns of columns that did not run are exact zeros.
  m.def(
      "gated_ffn_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? w3, "
      "Tensor? active, Tensor? gate, Tensor idx, Tensor pre, Tensor up, Tensor row_mask, Tensor row_group, "
      "str activation, bool w2_transposed, bool dense_grad, bool[3] need) "
      "-> (Tensor dx, Tensor dw1, Tensor dw2, Tensor dw3, Tensor db1, Tensor db2, Tensor dgate)");

  // ---------------------------------------------------------------- rows (skip_layer)
  // x [R, ...]; idx [K] int64 in [-1, R) (-1 = padding row).
  // gather_rows: out[k] = x[idx[k]] (zeros for padding).
  m.def("gather_rows(Tensor x, Tensor idx) -> Tensor");
  // scatter_rows: y = x with y[idx[k]] = src[k], or x[i] + gate[k] * (src[k] - x[i]) with a
  // gate [K]; padding rows are skipped; non-padding idx must not repeat.
  m.def("scatter_rows(Tensor x, Tensor idx, Tensor src, Tensor? gate) -> Tensor");
  // Gradients of scatter_rows. need = [x, src, gate]; not-needed ones come back empty.
  m.def(
      "scatter_rows_backward(Tensor grad, Tensor x, Tensor idx, Tensor src, Tensor? gate, bool[3] need) "
      "-> (Tensor dx, Tensor dsrc, Tensor dgate)");

  // ---------------------------------------------------------------- masked head attention
  // q [B, H, Tq, D]; k, v [B, H, Tk, D]; head_mask bool or float (q's dtype), [B, H] or [H]
  // (a float gate of exactly 0 skips its pair); attn_mask bool or additive float, broadcastable
  // to [B, H, Tq, Tk]. out = sdpa(q, k, v, attn_mask, is_causal, scale) * head_mask[..., None, None],
  // computed only for the running (b, h) pairs. Returns out [B, H, Tq, D] (laid out [B, Tq, H, D])
  // and what backward needs:
  //   pairs [P] int64: flat indices b * H + h of the running pairs (sorted),
  //   out_c [P, Tq, D]: their un-gated attention outputs for a float head_mask, else empty [0],
  //   lse [P, Tq]: their log-sum-exp (float32 for half/bfloat16 inputs).
  // dense_grad is read by backward only (gate gradient of pairs a zero gate skipped).
  m.def(
      "masked_head_attention(Tensor q, Tensor k, Tensor v, Tensor head_mask, Tensor? attn_mask, "
      "bool is_causal, float? scale, bool dense_grad) -> (Tensor out, Tensor pairs, Tensor out_c, Tensor lse)");
  // Gradients of masked_head_attention. need = [q, k, v, head_mask]; not-needed ones come back
  // empty. Pairs that did not run get exact-zero q/k/v gradients (and gate gradient 0 unless
  // dense_grad). attn_mask gets no gradient.
  m.def(
      "masked_head_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor head_mask, "
      "Tensor? attn_mask, Tensor pairs, Tensor out, Tensor out_c, Tensor lse, bool is_causal, float? scale, "
      "bool dense_grad, bool[4] need) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dhead_mask)");
}
