"""A TEAL-style sparse GEMV in Triton: the decode baseline of the CUDA FFN rows (bench/ffn.py).

TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models") skips the
weight rows of zero inputs with a split-K GEMV, one input row at a time. Written here for the
benchmark only (nothing in sparse_ops uses it), for the column-sparse FFN:
  up:   y[n, k] = sum_d w[idx[k], d] * x[n, d]           rows idx of w1 / w3 (contiguous along d)
  down: out[n, :] += sum_k h[n, k] * w2t[idx[k], :]      rows idx of w2^T, split over k, atomics
Each row n of the batch is its own GEMV (grid axis 1), so the weights are read once per row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _up(w_ptr, idx_ptr, x_ptr, y_ptr, K, D, s_w, BK: tl.constexpr, BD: tl.constexpr):
    n = tl.program_id(1)
    rk = tl.program_id(0) * BK + tl.arange(0, BK)
    k_ok = rk < K
    rows = tl.load(idx_ptr + rk, mask=k_ok, other=0)
    acc = tl.zeros((BK,), tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        d_ok = rd < D
        xv = tl.load(x_ptr + n * D + rd, mask=d_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * s_w + rd[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
    tl.store(y_ptr + n * K + rk, acc, mask=k_ok)


@triton.jit
def _down(h_ptr, w_ptr, idx_ptr, out_ptr, K, D, k_per, s_w, BK: tl.constexpr, BD: tl.constexpr):
    n = tl.program_id(1)
    rd = tl.program_id(0) * BD + tl.arange(0, BD)
    d_ok = rd < D
    acc = tl.zeros((BD,), tl.float32)
    k_lo = tl.program_id(2) * k_per
    for k0 in range(k_lo, tl.minimum(k_lo + k_per, K), BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        rows = tl.load(idx_ptr + rk, mask=k_ok, other=0)
        hv = tl.load(h_ptr + n * K + rk, mask=k_ok, other=0.0)
        w = tl.load(w_ptr + rows[:, None] * s_w + rd[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * hv[:, None], axis=0)
    tl.atomic_add(out_ptr + n * D + rd, acc, mask=d_ok, sem="relaxed")


def _rows_gemv(w, idx, x):
    N, D = x.shape
    K = idx.shape[0]
    y = torch.empty(N, K, dtype=torch.float32, device=x.device)
    _up[(triton.cdiv(K, 32), N)](w, idx, x, y, K, D, w.stride(0), BK=32, BD=128)
    return y


def ffn(x, w1, w2t, b1, b2, w3, idx, act):
    """act(x w1[idx]^T + b1[idx]) [* x w3[idx]^T] @ w2t[idx] + b2, for x [N, d] (contiguous weights)."""
    x = x.contiguous()
    N, D = x.shape
    K = idx.shape[0]
    h = act(_rows_gemv(w1, idx, x) + b1[idx].float())
    if w3 is not None:
        h = h * _rows_gemv(w3, idx, x)
    out = torch.zeros(N, D, dtype=torch.float32, device=x.device)
    splits = max(1, min(triton.cdiv(K, 64), 8))
    k_per = triton.cdiv(triton.cdiv(K, 64), splits) * 64
    _down[(triton.cdiv(D, 128), N, triton.cdiv(K, k_per))](h.contiguous(), w2t, idx, out, K, D, k_per,
                                                           w2t.stride(0), BK=64, BD=128)
    return (out + b2.float()).to(x.dtype)


def reference(x, w1, w2t, b1, b2, w3, idx, act):
    """The same in torch (for the check)."""
    h = act(F.linear(x.float(), w1[idx].float(), b1[idx].float()))
    if w3 is not None:
        h = h * F.linear(x.float(), w3[idx].float())
    return (h @ w2t[idx].float() + b2.float()).to(x.dtype)
