"""Triton kernels of gated_ffn (the GPU path; tested on CPU with TRITON_INTERPRET=1).

Three matmul kernels read weights through the active-column list `idx` (the gather is fused
into the tile loads, nothing is copied), plus a per-row gather-GEMV for decode:

  gather_n_mm:  C[m, n] = sum_k A[m, k] * W[idx[n]*s_wn + k*s_wk] (+ bias[idx[n]])
                up-projection x @ w1[idx]^T, and dh = grad @ W2a^T in backward
  gather_k_mm:  C[m, e] = sum_k A[m, k] * W[idx[k]*s_wk + e*s_we] (+ bias[e])
                down-projection h @ W2a, and dx = dpre @ w1[idx] in backward
  scatter_tn:   O[idx[i]*s_oi + j*s_oj] = sum_m A[m, i] * B[m, j]
                weight gradients written straight into the active rows/columns of a zero tensor
  rowmask_gemv: decode (few rows) with per-row masks (Deja Vu / TEAL style): a program per block
                of union columns computes every row's dot with the block's w1 rows, masks per
                row, applies activation and gate, and adds h[n, k] * w2t[idx[k], :] into the
                output with atomics (split over columns). Only active rows of w1/w3/w2t are read.
Elementwise work (activation and its derivative, gate, per-row where) stays in torch.

Registration: on a GPU the launchers are `torch.library.triton_op` + `wrap_triton`, so
torch.compile sees the kernels. In the interpreter a triton_op's body runs on fake tensors
(fails opcheck and compile), so there they are plain `custom_op`s with `register_fake`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import reference as _reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------ kernels
@triton.jit
def _gather_n_mm(a_ptr, w_ptr, idx_ptr, bias_ptr, c_ptr, M, N, K,
                 s_am, s_ak, s_wn, s_wk, s_cm, s_cn,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    rows = tl.load(idx_ptr + rn, mask=n_ok, other=0)  # weight rows of these columns
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptr + rm[:, None] * s_am + (k0 + rk)[None, :] * s_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rows[None, :] * s_wn + (k0 + rk)[:, None] * s_wk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(ACC)
            w = w.to(ACC)
        acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gather_k_mm(a_ptr, w_ptr, idx_ptr, bias_ptr, c_ptr, M, E, K,
                 s_am, s_ak, s_wk, s_we, s_cm, s_ce,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                 BM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_e = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    re = pid_e * BE + tl.arange(0, BE)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    e_ok = re < E
    acc = tl.zeros((BM, BE), dtype=ACC)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        rows = tl.load(idx_ptr + k0 + rk, mask=k_ok, other=0)
        a = tl.load(a_ptr + rm[:, None] * s_am + (k0 + rk)[None, :] * s_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rows[:, None] * s_wk + re[None, :] * s_we,
                    mask=k_ok[:, None] & e_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(ACC)
            w = w.to(ACC)
        acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + re, mask=e_ok, other=0.0).to(ACC)[None, :]
    tl.store(c_ptr + rm[:, None] * s_cm + re[None, :] * s_ce, acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & e_ok[None, :])


@triton.jit
def _scatter_tn(a_ptr, b_ptr, idx_ptr, o_ptr, M, I, J,
                s_am, s_ai, s_bm, s_bj, s_oi, s_oj,
                UPCAST: tl.constexpr, ACC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BM: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    ri = pid_i * BI + tl.arange(0, BI)
    rj = pid_j * BJ + tl.arange(0, BJ)
    rm = tl.arange(0, BM)
    i_ok = ri < I
    j_ok = rj < J
    acc = tl.zeros((BI, BJ), dtype=ACC)
    for m0 in range(0, M, BM):
        m_ok = (m0 + rm) < M
        at = tl.load(a_ptr + (m0 + rm)[None, :] * s_am + ri[:, None] * s_ai,
                     mask=i_ok[:, None] & m_ok[None, :], other=0.0)
        b = tl.load(b_ptr + (m0 + rm)[:, None] * s_bm + rj[None, :] * s_bj,
                    mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        if UPCAST:
            at = at.to(ACC)
            b = b.to(ACC)
        acc += tl.dot(at, b)
    rows = tl.load(idx_ptr + ri, mask=i_ok, other=0)
    tl.store(o_ptr + rows[:, None] * s_oi + rj[None, :] * s_oj, acc.to(o_ptr.dtype.element_ty),
             mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def _act(v, ACT: tl.constexpr):
    # 0 gelu (erf), 1 gelu (tanh), 2 relu, 3 silu; v is in the accumulator type
    if ACT == 0:
        return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 1:
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u)
        return 0.5 * v * (1.0 + t)
    elif ACT == 2:
        return tl.maximum(v, 0.0)
    else:
        return v * tl.sigmoid(v)


@triton.jit
def _rowmask_gemv(x_ptr, w1_ptr, w3_ptr, w2t_ptr, b1_ptr, idx_ptr, rm_ptr, gate_ptr,
                  pre_ptr, up_ptr, out_ptr, N, D, F, K, s_gn,
                  HAS_W3: tl.constexpr, HAS_B1: tl.constexpr, HAS_RM: tl.constexpr,
                  HAS_GATE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                  BK: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    rk = pid * BK + tl.arange(0, BK)
    k_ok = rk < K
    cols = tl.load(idx_ptr + rk, mask=k_ok, other=0)
    rd = tl.arange(0, BD)
    for n in range(0, N):
        run = k_ok
        if HAS_RM:
            run = run & (tl.load(rm_ptr + n * K + rk, mask=k_ok, other=0) != 0)
        p = tl.zeros((BK,), dtype=ACC)
        u = tl.zeros((BK,), dtype=ACC)
        for d0 in range(0, D, BD):
            d_ok = (d0 + rd) < D
            xv = tl.load(x_ptr + n * D + d0 + rd, mask=d_ok, other=0.0).to(ACC)
            w = tl.load(w1_ptr + cols[:, None] * D + (d0 + rd)[None, :],
                        mask=run[:, None] & d_ok[None, :], other=0.0).to(ACC)
            p += tl.sum(w * xv[None, :], axis=1)
            if HAS_W3:
                w3 = tl.load(w3_ptr + cols[:, None] * D + (d0 + rd)[None, :],
                             mask=run[:, None] & d_ok[None, :], other=0.0).to(ACC)
                u += tl.sum(w3 * xv[None, :], axis=1)
        if HAS_B1:
            p += tl.load(b1_ptr + cols, mask=run, other=0.0).to(ACC)
        h = _act(p, ACT)
        if HAS_W3:
            h = h * u
        if HAS_GATE:
            h = h * tl.load(gate_ptr + n * s_gn + cols, mask=run, other=0.0).to(ACC)
        h = tl.where(run, h, 0.0)
        tl.store(pre_ptr + n * K + rk, tl.where(run, p, 0.0).to(pre_ptr.dtype.element_ty), mask=k_ok)
        if HAS_W3:
            tl.store(up_ptr + n * K + rk, tl.where(run, u, 0.0).to(up_ptr.dtype.element_ty), mask=k_ok)
        for d0 in range(0, D, BD):
            d_ok = (d0 + rd) < D
            w2 = tl.load(w2t_ptr + cols[:, None] * D + (d0 + rd)[None, :],
                         mask=run[:, None] & d_ok[None, :], other=0.0).to(ACC)
            contrib = tl.sum(w2 * h[:, None], axis=0)
            tl.atomic_add(out_ptr + n * D + d0 + rd, contrib, mask=d_ok)


# ------------------------------------------------------------------ launchers
def _blocks(n, lo=16, hi=64):
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _upcast(t):
    # Half types multiply in their own precision on the GPU (fp32 accumulate); the
    # interpreter has no bf16 arithmetic, so there they are upcast first.
    return INTERPRET and t.dtype in (torch.float16, torch.bfloat16)


def _acc(t):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _launch(kernel, grid, *args, **kw):
    if not INTERPRET and torch.cuda.is_available():
        kernel = torch.library.wrap_triton(kernel)
    kernel[grid](*args, **kw)


def gather_n_mm(a, w, idx, s_wn, s_wk, bias=None):
    M, K = a.shape
    N = idx.shape[0]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    BM, BN, BK = _blocks(M), _blocks(N), _blocks(K, hi=32)
    _launch(_gather_n_mm, (triton.cdiv(M, BM), triton.cdiv(N, BN)), a, w, idx,
            bias if bias is not None else a, c, M, N, K, a.stride(0), a.stride(1), s_wn, s_wk,
            c.stride(0), c.stride(1), HAS_BIAS=bias is not None, UPCAST=_upcast(a), ACC=_acc(a), BM=BM, BN=BN, BK=BK)
    return c


def gather_k_mm(a, w, idx, s_wk, s_we, E, bias=None):
    M, K = a.shape
    c = torch.empty(M, E, dtype=a.dtype, device=a.device)
    if M == 0:
        return c
    if K == 0:
        c.zero_()
        return c + bias if bias is not None else c
    BM, BE, BK = _blocks(M), _blocks(E), _blocks(K, hi=32)
    _launch(_gather_k_mm, (triton.cdiv(M, BM), triton.cdiv(E, BE)), a, w, idx,
            bias if bias is not None else a, c, M, E, K, a.stride(0), a.stride(1), s_wk, s_we,
            c.stride(0), c.stride(1), HAS_BIAS=bias is not None, UPCAST=_upcast(a), ACC=_acc(a), BM=BM, BE=BE, BK=BK)
    return c


def scatter_tn(a, b, idx, out, s_oi, s_oj):
    """out[idx[i]*s_oi + j*s_oj] = (a^T b)[i, j]; out is zero elsewhere (caller's)."""
    M, I = a.shape
    J = b.shape[1]
    if I == 0 or J == 0:
        return out
    if M == 0:
        return out
    BI, BJ, BM = _blocks(I), _blocks(J), _blocks(M, hi=32)
    _launch(_scatter_tn, (triton.cdiv(I, BI), triton.cdiv(J, BJ)), a, b, idx, out, M, I, J,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), s_oi, s_oj,
            UPCAST=_upcast(a), ACC=_acc(a), BI=BI, BJ=BJ, BM=BM)
    return out


