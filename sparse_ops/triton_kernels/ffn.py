"""Triton kernels of gated_ffn (the GPU path; tested on CPU with TRITON_INTERPRET=1).

Two matmul kernels read weights through the active-column list `idx` (the gather is fused
into the tile loads, nothing is copied), plus a per-row gather-GEMV for decode:

  _gather_mm:   one kernel, two launchers (which weight axis goes through idx):
    gather_n_mm:  C[m, n] = sum_k A[m, k] * W[idx[n]*s_wn + k*s_wk] (+ bias[idx[n]])
                  up-projection x @ w1[idx]^T, and dh = grad @ W2a^T in backward
    gather_k_mm:  C[m, e] = sum_k A[m, k] * W[idx[k]*s_wk + e*s_we] (+ bias[e])
                  down-projection h @ W2a, and dx = dpre @ w1[idx] in backward
  scatter_tn:   O[idx[i]*s_oi + j*s_oj] = sum_m A[m, i] * B[m, j]
                weight gradients written straight into the active rows/columns of a zero tensor
  _decode_up, _decode_down: decode (N <= 16 rows, per-row masks included; Deja Vu / TEAL style):
                split-K sparse GEMVs over 2-D grids of (column tile x d split) and (d tile x
                column split) that read each active weight row once for all rows of the batch,
                with 16-byte loads along whole rows and relaxed fp32 atomics (decode_gemv).
Elementwise work (activation and its derivative, gate, per-row where) stays in torch.

`forward` and `backward` are plain launchers taking the schema arguments of
`sparse_ops::gated_ffn` / `gated_ffn_backward` (csrc/ops.cpp); sparse_ops/ops/registry.py
registers them as that op's Triton twin, with its fake kernel and autograd formula.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import activations as _acts, reference as _ref
from ._common import acc as _acc, blocks as _blocks, launch as _launch, precision as _precision, require_device, \
    upcast as _upcast


# ------------------------------------------------------------------ kernels
@triton.jit
def _gather_mm(a_ptr, w_ptr, idx_ptr, bias_ptr, c_ptr, M, N, K,
               s_am, s_ak, s_wn, s_wk, s_cm, s_cn,
               GATHER_N: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
               PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # C[m, n] = sum_k A[m, k] * W[wn(n) * s_wn + wk(k) * s_wk] (+ bias[wn(n)]), where the weight
    # index of one axis goes through idx: wn = idx[n] (GATHER_N) or wk = idx[k] (else).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # rm * s_am may pass 2^31
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    if GATHER_N:
        wn = tl.load(idx_ptr + rn, mask=n_ok, other=0)  # int64 weight rows of these columns
    else:
        wn = rn.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        if GATHER_N:
            wk = (k0 + rk).to(tl.int64)
        else:
            wk = tl.load(idx_ptr + k0 + rk, mask=k_ok, other=0)
        a = tl.load(a_ptr + rm[:, None] * s_am + (k0 + rk)[None, :] * s_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + wn[None, :] * s_wn + wk[:, None] * s_wk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(ACC)
            w = w.to(ACC)
        acc += tl.dot(a, w, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + wn, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _scatter_tn(a_ptr, b_ptr, idx_ptr, o_ptr, M, I, J,
                s_am, s_ai, s_bm, s_bj, s_oi, s_oj,
                UPCAST: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BM: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    ri = pid_i * BI + tl.arange(0, BI)
    rj = pid_j * BJ + tl.arange(0, BJ)
    rm = tl.arange(0, BM).to(tl.int64)  # (m0 + rm) * s_am may pass 2^31
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
        acc += tl.dot(at, b, input_precision=PREC)
    rows = tl.load(idx_ptr + ri, mask=i_ok, other=0)
    tl.store(o_ptr + rows[:, None] * s_oi + rj[None, :] * s_oj, acc.to(o_ptr.dtype.element_ty),
             mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def _act(v, ACT: tl.constexpr):
    # 0 gelu (erf), 1 gelu (tanh), 2 relu, 3 silu, 4 identity; v is in the accumulator type
    if ACT == 0:
        return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 1:
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u)
        return 0.5 * v * (1.0 + t)
    elif ACT == 2:
        return tl.maximum(v, 0.0)
    elif ACT == 3:
        return v * tl.sigmoid(v)
    else:
        return v


@triton.jit
def _decode_up(x_ptr, w1_ptr, w3_ptr, idx_ptr, pacc_ptr, uacc_ptr, N, D, K, d_per,
               s_xn, s_w1n, s_w1d, s_w3n, s_w3d,
               HAS_W3: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    # Program (k tile, d split): pacc[n, k] += sum over its d_per inputs of x[n, d] * w1[idx[k], d]
    # for every row n at once (N <= BN), so each weight tile is read once per call. Weight tiles
    # are [BK, BD] slices of whole rows w1[idx[k], :], contiguous along d (16-byte loads).
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    rk = pid_k * BK + tl.arange(0, BK)
    k_ok = rk < K
    cols = tl.load(idx_ptr + rk, mask=k_ok, other=0)  # int64: every weight offset is 64-bit
    rn = tl.arange(0, BN)
    n_ok = rn < N
    rd = tl.arange(0, BD).to(tl.int64)
    p = tl.zeros((BN, BK), dtype=ACC)
    u = tl.zeros((BN, BK), dtype=ACC)
    d_lo = pid_d * d_per
    for d0 in range(d_lo, tl.minimum(d_lo + d_per, D), BD):
        d_ok = (d0 + rd) < D
        xt = tl.load(x_ptr + rn[:, None] * s_xn + (d0 + rd)[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w1_ptr + cols[:, None] * s_w1n + (d0 + rd)[None, :] * s_w1d,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(ACC)
            w = w.to(ACC)
        p += tl.dot(xt, tl.trans(w), out_dtype=ACC, input_precision=PREC)
        if HAS_W3:
            w3 = tl.load(w3_ptr + cols[:, None] * s_w3n + (d0 + rd)[None, :] * s_w3d,
                         mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                w3 = w3.to(ACC)
            u += tl.dot(xt, tl.trans(w3), out_dtype=ACC, input_precision=PREC)
    ok = n_ok[:, None] & k_ok[None, :]
    off = rn[:, None] * K + rk[None, :]
    tl.atomic_add(pacc_ptr + off, p, mask=ok, sem="relaxed")
    if HAS_W3:
        tl.atomic_add(uacc_ptr + off, u, mask=ok, sem="relaxed")


@triton.jit
def _decode_down(pacc_ptr, uacc_ptr, b1_ptr, idx_ptr, rm_ptr, gate_ptr, w2_ptr, pre_ptr, up_ptr, out_ptr,
                 N, D, K, k_per, s_b1, s_gn, s_gf, s_w2n, s_w2d,
                 HAS_W3: tl.constexpr, HAS_B1: tl.constexpr, HAS_RM: tl.constexpr, HAS_GATE: tl.constexpr,
                 ACT: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    # Program (d tile, k split): h = act(pre) [* up] * gate, zero where a row's mask is off, for
    # its k_per active columns, then out[n, d] += sum_k h[n, k] * w2[idx[k], d] for every row,
    # one atomic per output element per program. The d == 0 programs store pre and up.
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = tl.arange(0, BN)
    n_ok = rn < N
    rd = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    d_ok = rd < D
    o = tl.zeros((BN, BD), dtype=ACC)
    k_lo = pid_k * k_per
    for k0 in range(k_lo, tl.minimum(k_lo + k_per, K), BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        cols = tl.load(idx_ptr + rk, mask=k_ok, other=0)
        ok = n_ok[:, None] & k_ok[None, :]
        run = ok
        if HAS_RM:
            run = run & (tl.load(rm_ptr + rn[:, None] * K + rk[None, :], mask=ok, other=0) != 0)
        off = rn[:, None] * K + rk[None, :]
        p = tl.load(pacc_ptr + off, mask=ok, other=0.0)
        if HAS_B1:
            p += tl.load(b1_ptr + cols * s_b1, mask=k_ok, other=0.0).to(ACC)[None, :]
        h = _act(p, ACT)
        if HAS_W3:
            u = tl.load(uacc_ptr + off, mask=ok, other=0.0)
            h = h * u
        if HAS_GATE:
            h = h * tl.load(gate_ptr + rn[:, None] * s_gn + cols[None, :] * s_gf, mask=ok, other=0.0).to(ACC)
        h = tl.where(run, h, 0.0)
        if pid_d == 0:
            tl.store(pre_ptr + off, tl.where(run, p, 0.0).to(pre_ptr.dtype.element_ty), mask=ok)
            if HAS_W3:
                tl.store(up_ptr + off, tl.where(run, u, 0.0).to(up_ptr.dtype.element_ty), mask=ok)
        w2 = tl.load(w2_ptr + cols[:, None] * s_w2n + rd[None, :] * s_w2d, mask=k_ok[:, None] & d_ok[None, :],
                     other=0.0)
        if UPCAST:
            w2 = w2.to(ACC)
        o += tl.dot(h.to(w2.dtype), w2, out_dtype=ACC, input_precision=PREC)
    tl.atomic_add(out_ptr + rn[:, None] * D + rd[None, :], o, mask=n_ok[:, None] & d_ok[None, :], sem="relaxed")


# ------------------------------------------------------------------ launchers
def gather_n_mm(a, w, idx, s_wn, s_wk, bias=None):
    M, K = a.shape
    N = idx.shape[0]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    BM, BN, BK = _blocks(M), _blocks(N), _blocks(K, hi=32)
    _launch(_gather_mm, (triton.cdiv(M, BM), triton.cdiv(N, BN)), a, w, idx,
            bias if bias is not None else a, c, M, N, K, a.stride(0), a.stride(1), s_wn, s_wk,
            c.stride(0), c.stride(1), GATHER_N=True, HAS_BIAS=bias is not None, UPCAST=_upcast(a), ACC=_acc(a), PREC=_precision(a), BM=BM, BN=BN, BK=BK)
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
    _launch(_gather_mm, (triton.cdiv(M, BM), triton.cdiv(E, BE)), a, w, idx,
            bias if bias is not None else a, c, M, E, K, a.stride(0), a.stride(1), s_we, s_wk,
            c.stride(0), c.stride(1), GATHER_N=False, HAS_BIAS=bias is not None, UPCAST=_upcast(a), ACC=_acc(a),
            PREC=_precision(a), BM=BM, BN=BE, BK=BK)
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
            UPCAST=_upcast(a), ACC=_acc(a), PREC=_precision(a), BI=BI, BJ=BJ, BM=BM)
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(tiles, other_tiles, device):
    """How many ways to split the reduction of a decode kernel so that the grid has about four
    programs per SM (the interpreter: no split beyond what the shape gives)."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1
    return max(1, min(tiles, triton.cdiv(4 * sms, max(other_tiles, 1))))


