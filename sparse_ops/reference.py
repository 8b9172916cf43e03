"""Plain-PyTorch reference of every op: the test oracle, and the `torch` backend.

These compute everything (masking by multiplication/selection) and are written for
clarity, not speed. Each follows the semantics in docs/design.md exactly, including the
straight-through gate gradient: a unit skipped by a zero gate gets gate gradient 0
unless dense_grad=True.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import activations as _acts


# gated_ffn calls with at most this many rows are decode: one row tile of the decode kernels
# (csrc/ffn_plan.h kDecodeMaxRows, sparse_ops/triton_kernels/ffn.py decode_gemv).
FFN_DECODE_MAX_ROWS = 16


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type the ops accumulate in (and save lse in): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ffn_per_row(active, gate) -> bool:
    """Whether gated_ffn's running columns differ by row (then the op returns its row plan)."""
    return (active is not None and active.dtype == torch.bool and active.dim() == 2) or \
        (gate is not None and gate.dim() == 2)


def _holds(ok, msg, on_device, detail=None):
    """ok (a bool tensor) must be true: on CUDA checked on the device (no host synchronisation),
    else a ValueError with msg (and "; " + detail(), the offending values, computed only then)."""
    if on_device:
        torch._assert_async(ok, msg)
    elif not bool(ok):
        raise ValueError(msg if detail is None else f"{msg}; {detail()}")


def check_ffn_indices(active, F_: int, op: str = "gated_ffn") -> None:
    """int64 `active` must be 1-D, distinct and in [0, F), on every backend.

    On CUDA the check runs on the device (torch._assert_async: no host synchronisation); on the
    host it raises ValueError here. Meta tensors have no values to check."""
    if active is None or active.dtype != torch.int64 or active.device.type == "meta":
        return
    if active.dim() != 1:
        raise ValueError(f"{op}: active indices must be 1-D [K]; got {list(active.shape)}")
    if active.numel() == 0:
        return
    srt = torch.sort(active).values
    ok = (srt[0] >= 0) & (srt[-1] < F_) & (srt[1:] > srt[:-1]).all()
    msg = f"{op}: active indices must be distinct and in [0, F) = [0, {F_})"
    _holds(ok, msg, active.is_cuda, lambda: f"got min {int(srt[0])}, max {int(srt[-1])}, "
                                            f"{int((srt[1:] == srt[:-1]).sum())} repeated")


CAUSAL_HINT = ("The causal mask is top-left aligned, as F.scaled_dot_product_attention's, which with a KV "
               "cache would hide the cached keys from the new queries: for decode pass is_causal=False (one "
               "query sees every key), for a chunk of queries after a cache pass the bottom-right mask as "
               "attn_mask.")


def check_causal(Tq: int, Tk: int, is_causal: bool, op: str = "masked_head_attention") -> None:
    """is_causal needs Tq >= Tk (CAUSAL_HINT says why and what to pass instead); every backend."""
    if is_causal and Tq < Tk:
        raise ValueError(f"{op}: is_causal=True needs Tq >= Tk; got Tq = {Tq} < Tk = {Tk}. {CAUSAL_HINT}")


def check_row_indices(idx, rows: int, op: str) -> None:
    """Row ids idx (int64 [K]) must be in [-1, rows) (-1: padding) and not repeat a row.

    On CUDA the check runs on the device (torch._assert_async: no host synchronisation); on the
    host it raises ValueError here."""
    if idx.numel() == 0 or idx.device.type == "meta":
        return
    lo, hi = torch.aminmax(idx)
    ok = (lo >= -1) & (hi < rows)
    if rows > 0:
        counts = torch.zeros(rows + 1, dtype=torch.int64, device=idx.device)
        counts.index_add_(0, idx.clamp(-1, rows - 1) + 1, torch.ones_like(idx))
        ok = ok & (counts[1:].max() <= 1)
    msg = f"{op}: idx must be in [-1, {rows}) (-1 = padding) and must not repeat a row"
    _holds(ok, msg, idx.is_cuda, lambda: f"got min {int(lo)}, max {int(hi)}")


