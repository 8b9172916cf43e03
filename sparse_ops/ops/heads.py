"""sparse_ops.masked_head_attention: attention whose switched-off (sample, head) pairs are never computed.

The wrapper checks the arguments, brings a float head_mask to q's dtype and calls, by backend:
  cpp / cuda -> torch.ops.sparse_ops.masked_head_attention  (csrc/cpu/heads_cpu.cpp)
  triton     -> sparse_ops/triton_kernels/heads.py (masked_head_attention_triton)
  torch      -> sparse_ops.reference.masked_head_attention  (computes every pair)
register_fake and register_autograd for the C++ op live here, beside the wrapper.
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .. import reference as _reference


def _check(q, k, v, head_mask, attn_mask):
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


def masked_head_attention(q, k, v, head_mask, *, attn_mask=None, is_causal=False, scale=None,
                          dense_grad=False, backend="auto"):
    """sdpa(q, k, v, attn_mask, is_causal, scale) * head_mask[..., None, None], for running pairs only.

    q [B, H, Tq, D]; k, v [B, H, Tk, D]; head_mask bool or float, [B, H] (per sample and head) or
    [H] (shared). A float gate of exactly 0 skips its pair (straight-through gradient: exact for
    pairs that ran; for skipped pairs 0, or exact with dense_grad=True, computed in backward only).
    attn_mask: bool (True = attend) or additive float, broadcastable to [B, H, Tq, Tk]; it gets
    no gradient. Pairs that do not run are never computed, forward or backward: their outputs and
    q/k/v gradients are exact zeros. Returns [B, H, Tq, D].
    """
    _check(q, k, v, head_mask, attn_mask)
    if head_mask.is_floating_point() and head_mask.dtype != q.dtype:
        head_mask = head_mask.to(q.dtype)
    name = _backend.choose("masked_head_attention", q.device, backend)
    if name == "torch":
        return _reference.masked_head_attention(q, k, v, head_mask, attn_mask=attn_mask, is_causal=is_causal,
                                                scale=scale, dense_grad=dense_grad)
    if name == "triton":
        from ..triton_kernels import heads as _theads
        return _theads.masked_head_attention(q, k, v, head_mask, attn_mask, is_causal, scale, dense_grad)
    return torch.ops.sparse_ops.masked_head_attention(q, k, v, head_mask, attn_mask, is_causal, scale,
                                                      dense_grad)[0]


# ----------------------------------------------------------------- registrations
def empty_bthd(q, T):
    """An empty [B, H, T, D] tensor laid out [B, T, H, D], like the kernels' outputs."""
    B, H, _, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2)


def _acc(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# Shared by this op and its Triton twin (sparse_ops/triton_kernels/heads.py), whose backward
# ops take the same arguments and return the same tensors.
def backward_fake(grad_out, q, k, v, head_mask, attn_mask, pairs, out, out_c, lse, is_causal, scale, dense_grad,
                  need):
    e = q.new_empty((0,))
    gated = head_mask.dtype != torch.bool
    return (empty_bthd(q, q.shape[2]) if need[0] else e, empty_bthd(q, k.shape[2]) if need[1] else e,
            empty_bthd(q, k.shape[2]) if need[2] else e,
            torch.empty_like(head_mask) if (need[3] and gated) else e)


def setup_context(ctx, inputs, output):
    q, k, v, head_mask, attn_mask, is_causal, scale, dense_grad = inputs
    out, pairs, out_c, lse = output
    ctx.save_for_backward(q, k, v, head_mask, attn_mask, pairs, out, out_c, lse)
    ctx.args = (is_causal, scale, dense_grad)


def autograd_backward(bwd_op):
    """The autograd formula of a forward op whose gradients come from bwd_op."""
    def backward(ctx, grad_out, _g_pairs, _g_out_c, _g_lse):
        q, k, v, head_mask, attn_mask, pairs, out, out_c, lse = ctx.saved_tensors
        nig = ctx.needs_input_grad
        gated = head_mask.dtype != torch.bool
        need = [bool(nig[0]), bool(nig[1]), bool(nig[2]), bool(nig[3]) and gated]
        if grad_out is None:
            grad_out = torch.zeros_like(q)
        dq, dk, dv, dm = bwd_op(grad_out, q, k, v, head_mask, attn_mask, pairs, out, out_c, lse, *ctx.args, need)
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                dm if need[3] else None, None, None, None, None)
    return backward


def _register():
    if not _backend.has_ext():
        return

    @torch.library.register_fake("sparse_ops::masked_head_attention")
    def _(q, k, v, head_mask, attn_mask, is_causal, scale, dense_grad):
        B, H, Tq, D = q.shape
        n = B * H
        P = torch.library.get_ctx().new_dynamic_size(min=0, max=n if isinstance(n, int) else None)
        out_c = q.new_empty((P, Tq, D)) if head_mask.dtype != torch.bool else q.new_empty((0,))
        return (torch.empty_like(q), q.new_empty((P,), dtype=torch.int64), out_c,
                q.new_empty((P, Tq), dtype=_acc(q.dtype)))

    torch.library.register_fake("sparse_ops::masked_head_attention_backward", backward_fake)
    torch.library.register_autograd(
        "sparse_ops::masked_head_attention",
        autograd_backward(torch.ops.sparse_ops.masked_head_attention_backward),
        setup_context=setup_context)


_register()