def decode_gemv(x, w1, w3, w2, b1, idx, row_mask, gate, activation, s_w2n, s_w2d):
    """Decode (N <= 16 rows): (out, pre, up) of the active columns idx, per-row masks included.

    Two kernels, each reading its weights once for all N rows: _decode_up (grid: column tiles x
    d splits; split-K partial sums of x w1^T and x w3^T added with relaxed fp32 atomics) and
    _decode_down (grid: d tiles x column splits; activation, gate and row mask, then h @ w2 with
    one atomic per output element per program). w2 is read through its strides along F (s_w2n)
    and d (s_w2d): rows of w2^T are contiguous when w2_transposed=True; the [d, F] layout gathers
    2-byte elements along F (correct, not bandwidth-efficient).

    Bytes in flight (H200: 4.8 TB/s x ~0.7 us DRAM latency ~ 3.4 MB needed chip-wide): a bf16
    weight tile is BK x BD = 32 x 128 x 2 B = 8 KB per load (16 KB with w3), each program keeps
    num_stages (2-3) such loads in flight in its loop, and the split factors give ~4 programs per
    SM: ~4 x 2 x 8-16 KB = 64-128 KB per SM, 8-17 MB over 132 SMs, so the loads, not the latency,
    bound the call. The CUDA decode kernel (csrc/cuda/ffn_kernels.cu: one warp per column,
    scalar 2-byte loads, one request in flight per warp) holds ~64 B per warp, ~0.5 MB chip-wide.
    Not yet measured on a GPU (none was available where this was written).
    """
    N, D = x.shape
    K = idx.shape[0]
    acc_t = _ref.acc_dtype(x.dtype)
    # pre and up: every entry is stored by _decode_down's d == 0 programs (zeros where a row's mask is off).
    pre = torch.empty(N, K, dtype=x.dtype, device=x.device)
    up = torch.empty(N, K, dtype=x.dtype, device=x.device) if w3 is not None else x.new_empty(0)
    out = torch.zeros(N, D, dtype=acc_t, device=x.device)
    if N == 0 or K == 0:
        return out.to(x.dtype), pre, up
    BN, BK, BD = 16, 32, _blocks(D, lo=16, hi=128)
    pacc = torch.zeros(N, K, dtype=acc_t, device=x.device)
    uacc = torch.zeros(N, K, dtype=acc_t, device=x.device) if w3 is not None else pacc
    w3s = w3 if w3 is not None else w1
    k_tiles, d_tiles = triton.cdiv(K, BK), triton.cdiv(D, BD)
    d_split = _splits(d_tiles, k_tiles, x.device)
    d_per = triton.cdiv(d_tiles, d_split) * BD
    common = dict(UPCAST=_upcast(x), ACC=_acc(x), PREC=_precision(x), BN=BN, BK=BK, BD=BD)
    _launch(_decode_up, (k_tiles, triton.cdiv(D, d_per)), x, w1, w3s, idx, pacc, uacc, N, D, K, d_per,
            x.stride(0), w1.stride(0), w1.stride(1), w3s.stride(0), w3s.stride(1), HAS_W3=w3 is not None, **common)
    k_split = _splits(k_tiles, d_tiles, x.device)
    k_per = triton.cdiv(k_tiles, k_split) * BK
    rm = row_mask.to(torch.uint8).contiguous() if row_mask is not None else None
    _launch(_decode_down, (d_tiles, triton.cdiv(K, k_per)), pacc, uacc, b1 if b1 is not None else x, idx,
            rm if rm is not None else idx, gate if gate is not None else x, w2, pre,
            up if w3 is not None else pre, out, N, D, K, k_per,
            b1.stride(0) if b1 is not None else 0,
            gate.stride(0) if (gate is not None and gate.dim() == 2) else 0,
            gate.stride(-1) if gate is not None else 0, s_w2n, s_w2d,
            HAS_W3=w3 is not None, HAS_B1=b1 is not None, HAS_RM=rm is not None, HAS_GATE=gate is not None,
            ACT=_acts.CODE[activation], **common)
    return out.to(x.dtype), pre, up