_ACT_CODE = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


def rowmask_gemv(x, w1, w3, w2t, b1, idx, row_mask, gate, activation):
    N, D = x.shape
    K = idx.shape[0]
    pre = torch.zeros(N, K, dtype=x.dtype, device=x.device)
    up = torch.zeros(N, K, dtype=x.dtype, device=x.device) if w3 is not None else x.new_empty(0)
    out = torch.zeros(N, D, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                      device=x.device)
    if N == 0 or K == 0:
        return out.to(x.dtype), pre, up
    BK, BD = 16, _blocks(D, hi=128)
    rm = row_mask.to(torch.uint8).contiguous() if row_mask is not None else None
    _launch(_rowmask_gemv, (triton.cdiv(K, BK),), x, w1, w3 if w3 is not None else w1, w2t,
            b1 if b1 is not None else x, idx, rm if rm is not None else idx, gate if gate is not None else x,
            pre, up if w3 is not None else pre, out, N, D, w1.shape[0], K,
            gate.stride(0) if (gate is not None and gate.dim() == 2) else 0,
            HAS_W3=w3 is not None, HAS_B1=b1 is not None, HAS_RM=rm is not None,
            HAS_GATE=gate is not None, ACT=_ACT_CODE[activation], ACC=_acc(x), BK=BK, BD=BD)
    return out.to(x.dtype), pre, up