def check_sorted_subset(idx, run, what: str) -> None:
    """The saved index list idx (int64 [K]) of a backward op must be the sorted positions where the
    bool vector run is true, as the forward made it: strictly increasing, in range, each one
    running, as many as run has. Checked before anything indexes with it."""
    n = run.shape[0]
    if idx.dtype != torch.int64 or idx.dim() != 1 or idx.device != run.device:
        raise ValueError(f"{what}; got {idx.dtype} {list(idx.shape)} on {idx.device}")
    if idx.device.type == "meta":
        return
    K = idx.shape[0]
    ok = run.sum() == K
    if K:
        ok = ok & (idx.min() >= 0) & (idx.max() < n) & run[idx.clamp(0, max(n - 1, 0))].all()
        if K > 1:
            ok = ok & (idx[1:] > idx[:-1]).all()
    _holds(ok, what, idx.is_cuda)


def check_shape(t, shape, what: str, dtype=None) -> None:
    """A saved tensor of a backward op has the shape (and dtype) the forward gave it."""
    if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype):
        raise ValueError(f"{what} must be {dtype or t.dtype} {list(shape)} (as the forward returned it); got "
                         f"{t.dtype} {list(t.shape)}")


def ffn_mask(active, F_: int, device) -> torch.Tensor:
    """`active` (None, int64 [K], bool [F] or bool [..., F]) as a bool mask broadcastable to [..., F]."""
    if active is None:
        return torch.ones(F_, dtype=torch.bool, device=device)
    if active.dtype == torch.bool:
        return active
    m = torch.zeros(F_, dtype=torch.bool, device=device)
    m[active] = True
    return m


def gated_ffn(x, w1, w2, active=None, *, b1=None, b2=None, w3=None, gate=None,
              activation="gelu", w2_transposed=False, dense_grad=False):
    """F.linear(act(x w1^T + b1) [* x w3^T] * mask * gate, w2, b2), computed densely."""
    act = _acts.forward(activation)
    F_ = w1.shape[0]
    h = act(F.linear(x, w1, b1))
    if w3 is not None:
        h = h * F.linear(x, w3)
    mask = ffn_mask(active, F_, x.device)
    if gate is not None:
        run = mask & (gate != 0)
        # Units a zero gate skipped contribute 0 either way (h * 0); selecting them with
        # the bool mask alone (dense_grad) gives them their exact gate gradient.
        zero = torch.zeros((), dtype=h.dtype, device=h.device)
        hg = torch.where(mask if dense_grad else run, h * gate, zero)
    else:
        hg = torch.where(mask, h, torch.zeros((), dtype=h.dtype, device=h.device))
    w2n = w2.t() if w2_transposed else w2
    return F.linear(hg, w2n, b2)


def masked_head_attention(q, k, v, head_mask, *, attn_mask=None, is_causal=False, scale=None,
                          dense_grad=False):
    """F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal, scale) * head_mask[..., None, None].

    q [B, H, Tq, D], k/v [B, H, Tk, D]; head_mask bool or float, [B, H] or [H]. Computed densely;
    pairs that do not run are selected away (where, not a multiply), so nothing from them (not
    even a NaN) reaches the output. A float gate gets the straight-through gradient: pairs a zero
    gate skipped get gate gradient 0 unless dense_grad=True.
    """
    if is_causal and attn_mask is not None:
        # Both: the causal (top-left aligned) mask and attn_mask apply together, as in ATen's flash
        # kernel (F.scaled_dot_product_attention refuses the pair on some paths).
        Tq, Tk = q.shape[-2], k.shape[-2]
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
        attn_mask = (attn_mask & causal) if attn_mask.dtype == torch.bool else \
            attn_mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    m = head_mask[..., None, None]
    zero = torch.zeros((), dtype=o.dtype, device=o.device)
    if m.dtype == torch.bool:
        return torch.where(m, o, zero)
    return torch.where(m != 0, o * m, zero) if not dense_grad else o * m


def gather_rows(x, idx):
    """out[k] = x[idx[k]], zeros where idx[k] == -1 (padding)."""
    out = x.index_select(0, idx.clamp_min(0))
    pad = idx < 0  # masked_fill whether or not any row pads: no host sync, and meta tensors work
    return out.masked_fill(pad.view(-1, *([1] * (x.dim() - 1))), 0)


def scatter_rows(x, idx, src, gate=None):
    """y = x with y[idx[k]] = src[k], or x[i] + gate[k] * (src[k] - x[i]); padding rows (-1) skipped."""
    if x.device.type == "meta":  # shapes only: which rows are padding needs idx's values
        return torch.empty_like(x)
    keep = idx >= 0
    i, s = idx[keep], src[keep]
    if gate is not None:
        g = gate[keep].view(-1, *([1] * (x.dim() - 1)))
        xi = x.index_select(0, i)
        s = xi + g * (s - xi)
    return x.index_copy(0, i, s)
