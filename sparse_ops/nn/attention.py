"""SparseMultiheadAttention: nn.MultiheadAttention whose switched-off heads are never computed.

A head owns D = embed_dim // num_heads rows of each of Wq, Wk, Wv (and of their biases) and D
columns of Wo. A head that is off (for the whole batch, or for one sample) is not projected, not
attended and not output-projected: its weight rows/columns are never read, and their gradients
are exact zeros.

Paths (chosen per call, see `forward`):
  all heads on (no head mask)   -> F.linear -> SDPA -> F.linear, batch-first, nothing grouped or
                                   gathered (~10% faster than nn.MultiheadAttention, see forward);
                                   nn.MultiheadAttention.forward itself for need_weights=True,
                                   add_bias_kv, add_zero_attn and nested tensors
  shared head mask ([H], or     -> the active heads' rows of W_in and columns of Wo gathered once:
  [B, H] with equal rows)          one GEMM per projection, SDPA on [B, K, L, D] (a float gate
                                   without zeros: the full weights, nothing gathered)
  per-sample head mask [B, H]   -> samples grouped by their number of active heads K; per group
                                   batched GEMMs on the samples' own heads and SDPA on [n, K, L, D]
                                   (the numbers behind this choice: _forward_sparse)
  need_weights / add_bias_kv /  -> dense: every head computed, off heads selected away
  add_zero_attn / dense_grad       (torch.where, so nothing of theirs reaches the output)

Semantics with a head mask m (bool, or float where exactly 0 means off): the output of
nn.MultiheadAttention computed with head h's attention output multiplied by m[b, h] before
out_proj (Hugging Face head_mask style). A float gate gets the straight-through gradient of
DESIGN.md: exact for heads that ran, 0 for heads that were skipped (exact too with
dense_grad=True, which then computes every head densely).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..gates import HardConcrete, ste_threshold
from ..ops.heads import masked_head_attention

_GATES = ("none", "hard_concrete", "threshold")


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention's mask convention -> additive float: bool True = NOT allowed (-inf)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"got a mask of dtype {mask.dtype}; only bool and floating masks are supported")
    return mask.to(dtype)


class _GroupedInProj(torch.autograd.Function):
    """In-projection of groups of samples, each sample with its own R weight blocks:
    y_g = x[S_g] @ Wg^T + bg with Wg [n, R*D, E_in] the D-row blocks idx_g of W (viewed [N, D, E_in]),
    one batched GEMM per group. plan: [(S_g or None for all samples, n, R, idx_g)].

    One Function for every group, so that backward has one weight-gradient buffer: each group's
    blocks come straight from one bmm into an index_add. (Autograd through index_select and a
    bmm on the transposed gathered weight copied that [n, R*D, E_in] gradient once more, 28 MB a
    step at B=8, keep 0.5, and a Function per group zero-filled and summed a full-size gradient
    per group: ~20 ms of ~190 at 5 groups.) Blocks no sample uses get exact-zero gradients."""

    @staticmethod
    def forward(ctx, x, W, bias, plan, D):
        Ein = x.shape[-1]
        W2 = W.view(-1, D * Ein)
        ys, saved = [], []
        for S_t, n, R, idx in plan:
            xs = x if S_t is None else x.index_select(0, S_t)
            Wg = W2.index_select(0, idx).view(n, R * D, Ein)
            Wt = Wg.transpose(1, 2)
            if bias is None:
                ys.append(torch.bmm(xs, Wt))
            else:
                ys.append(torch.baddbmm(bias.view(-1, D).index_select(0, idx).view(n, 1, R * D), xs, Wt))
            saved += [xs, Wg]
        ctx.save_for_backward(*saved)
        ctx.plan, ctx.meta = plan, (x.shape, W.shape, None if bias is None else bias.shape, D)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *gys):
        saved = ctx.saved_tensors
        xshape, Wshape, bshape, D = ctx.meta
        Ein = xshape[-1]
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bshape is not None
        gx = saved[1].new_zeros(xshape) if need_x else None
        gW = saved[1].new_zeros(Wshape) if need_W else None
        gb = saved[1].new_zeros(bshape) if need_b else None
        for g, ((S_t, n, R, idx), gy) in enumerate(zip(ctx.plan, gys)):
            xs, Wg = saved[2 * g], saved[2 * g + 1]
            if need_x:
                dx = torch.bmm(gy, Wg)
                if S_t is None:
                    gx = dx
                else:
                    gx.index_copy_(0, S_t, dx)  # every sample is in one group at most
            if need_W:
                gW.view(-1, D * Ein).index_add_(0, idx, torch.bmm(gy.transpose(1, 2), xs).view(-1, D * Ein))
            if need_b:
                gb.view(-1, D).index_add_(0, idx, gy.sum(1).reshape(-1, D))
        return gx, gW, gb, None, None


class _GroupedOutProj(torch.autograd.Function):
    """Out-projection of groups of samples with K heads each: out[S_g] = o_g @ Wo[:, heads]^T + bo,
    o_g [n, L, K*D], heads idx_g [n*K] (Wo viewed [E, H, D]); samples in no group get bo (or 0).
    plan: [(S_g or None, n, K, idx_g)]. Columns no sample uses get exact-zero gradients."""

    @staticmethod
    def forward(ctx, Wo, bo, plan, B, L, D, *os):
        E = Wo.shape[0]
        out = None
        if not (len(plan) == 1 and plan[0][0] is None):
            out = Wo.new_empty(B, L, E)
            if bo is None:
                out.zero_()
            else:
                out.copy_(bo.expand(B, L, E))
        Wgs = []
        for (S_t, n, K, idx), o in zip(plan, os):
            Wg = Wo.view(E, -1, D).index_select(1, idx)  # [E, n*K, D]
            Wt = Wg.view(E, n, K * D).permute(1, 2, 0)  # [n, K*D, E]
            y = torch.bmm(o, Wt) if bo is None else torch.baddbmm(bo.view(1, 1, E), o, Wt)
            if S_t is None:
                out = y
            else:
                out.index_copy_(0, S_t, y)
            Wgs.append(Wg)
        ctx.save_for_backward(*os, *Wgs)
        ctx.plan, ctx.meta = plan, (Wo.shape, bo is not None, D)
        return out

    @staticmethod
    def backward(ctx, gout):
        saved = ctx.saved_tensors
        plan = ctx.plan
        Wshape, has_bias, D = ctx.meta
        E = Wshape[0]
        os, Wgs = saved[:len(plan)], saved[len(plan):]
        need_W, need_b = ctx.needs_input_grad[:2]
        need_o = ctx.needs_input_grad[6:]
        gW = Wgs[0].new_zeros(Wshape) if need_W else None
        gos = []
        for (S_t, n, K, idx), o, Wg, no in zip(plan, os, Wgs, need_o):
            gy = gout if S_t is None else gout.index_select(0, S_t)
            gos.append(torch.bmm(gy, Wg.view(E, n, K * D).permute(1, 0, 2)) if no else None)
            if need_W:
                dWg = torch.bmm(gy.transpose(1, 2), o)  # [n, E, K*D]
                gW.view(E, -1, D).index_add_(1, idx, dWg.permute(1, 0, 2).reshape(E, n * K, D))
        gb = gout.sum((0, 1)) if (need_b and has_bias) else None
        return (gW, gb, None, None, None, None, *gos)


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

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
            average_attn_weights=True, is_causal=False, head_mask=None) -> (output, weights)
      head_mask: [B, H] per sample or [H] shared, bool or float; multiplied by the learned gate
      when both are given. With need_weights=True the weights of heads that are off are zeros
      (computed densely, as nn.MultiheadAttention's own weights path is; pass need_weights=False
      for the fast path).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *,
                 gate: str | Callable | None = None, dense_grad: bool = False):
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

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, *, gate=None, dense_grad: bool = False
                    ) -> "SparseMultiheadAttention":
        """A SparseMultiheadAttention with the configuration and a copy of the weights of `mha`."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"SparseMultiheadAttention.from_module: expected an nn.MultiheadAttention; "
                            f"got {type(mha).__name__}")
        ref = mha.out_proj.weight
        m = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.out_proj.bias is not None,
                add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                vdim=mha.vdim, batch_first=mha.batch_first, device=ref.device, dtype=ref.dtype,
                gate=gate, dense_grad=dense_grad)
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
                f"batch_first={self.batch_first}, gate={self.gate_kind!r}, dense_grad={self.dense_grad}")

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

        m = self._head_mask(head_mask, q_in if is_batched else q_in[0], B, is_batched)
        all_on = m is None or (m.dtype == torch.bool and bool(m.all()))
        if all_on and (need_weights or self.bias_k is not None or self.add_zero_attn):
            # All heads on and a case the sparse code does not take: nn.MultiheadAttention itself.
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)

        mask4, causal = self._attn_mask(key_padding_mask, attn_mask, is_causal, need_weights, B, L, S,
                                        is_batched, q_in.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if all_on:
            # No grouping, nothing gathered: F.linear -> SDPA -> F.linear in batch-first layout.
            # Measured (B=8, T=256, E=768, H=12, fp32, 2 threads, alternating order, medians of 16):
            # forward in eval 1.24-1.28x faster than nn.MultiheadAttention's native fast path,
            # forward+backward in training 1.08-1.14x, so this replaces delegating to it.
            out, w = self._forward_shared(q_in, k_in, v_in, list(range(self.num_heads)), None, mask4, causal,
                                          dropout_p), None
            return self._finish(out, w, is_batched)
        gated = m.is_floating_point()
        dense = (need_weights or self.bias_k is not None or self.add_zero_attn
                 or (self.dense_grad and gated and m.requires_grad))
        if dense:
            out, w = self._forward_dense(q_in, k_in, v_in, m, mask4, causal, dropout_p, need_weights,
                                         average_attn_weights)
        else:
            w = None
            on = (m != 0) if gated else m
            out = self._forward_sparse(q_in, k_in, v_in, m, on, mask4, causal, dropout_p)
        return self._finish(out, w, is_batched)

    def _finish(self, out, w, is_batched):
        if not is_batched:
            return out[0], (None if w is None else w[0])
        if not self.batch_first:
            out = out.transpose(0, 1).contiguous()  # [L, B, E] laid out as nn.MultiheadAttention's
        return out, w

    # ------------------------------------------------------------------ argument handling
    def _head_mask(self, head_mask, query_bf, B, is_batched):
        H = self.num_heads
        g = self.learned_gate(query_bf)
        ms = []
        for name, t in (("head_mask", head_mask), ("gate", g)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"SparseMultiheadAttention: {name} must be a torch.Tensor or None; "
                                f"got {type(t).__name__}")
            if t.dtype != torch.bool and not t.is_floating_point():
                raise TypeError(f"SparseMultiheadAttention: {name} must be bool or floating (exactly 0 = off); "
                                f"got dtype {t.dtype}")
            ok = ((H,), (B, H)) if is_batched else ((H,), (1, H))
            if tuple(t.shape) not in ok:
                raise ValueError(f"SparseMultiheadAttention: {name} must be [B, H] = {[B, H]} (per sample) or "
                                 f"[H] = {[H]} (shared); got shape {tuple(t.shape)}")
            if t.device != query_bf.device:
                raise ValueError(f"SparseMultiheadAttention: {name} must be on {query_bf.device}; got {t.device}")
            ms.append(t)
        if not ms:
            return None
        if len(ms) == 2:
            a, b = ms
            if a.dtype == torch.bool and b.dtype == torch.bool:
                m = a & b
            else:
                m = (a.to(query_bf.dtype) if a.dtype == torch.bool else a) * \
                    (b.to(query_bf.dtype) if b.dtype == torch.bool else b)
        else:
            m = ms[0]
        if m.is_floating_point() and m.dtype != query_bf.dtype:
            m = m.to(query_bf.dtype)
        if not is_batched and m.dim() == 2:
            m = m[0]
        return m

    def _attn_mask(self, key_padding_mask, attn_mask, is_causal, need_weights, B, L, S, is_batched, dtype):
        """Both masks as one additive float mask broadcastable to [B, H, L, S] (None if none), and
        whether to pass is_causal to the attention (nn.MultiheadAttention's rule: is_causal is a
        hint that attn_mask is causal, used instead of the mask only when there is no
        key_padding_mask and no weights are asked for)."""
        H = self.num_heads
        if is_causal and attn_mask is None:
            raise RuntimeError("SparseMultiheadAttention: is_causal=True needs attn_mask (the causal mask), "
                               "as nn.MultiheadAttention does")
        mask4 = None
        if attn_mask is not None:
            if not isinstance(attn_mask, torch.Tensor):
                raise TypeError(f"SparseMultiheadAttention: attn_mask must be a tensor; got {type(attn_mask).__name__}")
            if is_causal and key_padding_mask is None and not need_weights:
                return None, True
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S):
                    raise ValueError(f"SparseMultiheadAttention: 2-D attn_mask must be [L, S] = {[L, S]}; "
                                     f"got {tuple(attn_mask.shape)}")
                mask4 = attn_mask.view(1, 1, L, S)
            elif attn_mask.dim() == 3:
                want = (B * H, L, S) if is_batched else (H, L, S)
                if tuple(attn_mask.shape) != want:
                    raise ValueError(f"SparseMultiheadAttention: 3-D attn_mask must be {list(want)}; "
                                     f"got {tuple(attn_mask.shape)}")
                mask4 = attn_mask.view(B, H, L, S)
            else:
                raise ValueError(f"SparseMultiheadAttention: attn_mask must be 2-D or 3-D; got {attn_mask.dim()}-D")
            try:
                mask4 = _additive(mask4, dtype)
            except TypeError as e:
                raise TypeError(f"SparseMultiheadAttention: attn_mask: {e}") from None
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor):
                raise TypeError(f"SparseMultiheadAttention: key_padding_mask must be a tensor; "
                                f"got {type(key_padding_mask).__name__}")
            want = (B, S) if is_batched else (S,)
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(f"SparseMultiheadAttention: key_padding_mask must be {list(want)}; "
                                 f"got {tuple(key_padding_mask.shape)}")
            try:
                kpm = _additive(key_padding_mask, dtype).view(B, 1, 1, S)
            except TypeError as e:
                raise TypeError(f"SparseMultiheadAttention: key_padding_mask: {e}") from None
            mask4 = kpm if mask4 is None else mask4 + kpm
        return mask4, False

    def _weights(self):
        """(W(i, r), b(i, r)): the rows of projections i..i+r-1 (0 q, 1 k, 2 v) as one 2-D weight
        [r*E, E_in] and its bias [r*E] (or None); views, never copies."""
        E = self.embed_dim
        bias = self.in_proj_bias
        b = (lambda i, r: None) if bias is None else (lambda i, r: bias[i * E:(i + r) * E])
        if self._qkv_same_embed_dim:
            W = self.in_proj_weight
            return (lambda i, r: W[i * E:(i + r) * E]), b
        Ws = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        return (lambda i, r: Ws[i]), b

    def _groups(self, q_in, k_in, v_in):
        """[(input, first component, r)]: which projections run as one GEMM."""
        if self._qkv_same_embed_dim:
            if q_in is k_in and k_in is v_in:
                return [(q_in, 0, 3)]
            if k_in is v_in:
                return [(q_in, 0, 1), (k_in, 1, 2)]
        return [(q_in, 0, 1), (k_in, 1, 1), (v_in, 2, 1)]

    # ------------------------------------------------------------------ sparse paths
    def _forward_sparse(self, q_in, k_in, v_in, m, on, mask4, causal, dropout_p):
        """Only the (sample, head) pairs that are on.

        Shared mask ([H], or [B, H] with equal rows): the active heads' rows of W_in and columns of
        Wo are gathered once; each projection is one GEMM over the batch, SDPA runs on [B, K, L, D].
        Per-sample mask [B, H]: samples are grouped by their number K of active heads (a batch
        whose samples all have the same K, e.g. top-k gates, is one group). Group g (n samples)
        gathers its samples' rows of x and their heads' weight rows / Wo columns, and runs one
        batched GEMM per projection
        ([n, T, E] @ [n, E, r*K*D], _GroupedInProj), SDPA on [n, K, L, D] and one batched
        out-projection ([n, L, K*D] @ [n, K*D, E], _GroupedOutProj).

        Measured (B=8, T=256, E=768, H=12, fp32, torch.set_num_threads(2) on the shared 2-core
        CPU; forward in eval under inference_mode, where nn.MultiheadAttention takes its native
        fast path; forward+backward in training; medians of 16 rounds, case order alternating;
        speedup over dense nn.MultiheadAttention, need_weights=False):
          per-sample keep 0.5 (6 of 12 heads per sample): grouped per sample (this) fwd 1.88x,
            fwd+bwd 1.88x (keep 0.25: 3.66x / 3.77x); grouped per head instead (MoE-style: gather
            the samples that use head h, [n_h, T, E] @ [E, 3D] GEMMs, SDPA on [n_h, 1, T, D],
            index_add of each head's out-projection into the output) fwd 1.70x, fwd+bwd 1.32x
            (keep 0.25: 2.45x / 2.17x): N=3D=192 GEMMs, a copy of x per head and an index_add of
            a [n_h, T, E] output per head. Kept: per sample.
          per-sample Bernoulli(0.5) masks (46 of 96 pairs on, K per sample 4..8: 5 groups):
            fwd 1.88x, fwd+bwd 1.77x; shared [H] keep 0.5: fwd 2.38x, fwd+bwd 2.15x.
          Before _GroupedInProj, autograd through index_select + bmm on the transposed weight copied
            the weight gradient again and split/cat'ed it per group: fwd+bwd 1.58x.
          One GEMM per run of consecutive heads reading the weights in place (no gathers, ~80
            small GEMMs per call) lost on a loaded machine: the number of ops, each of which
            synchronises both threads, mattered more than the 37 MB of weight copies saved.
        """
        B, L = q_in.shape[:2]
        H = self.num_heads
        gated = m.is_floating_point()
        if m.dim() == 1 or bool((on == on[:1]).all()):
            row = on.reshape(-1, H)[0].tolist() if on.numel() else [False] * H  # (an empty batch runs nothing)
            heads = [h for h, o in enumerate(row) if o]
            scale = None
            if gated:
                scale = m[..., heads]
                scale = scale.view(1, len(heads), 1, 1) if scale.dim() == 1 else scale.view(B, len(heads), 1, 1)
            return self._forward_shared(q_in, k_in, v_in, heads, scale, mask4, causal, dropout_p)
        return self._forward_per_sample(q_in, k_in, v_in, m if gated else None, on, mask4, causal, dropout_p)

    def _forward_per_sample(self, q_in, k_in, v_in, gate, on, mask4, causal, dropout_p):
        H, D, E = self.num_heads, self.head_dim, self.embed_dim
        B, L = q_in.shape[:2]
        dev = q_in.device
        rows = on.tolist()
        by_k = {}
        for b, row in enumerate(rows):
            by_k.setdefault(sum(row), []).append(b)
        groups = []  # (S_t or None, samples, K, heads per sample) for the groups that run something
        for K in sorted(by_k):
            samples = by_k[K]
            if K > 0:
                S_t = None if len(samples) == B else torch.tensor(samples, dtype=torch.long, device=dev)
                groups.append((S_t, samples, K, [[h for h, o in enumerate(rows[b]) if o] for b in samples]))
        W_in, b_in = self._weights()
        comps = [[None] * len(groups) for _ in range(3)]
        for x, i, r in self._groups(q_in, k_in, v_in):
            plan = [(S_t, len(smp), r * K,
                     torch.tensor([c * H + h for hs in heads for c in range(r) for h in hs], dtype=torch.long,
                                  device=dev))
                    for S_t, smp, K, heads in groups]
            ys = _GroupedInProj.apply(x, W_in(i, r), b_in(i, r), plan, D)
            for g, ((_, smp, K, _), y) in enumerate(zip(groups, ys)):
                for j, c in enumerate(y.view(len(smp), x.shape[1], r, K, D).unbind(2)):
                    comps[i + j][g] = c.transpose(1, 2)  # [n, K, T, D]
        os, plan = [], []
        for g, (S_t, smp, K, heads) in enumerate(groups):
            n = len(smp)
            am = mask4
            if am is not None:
                if am.shape[0] > 1 and S_t is not None:
                    am = am.index_select(0, S_t)
                if am.shape[1] > 1:  # a per-head mask: each sample's own heads
                    am = am.expand(n, *am.shape[1:])[torch.arange(n, device=dev)[:, None],
                                                     torch.tensor(heads, dtype=torch.long, device=dev)]
            o = F.scaled_dot_product_attention(comps[0][g], comps[1][g], comps[2][g], attn_mask=am,
                                               dropout_p=dropout_p, is_causal=causal)
            if gate is not None:
                gs, ons = (gate, on) if S_t is None else (gate.index_select(0, S_t), on.index_select(0, S_t))
                o = o * gs[ons].view(n, K, 1, 1)  # row-major: the order of `heads`
            os.append(o.transpose(1, 2).reshape(n, L, K * D))  # free: SDPA's output is laid out [n, L, K, D]
            plan.append((S_t, n, K, torch.tensor([h for hs in heads for h in hs], dtype=torch.long, device=dev)))
        return _GroupedOutProj.apply(self.out_proj.weight, self.out_proj.bias, plan, B, L, D, *os)

    def _forward_shared(self, q_in, k_in, v_in, heads, scale, mask4, causal, dropout_p):
        """The heads in `heads` (sorted) for every sample; scale: None, [1, K, 1, 1] or [B, K, 1, 1]."""
        H, D, E = self.num_heads, self.head_dim, self.embed_dim
        dev = q_in.device
        B, L = q_in.shape[:2]
        K = len(heads)
        every = K == H  # every head on (a float gate without zeros): nothing to gather
        h_t = torch.tensor(heads, dtype=torch.long, device=dev)
        W_in, b_in = self._weights()
        comps = [None, None, None]
        for x, i, r in self._groups(q_in, k_in, v_in):
            W, bias = W_in(i, r), b_in(i, r)
            Ein = W.shape[-1]
            if not every:
                idx = torch.tensor([c * H + h for c in range(r) for h in heads], dtype=torch.long, device=dev)
                W = W.view(r * H, D * Ein).index_select(0, idx).view(r * K * D, Ein)
                bias = None if bias is None else bias.view(r * H, D).index_select(0, idx).view(-1)
            y = F.linear(x, W, bias)
            # unbind, not r selects: its backward is one stack, where each select's backward would
            # zero-fill and copy a whole y-sized gradient.
            comps[i:i + r] = [c.transpose(1, 2) for c in y.view(B, x.shape[1], r, K, D).unbind(2)]  # [B, K, T, D]
        q, k, v = comps
        if K == 0:
            # Nothing runs; the empty weight slices stay in the graph so that the parameters get
            # zero gradients, not None.
            o = q + (k.sum() + v.sum())
        else:
            am = mask4
            if am is not None and am.shape[1] > 1 and not every:
                am = am.index_select(1, h_t)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=am, dropout_p=dropout_p, is_causal=causal)
        if scale is not None:
            o = o * scale
        o = o.transpose(1, 2).reshape(B, L, K * D)
        Wo = self.out_proj.weight
        if not every:
            Wo = Wo.view(E, H, D).index_select(1, h_t).reshape(E, K * D)
        return F.linear(o, Wo, self.out_proj.bias)

    # ------------------------------------------------------------------ dense (weights, bias_kv, zero_attn)
    def _forward_dense(self, q_in, k_in, v_in, m, mask4, causal, dropout_p, need_weights, average):
        """Every head computed (not the fast path), as F.multi_head_attention_forward does, then the
        heads that are off selected away before out_proj (torch.where: nothing of theirs, not even a
        NaN, reaches the output). Used for need_weights=True, add_bias_kv, add_zero_attn and
        dense_grad. Returned weights of heads that are off are zeros."""
        H, D, E = self.num_heads, self.head_dim, self.embed_dim
        B, L, _ = q_in.shape
        W_in, b_in = self._weights()
        comps = [None, None, None]
        for x, i, r in self._groups(q_in, k_in, v_in):
            y = F.linear(x, W_in(i, r), b_in(i, r))
            y = y.view(B, x.shape[1], r, H, D)
            for j in range(r):
                comps[i + j] = y[:, :, j].transpose(1, 2)  # [B, H, T, D]
        q, k, v = comps
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.view(1, H, 1, D).expand(B, H, 1, D)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, H, 1, D).expand(B, H, 1, D)], dim=2)
            mask4 = None if mask4 is None else F.pad(mask4, (0, 1))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, D)], dim=2)
            v = torch.cat([v, v.new_zeros(B, H, 1, D)], dim=2)
            mask4 = None if mask4 is None else F.pad(mask4, (0, 1))
        gated = m.is_floating_point()
        mb = m.view(-1, H, 1, 1) if m.dim() == 2 else m.view(1, H, 1, 1)
        on = (mb != 0) if gated else mb
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        w = None
        if need_weights:
            s = (q * (1.0 / D) ** 0.5) @ k.transpose(-2, -1)
            if mask4 is not None:
                s = s + mask4
            p = torch.softmax(s, dim=-1)
            if dropout_p > 0.0:
                p = F.dropout(p, p=dropout_p)
            o = p @ v
            w = torch.where(on, p * mb, zero) if gated else torch.where(on, p, zero)
            if average:
                w = w.mean(dim=1)
            o = torch.where(on, o * mb, zero) if gated else torch.where(on, o, zero)
        elif dropout_p == 0.0 and k.shape[2] > 0:
            # masked_head_attention takes the attention mask in SDPA's form (bool True = attend, or
            # additive float; ours is additive) and gives dense_grad's exact gate gradient.
            o = masked_head_attention(q, k, v, m, attn_mask=mask4, is_causal=causal, dense_grad=self.dense_grad)
        else:
            if self.dense_grad and gated and m.requires_grad:
                raise ValueError("SparseMultiheadAttention: dense_grad=True is not supported with dropout > 0 "
                                 "in training (dropout)")
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask4, dropout_p=dropout_p, is_causal=causal)
            o = torch.where(on, o * mb, zero) if gated else torch.where(on, o, zero)
        out = F.linear(o.transpose(1, 2).reshape(B, L, E), self.out_proj.weight, self.out_proj.bias)
        return out, w


__all__ = ["SparseMultiheadAttention"]