# ------------------------------------------------------------------ the op
def _run_mask(F_, active, gate, device):
    """bool [F] / [N, F]: the columns that run (the active mask, and a non-zero gate)."""
    m = _ref.ffn_mask(active, F_, device)
    return m & (gate != 0) if gate is not None else m


def _resolve(N, F_, active, gate, device):
    """(idx [K], row_mask [N, K] or None, gate_a [K] / [N, K] or None) as in csrc.

    int64 indices without a gate: idx is the sorted indices (no host synchronisation). A bool
    mask or a gate: one synchronisation, for the count of columns that run (nonzero)."""
    if active is not None and active.dtype == torch.int64 and gate is None:
        return torch.sort(active).values, None, None
    m = _run_mask(F_, active, gate, device)
    row_mask = None
    if m.dim() == 2:
        idx = torch.nonzero(m.any(0)).flatten()
        rm = m[:, idx]
        if not bool(rm.all()):
            row_mask = rm
    else:
        idx = torch.nonzero(m).flatten()
    gate_a = gate[..., idx] if gate is not None else None
    return idx, row_mask, gate_a


def _zeros(t):
    """Zeros shaped like t, contiguous whatever t's strides (the op's fake promises contiguous gradients)."""
    return torch.zeros(t.shape, dtype=t.dtype, device=t.device)


