"""sparse_ops.masked_head_attention: attention whose switched-off (sample, head) pairs are never computed.

The wrapper checks the arguments, brings a float head_mask to q's dtype and runs
`sparse_ops::masked_head_attention` on the chosen backend (sparse_ops/ops/registry.py:
cpp / cuda -> csrc, triton -> sparse_ops/triton_kernels/heads.py, torch -> sparse_ops.reference,
which computes every pair). The op's fake kernel and autograd formula are defined here, once,
for every backend.
"""
from __future__ import annotations

import torch

from .. import reference as _reference
from . import registry as _registry


def _check(q, k, v, head_mask, attn_mask, is_causal):
    for name, t in (("q", q), ("k", k), ("v", v), ("head_mask", head_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"masked_head_attention: {name} must be a torch.Tensor; got {type(t).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"masked_head_attention: attn_mask must be a torch.Tensor or None; "
                        f"got {type(attn_mask).__name__}")
    for name, t in (("k", k), ("v", v), ("head_mask", head_mask), ("attn_mask", attn_mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"masked_head_attention: {name} must be on the same device as q ({q.device}); "
                             f"got {t.device}")
    if q.dim() != 4:
        raise ValueError(f"masked_head_attention: q must be 4-D [B, H, Tq, D]; got shape {tuple(q.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"masked_head_attention: q must be a floating tensor; got dtype {q.dtype}")
    B, H = q.shape[:2]
    if tuple(head_mask.shape) not in ((B, H), (H,)):
        raise ValueError(f"masked_head_attention: head_mask must be [B, H] = {[B, H]} or [H] = {[H]}; "
                         f"got shape {tuple(head_mask.shape)}")
    if head_mask.dtype != torch.bool and not head_mask.is_floating_point():
        raise TypeError(f"masked_head_attention: head_mask must be bool or floating; got dtype {head_mask.dtype}")
    if k.dim() == 4:
        _reference.check_causal(q.shape[2], k.shape[2], is_causal)


def masked_head_attention(q, k, v, head_mask, *, attn_mask=None, is_causal=False, scale=None,
                          dense_grad=False, backend="auto"):
    """sdpa(q, k, v, attn_mask, is_causal, scale) * head_mask[..., None, None], for running pairs only.

    q [B, H, Tq, D]; k, v [B, H, Tk, D]; head_mask bool or float, [B, H] (per sample and head) or
    [H] (shared). A float gate of exactly 0 skips its pair (straight-through gradient: exact for
    pairs that ran; for skipped pairs 0, or exact with dense_grad=True, computed in backward only).
    attn_mask: bool (True = attend) or additive float, broadcastable to [B, H, Tq, Tk]; it gets
    no gradient. Pairs that do not run are never computed, forward or backward: their outputs and
    q/k/v gradients are exact zeros. Returns [B, H, Tq, D].
    is_causal: the causal mask is top-left aligned (key j visible to query i iff j <= i), as
    F.scaled_dot_product_attention's, and needs Tq >= Tk: with a KV cache (Tq < Tk) pass
    is_causal=False for one query, or the bottom-right mask as attn_mask for a chunk of queries.
    On CUDA the running pairs cost one host synchronisation per call (their count depends on
    head_mask's values: torch.nonzero); dense_grad=True with skipped pairs, one more in backward.
    """
    _check(q, k, v, head_mask, attn_mask, is_causal)
    if head_mask.is_floating_point() and head_mask.dtype != q.dtype:
        head_mask = head_mask.to(q.dtype)
    return _registry.run("masked_head_attention", q.device, backend, q, k, v, head_mask, attn_mask, is_causal,
                         scale, dense_grad)


# ----------------------------------------------------------------- registration
def empty_bthd(q, T):
    """An empty [B, H, T, D] tensor laid out [B, T, H, D], like the kernels' outputs."""
    B, H, _, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2)


def _fake(q, k, v, head_mask, attn_mask, is_causal, scale, dense_grad):
    B, H, Tq, D = q.shape
    n = B * H
    P = torch.library.get_ctx().new_dynamic_size(min=0, max=n if isinstance(n, int) else None)
    out_c = q.new_empty((P, Tq, D)) if head_mask.dtype != torch.bool else q.new_empty((0,))
    # out in q's layout (empty_like's rule: q's strides when dense, else contiguous), as every kernel
    # allocates it; gradients laid out [B, T, H, D].
    return (torch.empty_like(q), q.new_empty((P,), dtype=torch.int64), out_c,
            q.new_empty((P, Tq), dtype=_reference.acc_dtype(q.dtype)))


def _backward_fake(grad_out, q, k, v, head_mask, attn_mask, pairs, out, out_c, lse, is_causal, scale, dense_grad,
                   need):
    e = q.new_empty((0,))
    gated = head_mask.dtype != torch.bool
    return (empty_bthd(q, q.shape[2]) if need[0] else e, empty_bthd(q, k.shape[2]) if need[1] else e,
            empty_bthd(q, k.shape[2]) if need[2] else e,
            torch.empty_like(head_mask) if (need[3] and gated) else e)


def _setup_context(ctx, inputs, output):
    q, k, v, head_mask, attn_mask, is_causal, scale, dense_grad = inputs
    out, pairs, out_c, lse = output
    ctx.save_for_backward(q, k, v, head_mask, attn_mask, pairs, out, out_c, lse)
    ctx.args = (is_causal, scale, dense_grad)


def _backward(lookup):
    def backward(ctx, grad_out, _g_pairs, _g_out_c, _g_lse):
        q, k, v, head_mask, attn_mask, pairs, out, out_c, lse = ctx.saved_tensors
        nig = ctx.needs_input_grad
        gated = head_mask.dtype != torch.bool
        need = [bool(nig[0]), bool(nig[1]), bool(nig[2]), bool(nig[3]) and gated]
        if grad_out is None:
            grad_out = torch.zeros_like(q)
        dq, dk, dv, dm = lookup("masked_head_attention_backward")(
            grad_out, q, k, v, head_mask, attn_mask, pairs, out, out_c, lse, *ctx.args, need)
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                dm if need[3] else None, None, None, None, None)
    return backward


def _triton_forward():
    from ..triton_kernels import heads as k
    return k.forward


def _triton_backward():
    from ..triton_kernels import heads as k
    return k.backward


def _reference_forward(q, k, v, head_mask, attn_mask, is_causal, scale, dense_grad):
    return _reference.masked_head_attention(q, k, v, head_mask, attn_mask=attn_mask, is_causal=is_causal,
                                            scale=scale, dense_grad=dense_grad)


_registry.define("masked_head_attention", fake=_fake, setup_context=_setup_context, backward=_backward,
                 triton=_triton_forward, reference=_reference_forward)
_registry.define("masked_head_attention_backward", fake=_backward_fake, triton=_triton_backward)
