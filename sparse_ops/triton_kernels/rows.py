"""Triton kernels of the row ops behind skip_layer (GPU path; CPU under TRITON_INTERPRET=1).

gather:   out[k] = x[idx[k]] (zeros for idx -1)                  grid (K, row blocks)
scatter:  y = x; y[idx[k]] = src[k] or x + gate[k] (src[k] - x)   grid (K, row blocks), y pre-copied
backward: dx rows (1 - gate) * grad, dsrc = gate * grad[idx], dgate[k] = sum (src - x) * grad
          one program per kept row, looping over the row in blocks (dgate needs the whole row)
`gather`, `scatter` and `scatter_backward` are plain launchers taking the schema arguments of
`sparse_ops::gather_rows` / `scatter_rows` / `scatter_rows_backward` (csrc/ops.cpp);
sparse_ops/ops/registry.py registers them as those ops' Triton twins.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import reference as _ref
from ._common import acc as _acc, launch as _launch, require_device

_BLOCK = 1024


@triton.jit
def _gather(x_ptr, idx_ptr, out_ptr, R, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)  # k * R and i * R may pass 2^31 elements
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    i = tl.load(idx_ptr + k)
    # padding rows (-1) store zeros; the row pointer is clamped to row 0 so no address is ever
    # formed outside x, and the row-valid test is broadcast over the block
    ok = (offs < R) & ((offs * 0 + i) >= 0)
    v = tl.load(x_ptr + tl.maximum(i, 0) * R + offs, mask=ok, other=0.0)
    tl.store(out_ptr + k * R + offs, v, mask=offs < R)


@triton.jit
def _scatter(x_ptr, src_ptr, gate_ptr, idx_ptr, y_ptr, R, HAS_GATE: tl.constexpr, ACC: tl.constexpr,
             BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)  # k * R and i * R may pass 2^31 elements
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    i = tl.load(idx_ptr + k)
    ok = (offs < R) & ((offs * 0 + i) >= 0)
    row = tl.maximum(i, 0) * R
    s = tl.load(src_ptr + k * R + offs, mask=ok, other=0.0)
    if HAS_GATE:
        g = tl.load(gate_ptr + k).to(ACC)
        xv = tl.load(x_ptr + row + offs, mask=ok, other=0.0).to(ACC)
        s = (xv + g * (s.to(ACC) - xv)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row + offs, s, mask=ok)


@triton.jit
def _scatter_bwd(grad_ptr, x_ptr, src_ptr, gate_ptr, idx_ptr, dx_ptr, dsrc_ptr, dgate_ptr, R,
                 HAS_GATE: tl.constexpr, NEED_X: tl.constexpr, NEED_SRC: tl.constexpr,
                 NEED_GATE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    i = tl.load(idx_ptr + k)
    row = tl.maximum(i, 0) * R
    g = tl.full((), 1.0, ACC)
    if HAS_GATE:
        g = tl.load(gate_ptr + k).to(ACC)
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for r0 in range(0, R, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        ok = (offs < R) & ((offs * 0 + i) >= 0)
        gr = tl.load(grad_ptr + row + offs, mask=ok, other=0.0).to(ACC)
        if NEED_X:
            tl.store(dx_ptr + row + offs, (gr * (1.0 - g)).to(dx_ptr.dtype.element_ty), mask=ok)
        if NEED_SRC:
            tl.store(dsrc_ptr + k * R + offs, (gr * g).to(dsrc_ptr.dtype.element_ty), mask=offs < R)
        if NEED_GATE:
            s = tl.load(src_ptr + k * R + offs, mask=ok, other=0.0).to(ACC)
            xv = tl.load(x_ptr + row + offs, mask=ok, other=0.0).to(ACC)
            acc += (s - xv) * gr
    if NEED_GATE:
        tl.store(dgate_ptr + k, tl.sum(acc, axis=0).to(dgate_ptr.dtype.element_ty))


def _row(x):
    return math.prod(x.shape[1:])


def _check(x, idx, src=None, gate=None):
    require_device(x, "gather_rows/scatter_rows")
    if idx.dtype != torch.int64 or idx.dim() != 1:
        raise ValueError(f"scatter_rows (triton): idx must be int64 [K]; got {idx.dtype} {list(idx.shape)}")
    _ref.check_row_indices(idx, x.shape[0], "gather_rows/scatter_rows (triton)")
    if src is not None and (src.shape[0] != idx.shape[0] or src.shape[1:] != x.shape[1:]):
        raise ValueError(f"scatter_rows (triton): src must be [K, ...] = [{idx.shape[0]}, ...row of x]; "
                         f"got {list(src.shape)}")
    if gate is not None and tuple(gate.shape) != (idx.shape[0],):
        raise ValueError(f"scatter_rows (triton): gate must be [K] = [{idx.shape[0]}]; got {list(gate.shape)}")


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sparse_ops::gather_rows on the Triton kernel."""
    _check(x, idx)
    x = x.contiguous()
    K, R = idx.shape[0], _row(x)
    out = x.new_empty((K, *x.shape[1:]))
    if K and R:
        _launch(_gather, (K, triton.cdiv(R, _BLOCK)), x, idx, out, R, BLOCK=_BLOCK)
    return out


def scatter(x, idx, src, gate):
    """sparse_ops::scatter_rows on the Triton kernel."""
    _check(x, idx, src, gate)
    x, src = x.contiguous(), src.contiguous()
    y = x.clone()
    K, R = idx.shape[0], _row(x)
    if K and R:
        _launch(_scatter, (K, triton.cdiv(R, _BLOCK)), x, src, gate if gate is not None else x, idx, y, R,
                HAS_GATE=gate is not None, ACC=_acc(x), BLOCK=_BLOCK)
    return y


def scatter_backward(grad, x, idx, src, gate, need):
    """sparse_ops::scatter_rows_backward on the Triton kernel."""
    _check(x, idx, src, gate)
    _ref.check_shape(grad, x.shape, "scatter_rows_backward (triton): grad", x.dtype)
    grad, x, src = grad.contiguous(), x.contiguous(), src.contiguous()
    K, R = idx.shape[0], _row(x)
    need_g = need[2] and gate is not None
    dx = grad.clone() if need[0] else x.new_empty(0)
    dsrc = torch.zeros_like(src) if need[1] else x.new_empty(0)
    dgate = torch.zeros_like(gate) if need_g else x.new_empty(0)
    if K and R:
        _launch(_scatter_bwd, (K,), grad, x, src, gate if gate is not None else x, idx, dx, dsrc, dgate, R,
                HAS_GATE=gate is not None, NEED_X=bool(need[0]), NEED_SRC=bool(need[1]), NEED_GATE=need_g,
                ACC=_acc(x), BLOCK=_BLOCK)
    return dx, dsrc, dgate