def _w2_strides(w2, w2_transposed):
    """(stride along the hidden dim F, stride along d) of w2 in either layout."""
    return (w2.stride(0), w2.stride(1)) if w2_transposed else (w2.stride(1), w2.stride(0))


def _check(x, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed):
    require_device(x, "gated_ffn")
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
    _ref.check_ffn_indices(active, F_, "gated_ffn (triton)")
    _acts.check(activation, "gated_ffn (triton)")


def forward(x, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed, dense_grad, save=True):
    """sparse_ops::gated_ffn on the Triton kernels: (out, idx, pre, up, row_mask, row_group); pre and
    up empty without save."""
    out, idx, pre, up, saved_mask, saved_group = _forward(x, w1, w2, b1, b2, w3, active, gate, activation,
                                                          w2_transposed)
    if not save:
        pre, up = x.new_empty(0), x.new_empty(0)  # two tensors: outputs must not alias
    return out, idx, pre, up, saved_mask, saved_group


def _forward(x, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed):
    _check(x, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed)
    x = x.contiguous()
    N, d = x.shape
    F_ = w1.shape[0]
    idx, row_mask, gate_a = _resolve(N, F_, active, gate, x.device)
    K = idx.shape[0]
    # The plan for backward, as the C++ op returns it (no row grouping here: row_group is -1).
    if _ref.ffn_per_row(active, gate):
        saved_mask = row_mask if row_mask is not None else torch.ones(N, K, dtype=torch.bool, device=x.device)
        saved_group = torch.full((N,), -1, dtype=torch.int64, device=x.device)
    else:
        saved_mask = torch.empty(0, dtype=torch.bool, device=x.device)
        saved_group = torch.empty(0, dtype=torch.int64, device=x.device)
    if 0 < N <= _ref.FFN_DECODE_MAX_ROWS and K > 0:
        out, pre, up = decode_gemv(x, w1, w3, w2, b1, idx, row_mask, gate, activation,
                                   *_w2_strides(w2, w2_transposed))
        if b2 is not None:
            out = out + b2
        return out, idx, pre, up, saved_mask, saved_group
    pre = gather_n_mm(x, w1, idx, w1.stride(0), w1.stride(1), bias=b1)
    up = gather_n_mm(x, w3, idx, w3.stride(0), w3.stride(1)) if w3 is not None else x.new_empty(0)
    h = _acts.forward(activation)(pre)
    if w3 is not None:
        h = h * up
    if gate_a is not None:
        h = h * gate_a
    if row_mask is not None:
        h = torch.where(row_mask, h, torch.zeros((), dtype=h.dtype, device=h.device))
    s_k, s_e = _w2_strides(w2, w2_transposed)
    out = gather_k_mm(h.contiguous(), w2, idx, s_k, s_e, d, bias=b2)
    return out, idx, pre, up, saved_mask, saved_group