# ------------------------------------------------------------------ the op
def _act_backward(grad, pre, activation):
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, pre, 0)
    return torch.ops.aten.silu_backward(grad, pre)


def _effective_mask(N, F_, active, gate, device, include_gate=True):
    if active is None:
        m = None
    elif active.dtype == torch.bool:
        m = active
    else:
        m = torch.zeros(F_, dtype=torch.bool, device=device)
        m[active] = True
    if gate is not None and include_gate:
        m = (gate != 0) if m is None else (m & (gate != 0))
    return torch.ones(F_, dtype=torch.bool, device=device) if m is None else m


def _resolve(N, F_, active, gate, device, idx=None):
    """(idx [K], row_mask [N, K] or None, gate_a [K] / [N, K] or None) as in csrc/ffn_plan.cpp."""
    m = _effective_mask(N, F_, active, gate, device)
    row_mask = None
    if m.dim() == 2:
        if idx is None:
            idx = torch.nonzero(m.any(0)).flatten()
        rm = m[:, idx]
        if not bool(rm.all()):
            row_mask = rm
    elif idx is None:
        idx = torch.nonzero(m).flatten()
    gate_a = gate[..., idx] if gate is not None else None
    return idx, row_mask, gate_a


def _w2_strides(w2, w2_transposed):
    """(stride along the hidden dim F, stride along d) of w2 in either layout."""
    return (w2.stride(0), w2.stride(1)) if w2_transposed else (w2.stride(1), w2.stride(0))


