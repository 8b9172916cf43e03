"""SparseMultiheadAttention: nn.MultiheadAttention whose switched-off heads are never computed.

A head owns D = embed_dim // num_heads rows of each of Wq, Wk, Wv (and of their biases) and D
columns of Wo. A head that is off (for the whole batch, or for one sample) is not projected, not
attended and not output-projected: its weight rows/columns are never read, and their gradients
are exact zeros.

This file holds nn.MultiheadAttention compatibility only (constructor, from_module, forward's
arguments, batch_first / unbatched layouts, outputs). The rest lives in:
  attention_masks.py    head_mask + learned gate -> one head mask; attn_mask + key_padding_mask ->
                        one additive 4-D mask; the is_causal rule
  attention_paths.py    the compute paths below
  ops/head_proj.py      the head projections (shared and per-sample groups)
  ops/heads.py          masked_head_attention, the attention core of every path, run by the
                        module's `backend` (cpp, cuda, triton, torch; "auto" follows
                        sparse_ops.set_backend)

Paths (chosen per call, see `forward`):
  all heads on (no head mask)   -> in-projection GEMM -> masked_head_attention (all-on head mask)
                                   -> out-projection GEMM, batch-first, nothing grouped or gathered;
                                   nn.MultiheadAttention.forward itself for need_weights=True,
                                   add_bias_kv, add_zero_attn and nested tensors
  shared head mask ([H], or     -> the active heads' rows of W_in and columns of Wo gathered once:
  [B, H] with equal rows)          one GEMM per projection, the attention on [B, K, L, D] (a float
                                   gate without zeros: the full weights, nothing gathered)
  per-sample head mask [B, H]   -> samples grouped by their number of active heads K; per group
                                   batched GEMMs on the samples' own heads and the attention on
                                   [n, K, L, D] (the numbers behind this choice:
                                   attention_paths.forward_sparse)
  need_weights / add_bias_kv /  -> dense: every head computed, off heads selected away
  add_zero_attn / dense_grad       (torch.where, so nothing of theirs reaches the output)
The attention core is masked_head_attention everywhere except: dropout > 0 in training (the op
has no dropout: F.scaled_dot_product_attention with dropout_p, on the same compact heads),
need_weights=True (weights computed explicitly, or nn.MultiheadAttention with every head on),
add_bias_kv / add_zero_attn with every head on, and nested tensors (nn.MultiheadAttention).

Semantics with a head mask m (bool, or float where exactly 0 means off): the output of
nn.MultiheadAttention computed with head h's attention output multiplied by m[b, h] before
out_proj (Hugging Face head_mask style). A float gate gets the straight-through gradient of
docs/design.md: exact for heads that ran, 0 for heads that were skipped (exact too with
dense_grad=True, which then computes every head densely).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import backend as _backend
from ..gates import HardConcrete, ste_threshold
from . import attention_paths as _paths
from .attention_masks import attention_mask_4d, head_mask_of

_GATES = ("none", "hard_concrete", "threshold")


class SparseMultiheadAttention(nn.MultiheadAttention):
    """Drop-in nn.MultiheadAttention (same constructor, parameters, state_dict, forward and outputs)
    that skips attention heads a head mask or a gate turns off.

    Extra constructor arguments (keyword-only):
      gate: None / 'none' (only the per-call `head_mask`), 'hard_concrete' (learned L0 gates, one
        per head, shared by the batch), 'threshold' (learned per-head scores through a
        straight-through threshold at 0), or a callable (e.g. an nn.Module, registered as a
        submodule) called as gate(query) with query batch-first [B, L, E] (or [L, E] unbatched)
        that returns a per-sample [B, H] or shared [H] mask (bool, or float with exact zeros).
      dense_grad: with a float mask that requires grad, also give skipped heads their exact
        gate gradient (computes every head densely; not the fast path).
      backend: which implementation of masked_head_attention runs the attention core: 'auto'
        (sparse_ops.set_backend's process-wide choice, else the fastest one built for the
        device), 'cpp', 'cuda', 'triton' or 'torch' (the reference; computes every pair). Also
        an attribute (`self.backend`), read at every call.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
            average_attn_weights=True, is_causal=False, head_mask=None) -> (output, weights)
      head_mask: [B, H] per sample or [H] shared, bool or float; multiplied by the learned gate
      when both are given. With need_weights=True the weights of heads that are off are zeros
      (computed densely, as nn.MultiheadAttention's own weights path is; pass need_weights=False
      for the fast path).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *,
                 gate: str | Callable | None = None, dense_grad: bool = False, backend: str = "auto"):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        if gate is None:
            gate = "none"
        if isinstance(gate, str):
            if gate not in _GATES:
                raise ValueError(f"SparseMultiheadAttention: gate must be one of {_GATES} or a callable; "
                                 f"got {gate!r}")
            self.gate_kind = gate
            if gate == "hard_concrete":
                self.gate = HardConcrete(num_heads)
            elif gate == "threshold":
                self.gate_scores = nn.Parameter(torch.ones(num_heads, device=device, dtype=dtype))
        elif callable(gate):
            self.gate_kind = "callable"
            self.gate = gate  # an nn.Module is registered (its parameters train with this module)
        else:
            raise TypeError(f"SparseMultiheadAttention: gate must be a string or a callable; "
                            f"got {type(gate).__name__}")
        self.dense_grad = dense_grad
        if backend not in _backend.BACKENDS:
            raise ValueError(f"SparseMultiheadAttention: backend must be one of {_backend.BACKENDS}; got {backend!r}")
        self.backend = backend

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, *, gate=None, dense_grad: bool = False, backend: str = "auto"
                    ) -> "SparseMultiheadAttention":
        """A SparseMultiheadAttention with the configuration and a copy of the weights of `mha`."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"SparseMultiheadAttention.from_module: expected an nn.MultiheadAttention; "
                            f"got {type(mha).__name__}")
        ref = mha.out_proj.weight
        m = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.out_proj.bias is not None,
                add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                vdim=mha.vdim, batch_first=mha.batch_first, device=ref.device, dtype=ref.dtype,
                gate=gate, dense_grad=dense_grad, backend=backend)
        # strict=False only for the gate's own parameters, which mha does not have.
        missing, unexpected = m.load_state_dict(mha.state_dict(), strict=False)
        own = set(mha.state_dict().keys())
        bad = [k for k in missing if not (k.startswith("gate.") or k == "gate_scores")] + list(unexpected)
        if bad or own - set(m.state_dict().keys()):
            raise RuntimeError(f"SparseMultiheadAttention.from_module: state_dict mismatch: {bad}")
        m.train(mha.training)
        return m

    def learned_gate(self, query: torch.Tensor) -> torch.Tensor | None:
        if self.gate_kind == "hard_concrete":
            return self.gate()
        if self.gate_kind == "threshold":
            return ste_threshold(self.gate_scores)
        if self.gate_kind == "callable":
            return self.gate(query)
        return None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}, gate={self.gate_kind!r}, dense_grad={self.dense_grad}, "
                f"backend={self.backend!r}")

    # ------------------------------------------------------------------ forward
    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False, head_mask=None):
        if query.is_nested or key.is_nested or value.is_nested:
            if head_mask is not None or self.gate_kind != "none":
                raise ValueError("SparseMultiheadAttention: head_mask / gate are not supported with nested "
                                 "tensor inputs (query/key/value)")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        is_batched = query.dim() == 3
        if query.dim() not in (2, 3):
            raise ValueError(f"SparseMultiheadAttention: query must be 3-D (batched) or 2-D (unbatched); "
                             f"got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"SparseMultiheadAttention: query, key and value must have the same number of "
                             f"dimensions; got {query.dim()}, {key.dim()}, {value.dim()}")
        # Batch-first views, [B, L, E] / [B, S, E] (a batch of 1 for unbatched input).
        if not is_batched:
            q_in, k_in, v_in = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif self.batch_first:
            q_in, k_in, v_in = query, key, value
        else:
            q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if key is value:
            v_in = k_in
        if query is key:
            k_in = q_in
            if key is value:
                v_in = q_in
        B, L, E = q_in.shape
        S = k_in.shape[1]
        if E != self.embed_dim:
            raise ValueError(f"SparseMultiheadAttention: query's last dimension must be embed_dim="
                             f"{self.embed_dim}; got {E}")
        if k_in.shape[:2] != v_in.shape[:2] or k_in.shape[0] != B:
            raise ValueError(f"SparseMultiheadAttention: key and value must share batch and sequence sizes "
                             f"with the query's batch; got key {tuple(key.shape)}, value {tuple(value.shape)}")
        if k_in.shape[-1] != self.kdim or v_in.shape[-1] != self.vdim:
            raise ValueError(f"SparseMultiheadAttention: key/value last dimensions must be kdim={self.kdim}, "
                             f"vdim={self.vdim}; got {k_in.shape[-1]}, {v_in.shape[-1]}")

        query_bf = q_in if is_batched else q_in[0]
        m = head_mask_of(head_mask, self.learned_gate(query_bf), self.num_heads, B, is_batched, query_bf.device,
                         query_bf.dtype)
        # (While torch.compile traces, a bool mask that happens to be all on takes the sparse path,
        # which gives the same result: no guard on the mask's values.)
        all_on = m is None or (m.dtype == torch.bool and not torch.compiler.is_compiling() and bool(m.all()))
        if all_on and (need_weights or self.bias_k is not None or self.add_zero_attn):
            # All heads on and a case the sparse code does not take: nn.MultiheadAttention itself.
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)

        mask4, causal = attention_mask_4d(key_padding_mask, attn_mask, is_causal, need_weights, B, self.num_heads,
                                          L, S, is_batched, q_in.dtype)
        dropout_p = self.dropout if self.training else 0.0
        w = _paths.Weights.of(self)
        if all_on:
            # No grouping, nothing gathered: in-projection GEMM -> masked_head_attention -> out-projection
            # GEMM in batch-first layout.
            # Measured (B=8, T=256, E=768, H=12, fp32, 2 threads, alternating order, medians of 16; the
            # attention core was F.scaled_dot_product_attention then): forward in eval 1.24-1.28x faster
            # than nn.MultiheadAttention's native fast path, forward+backward in training 1.08-1.14x, so
            # this replaces delegating to it. With masked_head_attention as the core, against the module
            # of b31d13d in one process (bench/ab_mha.py, same shapes, paired medians): time old/new
            # 1.009 forward, 1.010 forward+backward on the quiet machine (A/A 0.990 / 1.012); 0.985-1.000
            # and 0.969-0.997 loaded (A/A 0.954-1.010).
            out = _paths.forward_shared(w, q_in, k_in, v_in, None, None, mask4, causal, dropout_p, self.backend)
            return self._finish(out, None, is_batched)
        gated = m.is_floating_point()
        dense = (need_weights or self.bias_k is not None or self.add_zero_attn
                 or (self.dense_grad and gated and m.requires_grad))
        if dense:
            out, wts = _paths.forward_dense(w, q_in, k_in, v_in, m, mask4, causal, dropout_p, need_weights,
                                            average_attn_weights, self.dense_grad, self.backend)
        else:
            wts = None
            on = (m != 0) if gated else m
            out = _paths.forward_sparse(w, q_in, k_in, v_in, m, on, mask4, causal, dropout_p, self.backend)
        return self._finish(out, wts, is_batched)

    def _finish(self, out, w, is_batched):
        if not is_batched:
            return out[0], (None if w is None else w[0])
        if not self.batch_first:
            out = out.transpose(0, 1).contiguous()  # [L, B, E] laid out as nn.MultiheadAttention's
        return out, w


__all__ = ["SparseMultiheadAttention"]