def backward(grad_out, x, w1, w2, b1, w3, active, gate, idx, pre, up, row_mask, row_group, activation,
             w2_transposed, dense_grad, need):
    """sparse_ops::gated_ffn_backward on the Triton kernels."""
    _check(x, w1, w2, b1, None, w3, active, gate, activation, w2_transposed)
    N, d = x.shape
    F_ = w1.shape[0]
    op = "gated_ffn_backward (triton)"
    _ref.check_shape(grad_out, (N, d), f"{op}: grad_out", x.dtype)
    # idx addresses weight rows and the gradients written: it must be the forward's.
    _ref.check_sorted_subset(idx, _run_mask(F_, active, gate, x.device).reshape(-1, F_).any(0),
                             f"{op}: idx must be the sorted columns that run for these active and gate "
                             "(as gated_ffn returned it)")
    K = idx.shape[0]
    _ref.check_shape(pre, (N, K), f"{op}: pre", x.dtype)
    if w3 is not None:
        _ref.check_shape(up, (N, K), f"{op}: up", x.dtype)
    _ref.check_shape(row_mask, (N, K) if _ref.ffn_per_row(active, gate) else (0,), f"{op}: row_mask", torch.bool)
    x = x.contiguous()
    grad_out = grad_out.contiguous()
    # The forward's plan: row_mask [N, K] for per-row masks (row_group is all -1 here), else [0].
    row_mask = row_mask if row_mask.dim() == 2 else None
    gate_a = gate[..., idx] if gate is not None else None
    need_x, need_w, need_g = need[0], need[1], need[2] and gate is not None
    zero = torch.zeros((), dtype=x.dtype, device=x.device)

    def masked(t):
        return torch.where(row_mask, t, zero) if row_mask is not None else t

    s_k, s_e = _w2_strides(w2, w2_transposed)
    dhg = gather_n_mm(grad_out, w2, idx, s_k, s_e)              # [N, K]
    act_v = _acts.forward(activation)(pre)
    h = act_v * up if w3 is not None else act_v
    dgate = x.new_empty(0)
    if need_g:
        dgate = _zeros(gate)
        if dense_grad:
            hf = _acts.forward(activation)(torch.nn.functional.linear(x, w1, b1))
            if w3 is not None:
                hf = hf * torch.nn.functional.linear(x, w3)
            w2n = w2.t() if w2_transposed else w2
            gp = (grad_out @ w2n) * hf
            if active is not None:
                gp = torch.where(_ref.ffn_mask(active, F_, x.device), gp, zero)
            dgate = gp.sum(0) if gate.dim() == 1 else gp
        else:
            gp = masked(dhg * h)
            dgate.index_copy_(gate.dim() - 1, idx, gp.sum(0) if gate.dim() == 1 else gp)
    # Outputs that are not computed are distinct empty tensors (custom ops may not alias returns).
    dx, dw1, dw2, dw3, db1, db2 = (x.new_empty(0) for _ in range(6))
    if need_w:
        hg = h * gate_a if gate_a is not None else h
        hg = masked(hg).contiguous()
        dw2 = _zeros(w2)
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
        dpre = masked(_acts.backward(dact, pre, activation)).contiguous()
        if need_x:
            dx = gather_k_mm(dpre, w1, idx, w1.stride(0), w1.stride(1), d)
            if w3 is not None:
                dx = dx + gather_k_mm(dup, w3, idx, w3.stride(0), w3.stride(1), d)
        if need_w:
            dw1 = _zeros(w1)
            scatter_tn(dpre, x, idx, dw1, dw1.stride(0), dw1.stride(1))
            if w3 is not None:
                dw3 = _zeros(w3)
                scatter_tn(dup, x, idx, dw3, dw3.stride(0), dw3.stride(1))
            if b1 is not None:
                db1 = _zeros(b1).index_copy_(0, idx, dpre.sum(0))
    return dx, dw1, dw2, dw3, db1, db2, dgate