def _check(x, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed):
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError("gated_ffn (triton): needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    N, d = x.shape
    F_ = w1.shape[0]
    exp_w2 = (F_, d) if w2_transposed else (d, F_)
    for name, t, shape in (("w1", w1, (F_, d)), ("w2", w2, exp_w2), ("w3", w3, (F_, d)),
                           ("b1", b1, (F_,)), ("b2", b2, (d,))):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"gated_ffn (triton): {name} must be {list(shape)}; got {list(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"gated_ffn (triton): {name} must match x's dtype and device")
    if active is not None and active.dtype not in (torch.bool, torch.int64):
        raise TypeError(f"gated_ffn (triton): active must be int64 indices or a bool mask; got {active.dtype}")
    if active is not None and active.dtype == torch.int64 and active.numel() > 0:
        lo, hi = int(active.min()), int(active.max())
        if lo < 0 or hi >= F_:
            raise ValueError(f"gated_ffn (triton): active indices must be in [0, F) = [0, {F_}); "
                             f"got min {lo}, max {hi}")
        if torch.unique(active).numel() != active.numel():
            raise ValueError("gated_ffn (triton): active indices must be distinct")
    if activation not in _ACT_CODE:
        raise ValueError(f"gated_ffn (triton): activation must be one of {tuple(_ACT_CODE)}; got {activation!r}")


def _forward(x, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed, dense_grad):
    _check(x, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed)
    x = x.contiguous()
    N, d = x.shape
    F_ = w1.shape[0]
    idx, row_mask, gate_a = _resolve(N, F_, active, gate, x.device)
    K = idx.shape[0]
    # The plan for backward, as the C++ op returns it (no row grouping here: row_group is -1).
    per_row = (active is not None and active.dtype == torch.bool and active.dim() == 2) or \
        (gate is not None and gate.dim() == 2)
    if per_row:
        saved_mask = row_mask if row_mask is not None else torch.ones(N, K, dtype=torch.bool, device=x.device)
        saved_group = torch.full((N,), -1, dtype=torch.int64, device=x.device)
    else:
        saved_mask = torch.empty(0, dtype=torch.bool, device=x.device)
        saved_group = torch.empty(0, dtype=torch.int64, device=x.device)
    if 0 < N <= 16 and w2_transposed and K > 0:
        out, pre, up = rowmask_gemv(x, w1, w3, w2.contiguous(), b1, idx, row_mask, gate, activation)
        if b2 is not None:
            out = out + b2
        return out, idx, pre, up, saved_mask, saved_group
    pre = gather_n_mm(x, w1, idx, w1.stride(0), w1.stride(1), bias=b1)
    up = gather_n_mm(x, w3, idx, w3.stride(0), w3.stride(1)) if w3 is not None else x.new_empty(0)
    h = _reference.activation_fn(activation)(pre)
    if w3 is not None:
        h = h * up
    if gate_a is not None:
        h = h * gate_a
    if row_mask is not None:
        h = torch.where(row_mask, h, torch.zeros((), dtype=h.dtype, device=h.device))
    s_k, s_e = _w2_strides(w2, w2_transposed)
    out = gather_k_mm(h.contiguous(), w2, idx, s_k, s_e, d, bias=b2)
    return out, idx, pre, up, saved_mask, saved_group


def _backward(grad_out, x, w1, w2, b1, w3, active, gate, idx, pre, up, row_mask, row_group, activation,
              w2_transposed, dense_grad, need):
    x = x.contiguous()
    grad_out = grad_out.contiguous()
    N, d = x.shape
    F_ = w1.shape[0]
    # The forward's plan: row_mask [N, K] for per-row masks (row_group is all -1 here), else [0].
    row_mask = row_mask if row_mask.dim() == 2 else None
    gate_a = gate[..., idx] if gate is not None else None
    need_x, need_w, need_g = need[0], need[1], need[2] and gate is not None
    zero = torch.zeros((), dtype=x.dtype, device=x.device)

    def masked(t):
        return torch.where(row_mask, t, zero) if row_mask is not None else t

    s_k, s_e = _w2_strides(w2, w2_transposed)
    dhg = gather_n_mm(grad_out, w2, idx, s_k, s_e)              # [N, K]
    act_v = _reference.activation_fn(activation)(pre)
    h = act_v * up if w3 is not None else act_v
    dgate = x.new_empty(0)
    if need_g:
        dgate = torch.zeros_like(gate)
        if dense_grad:
            hf = _reference.activation_fn(activation)(torch.nn.functional.linear(x, w1, b1))
            if w3 is not None:
                hf = hf * torch.nn.functional.linear(x, w3)
            w2n = w2.t() if w2_transposed else w2
            gp = (grad_out @ w2n) * hf
            if active is not None:
                gp = torch.where(_effective_mask(N, F_, active, None, x.device, include_gate=False), gp, zero)
            dgate = gp.sum(0) if gate.dim() == 1 else gp
        else:
            gp = masked(dhg * h)
            dgate.index_copy_(gate.dim() - 1, idx, gp.sum(0) if gate.dim() == 1 else gp)
    # Outputs that are not computed are distinct empty tensors (custom ops may not alias returns).
    dx, dw1, dw2, dw3, db1, db2 = (x.new_empty(0) for _ in range(6))
    if need_w:
        hg = h * gate_a if gate_a is not None else h
        hg = masked(hg).contiguous()
        dw2 = torch.zeros_like(w2)
        if w2_transposed:
            scatter_tn(hg, grad_out, idx, dw2, dw2.stride(0), dw2.stride(1))
        else:
            scatter_tn(hg, grad_out, idx, dw2, dw2.stride(1), dw2.stride(0))
        db2 = grad_out.sum(0)
    if need_x or need_w:
        dh = masked(dhg * gate_a if gate_a is not None else dhg)
        dact = dh
        dup = None
        if w3 is not None:
            dup = masked(dh * act_v).contiguous()
            dact = dh * up
        dpre = masked(_act_backward(dact, pre, activation)).contiguous()
        if need_x:
            dx = gather_k_mm(dpre, w1, idx, w1.stride(0), w1.stride(1), d)
            if w3 is not None:
                dx = dx + gather_k_mm(dup, w3, idx, w3.stride(0), w3.stride(1), d)
        if need_w:
            dw1 = scatter_tn(dpre, x, idx, torch.zeros_like(w1), w1.stride(0), w1.stride(1))
            if w3 is not None:
                dw3 = scatter_tn(dup, x, idx, torch.zeros_like(w3), w3.stride(0), w3.stride(1))
            if b1 is not None:
                db1 = torch.zeros_like(b1).index_copy_(0, idx, dpre.sum(0))
    return dx, dw1, dw2, dw3, db1, db2, dgate


# ------------------------------------------------------------------ registration
_FWD = "sparse_ops::gated_ffn_triton"
_BWD = "sparse_ops::gated_ffn_triton_backward"

# Same schemas as the C++ ops (csrc/ops.cpp), so the two backends are interchangeable.
_FWD_SCHEMA = ("(Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, Tensor? w3, Tensor? active, "
               "Tensor? gate, str activation, bool w2_transposed, bool dense_grad) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? w3, Tensor? active, "
               "Tensor? gate, Tensor idx, Tensor pre, Tensor up, Tensor row_mask, Tensor row_group, "
               "str activation, bool w2_transposed, "
               "bool dense_grad, bool[] need) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")

_register = torch.library.custom_op if (INTERPRET or not torch.cuda.is_available()) else torch.library.triton_op
_fwd_op = _register(_FWD, _forward, mutates_args=(), schema=_FWD_SCHEMA)
_bwd_op = _register(_BWD, _backward, mutates_args=(), schema=_BWD_SCHEMA)


@_fwd_op.register_fake
def _(x, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed, dense_grad):
    N, d = x.shape
    F_ = w1.shape[0]
    if active is None and gate is None:
        K = F_
    elif active is not None and active.dtype == torch.int64 and gate is None:
        K = active.shape[0]
    else:
        ctx = torch.library.get_ctx()
        K = ctx.new_dynamic_size(min=0, max=F_) if isinstance(F_, int) else ctx.new_dynamic_size()
    up = x.new_empty((N, K)) if w3 is not None else x.new_empty((0,))
    per_row = (active is not None and active.dtype == torch.bool and active.dim() == 2) or \
        (gate is not None and gate.dim() == 2)
    return (x.new_empty((N, d)), x.new_empty((K,), dtype=torch.int64), x.new_empty((N, K)), up,
            x.new_empty((N, K) if per_row else (0,), dtype=torch.bool),
            x.new_empty((N,) if per_row else (0,), dtype=torch.int64))


@_bwd_op.register_fake
def _(grad_out, x, w1, w2, b1, w3, active, gate, idx, pre, up, row_mask, row_group, activation, w2_transposed,
      dense_grad, need):
    e = x.new_empty((0,))
    nx, nw, ng = need
    return (torch.empty_like(x) if nx else e, torch.empty_like(w1) if nw else e,
            torch.empty_like(w2) if nw else e, torch.empty_like(w3) if (nw and w3 is not None) else e,
            torch.empty_like(b1) if (nw and b1 is not None) else e,
            x.new_empty((x.shape[1],)) if nw else e,
            torch.empty_like(gate) if (ng and gate is not None) else e)


def _setup(ctx, inputs, output):
    x, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed, dense_grad = inputs
    _, idx, pre, up, row_mask, row_group = output
    ctx.save_for_backward(x, w1, w2, b1, w3, active, gate, idx, pre, up, row_mask, row_group)
    ctx.args = (activation, w2_transposed, dense_grad)
    ctx.has = (b1 is not None, b2 is not None, w3 is not None, gate is not None)


def _autograd(ctx, grad_out, _gi, _gp, _gu, _grm, _grg):
    x, w1, w2, b1, w3, active, gate, idx, pre, up, row_mask, row_group = ctx.saved_tensors
    nig = ctx.needs_input_grad
    need = [bool(nig[0]), any(bool(nig[i]) for i in (1, 2, 3, 4, 5)), bool(nig[7])]
    dx, dw1, dw2, dw3, db1, db2, dgate = _bwd_op(grad_out, x, w1, w2, b1, w3, active, gate, idx, pre, up,
                                                 row_mask, row_group, *ctx.args, need)
    has_b1, has_b2, has_w3, has_gate = ctx.has
    return (dx if nig[0] else None, dw1 if nig[1] else None, dw2 if nig[2] else None,
            db1 if (nig[3] and has_b1) else None, db2 if (nig[4] and has_b2) else None,
            dw3 if (nig[5] and has_w3) else None, None, dgate if (nig[7] and has_gate) else None,
            None, None, None)


_fwd_op.register_autograd(_autograd, setup_context=_setup)


def gated_ffn(x2, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed, dense_grad):
    """Entry point used by sparse_ops.gated_ffn(..., backend='triton'); x2 is [N, d]."""
    return _fwd_op(x2, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed, dense_grad)[0]
