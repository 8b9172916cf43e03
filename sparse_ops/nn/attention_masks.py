"""SparseMultiheadAttention's mask normalisation, in nn.MultiheadAttention's conventions.

  head_mask_of(head_mask, gate, ...)   the per-call head_mask and the learned gate's mask, checked
                                       and combined into one head mask (bool, or float where
                                       exactly 0 means off), [B, H] or [H]
  attention_mask_4d(...)               attn_mask and key_padding_mask as one additive float mask
                                       broadcastable to [B, H, L, S], and whether is_causal is
                                       passed on to the attention (nn.MultiheadAttention's rule)
Errors name the argument and start with the module's name (`who`).
"""
from __future__ import annotations

import torch


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention's mask convention -> additive float: bool True = NOT allowed (-inf)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"got a mask of dtype {mask.dtype}; only bool and floating masks are supported")
    return mask.to(dtype)


def head_mask_of(head_mask, gate, num_heads: int, B: int, is_batched: bool, device: torch.device,
                 dtype: torch.dtype, who: str = "SparseMultiheadAttention"):
    """The head mask of one call: head_mask and the learned gate's output (either may be None),
    each [B, H] (per sample) or [H] (shared), bool or float; their product (bool: and) when both
    are given; a float mask in `dtype`; [H] for unbatched input. None when neither is given."""
    H = num_heads
    ms = []
    for name, t in (("head_mask", head_mask), ("gate", gate)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor or None; got {type(t).__name__}")
        if t.dtype != torch.bool and not t.is_floating_point():
            raise TypeError(f"{who}: {name} must be bool or floating (exactly 0 = off); got dtype {t.dtype}")
        ok = ((H,), (B, H)) if is_batched else ((H,), (1, H))
        if tuple(t.shape) not in ok:
            raise ValueError(f"{who}: {name} must be [B, H] = {[B, H]} (per sample) or [H] = {[H]} (shared); "
                             f"got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{who}: {name} must be on {device}; got {t.device}")
        ms.append(t)
    if not ms:
        return None
    if len(ms) == 2:
        a, b = ms
        if a.dtype == torch.bool and b.dtype == torch.bool:
            m = a & b
        else:
            m = (a.to(dtype) if a.dtype == torch.bool else a) * (b.to(dtype) if b.dtype == torch.bool else b)
    else:
        m = ms[0]
    if m.is_floating_point() and m.dtype != dtype:
        m = m.to(dtype)
    if not is_batched and m.dim() == 2:
        m = m[0]
    return m


def attention_mask_4d(key_padding_mask, attn_mask, is_causal: bool, need_weights: bool, B: int, H: int,
                      L: int, S: int, is_batched: bool, dtype: torch.dtype, who: str = "SparseMultiheadAttention"):
    """(mask4, causal): both masks as one additive float mask in `dtype` broadcastable to
    [B, H, L, S] (None if none), and whether to pass is_causal to the attention.

    nn.MultiheadAttention's rule: is_causal=True needs attn_mask (the causal mask) and is a hint
    that it is causal, used instead of the mask only when there is no key_padding_mask and no
    weights are asked for (top-left aligned, as SDPA's; for L < S as an explicit mask, since the
    op refuses is_causal with fewer queries than keys). attn_mask: [L, S], or [B*H, L, S] ([H, L, S] unbatched); bool True =
    not allowed, or additive float. key_padding_mask: [B, S] ([S] unbatched), same conventions.
    """
    if is_causal and attn_mask is None:
        raise RuntimeError(f"{who}: is_causal=True needs attn_mask (the causal mask), as nn.MultiheadAttention does")
    mask4 = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"{who}: attn_mask must be a tensor; got {type(attn_mask).__name__}")
        if is_causal and key_padding_mask is None and not need_weights:
            if L >= S:
                return None, True
            # nn.MultiheadAttention hands is_causal to SDPA here (top-left aligned); the op refuses
            # is_causal with L < S, so the same top-left mask goes in explicitly (True = not allowed).
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=attn_mask.device).tril().logical_not()
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (L, S):
                raise ValueError(f"{who}: 2-D attn_mask must be [L, S] = {[L, S]}; got {tuple(attn_mask.shape)}")
            mask4 = attn_mask.view(1, 1, L, S)
        elif attn_mask.dim() == 3:
            want = (B * H, L, S) if is_batched else (H, L, S)
            if tuple(attn_mask.shape) != want:
                raise ValueError(f"{who}: 3-D attn_mask must be {list(want)}; got {tuple(attn_mask.shape)}")
            mask4 = attn_mask.view(B, H, L, S)
        else:
            raise ValueError(f"{who}: attn_mask must be 2-D or 3-D; got {attn_mask.dim()}-D")
        try:
            mask4 = additive(mask4, dtype)
        except TypeError as e:
            raise TypeError(f"{who}: attn_mask: {e}") from None
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"{who}: key_padding_mask must be a tensor; got {type(key_padding_mask).__name__}")
        want = (B, S) if is_batched else (S,)
        if tuple(key_padding_mask.shape) != want:
            raise ValueError(f"{who}: key_padding_mask must be {list(want)}; got {tuple(key_padding_mask.shape)}")
        try:
            kpm = additive(key_padding_mask, dtype).view(B, 1, 1, S)
        except TypeError as e:
            raise TypeError(f"{who}: key_padding_mask: {e}") from None
        mask4 = kpm if mask4 is None else mask4 + kpm
    return mask4, False


__all__ = ["additive", "head_mask_of", "attention_mask_4d"]
