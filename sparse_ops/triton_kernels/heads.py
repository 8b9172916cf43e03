"""Triton kernels of masked_head_attention (GPU path; CPU tensors under TRITON_INTERPRET=1).

Flash-attention style, over a compacted list of running (b, h) pairs only: `pairs` holds the
flat ids b * H + h of the pairs whose head_mask is True / non-zero (torch.nonzero, once per
call), and every grid has one axis of length len(pairs), so work is proportional to the
pairs that run; the others are never read and their outputs / gradients stay exact zeros.

  _fwd:      grid (query blocks, P). Online softmax over key blocks; writes out (scaled by the
             gate), the un-gated output of gated pairs (out_c [P, Tq, D], saved for backward),
             and lse [P, Tq] (natural log-sum-exp of the scaled, masked scores).
  _bwd_pre:  grid (query blocks, P). rs[p, m] = sum_d grad_out * o_unmasked; delta = gate * rs
             is the softmax-backward row term, and the gate gradient of pair p is sum_m rs.
  _bwd_dkdv: grid (key blocks, P). dv = P^T dO', dk = scale * dS^T Q with dO' = gate * grad_out.
  _bwd_dq:   grid (query blocks, P). dq = scale * dS K.
q, k, v, grad_out and the outputs are addressed through their strides (any layout).

Masking: attn_mask (bool: True = attend, or additive float) is expanded to [B, H, Tq, Tk] as
a view (zero strides where it broadcasts) and read per block; is_causal is top-left aligned
(key n visible to query m iff n <= m), applied together with attn_mask. A query row with no
visible key gives output 0 and zero gradients, as the C++ op (ATen CPU flash attention) does:
its lse is stored as +inf so every probability in backward is exp(-inf) = 0.

Precision: fp16/bf16 multiply in their own type on the GPU and accumulate in fp32 (in the
interpreter they are upcast to fp32 first: bf16 tl.dot there returns garbage); fp32 uses
input_precision="ieee" (no TF32), fp64 runs in fp64 throughout (tl.dot accepts fp64).
Head dims are padded to a power of two >= 16 and masked.

`forward` and `backward` are plain launchers taking the schema arguments of
`sparse_ops::masked_head_attention` / `masked_head_attention_backward` (csrc/ops.cpp);
sparse_ops/ops/registry.py registers them as that op's Triton twin, with its fake kernel and
autograd formula.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference as _ref
from ._common import acc as _acc, launch as _launch, precision as _precision, require_device, upcast as _upcast

_NEG_INF = float("-inf")


# ------------------------------------------------------------------ kernels
@triton.jit
def _scores(q, k_ptr, k_base, s_kt, s_kd, am_ptr, am_base, s_amm, s_amn, rm, n0, Tq, Tk, D, scale,
            HAS_AM: tl.constexpr, AM_BOOL: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
            ACC: tl.constexpr, PREC: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Scaled, masked scores [BM, BN] of the query block q against keys n0 .. n0 + BN."""
    rn = (n0 + tl.arange(0, BN)).to(tl.int64)
    rd = tl.arange(0, BD)
    n_ok = rn < Tk
    kt = tl.load(k_ptr + k_base + rn[None, :] * s_kt + rd[:, None] * s_kd,
                 mask=(rd[:, None] < D) & n_ok[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(ACC)
    s = tl.dot(q, kt, out_dtype=ACC, input_precision=PREC) * scale
    return _mask_scores(s, rm, rn, Tq, Tk, am_ptr, am_base, s_amm, s_amn, HAS_AM, AM_BOOL, CAUSAL, ACC)


@triton.jit
def _mask_scores(s, rm, rn, Tq, Tk, am_ptr, am_base, s_amm, s_amn,
                 HAS_AM: tl.constexpr, AM_BOOL: tl.constexpr, CAUSAL: tl.constexpr, ACC: tl.constexpr):
    """Scores s [BM, BN] of queries rm against keys rn with the tails, the causal mask and
    attn_mask applied: -inf where a key is not visible (a float attn_mask is added)."""
    ok = (rm[:, None] < Tq) & (rn[None, :] < Tk)
    if CAUSAL:
        ok = ok & (rn[None, :] <= rm[:, None])
    if HAS_AM:
        a = tl.load(am_ptr + am_base + rm[:, None] * s_amm + rn[None, :] * s_amn, mask=ok, other=0)
        if AM_BOOL:
            ok = ok & (a != 0)
        else:
            s = s + a.to(ACC)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _key_end(Tk, pid_m, BM: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key a query block can see: Tk, or the block's end when causal."""
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BM)
    return hi


@triton.jit
def _pair(pairs_ptr, H):
    """(p, b, h) of this program's running pair. Pairs are on grid axis 0: axis 1 allows only
    65535 programs. p is int64, so offsets like p * Tq * D are 64-bit."""
    p = tl.program_id(0).to(tl.int64)
    pair = tl.load(pairs_ptr + p)
    return p, pair // H, pair % H


@triton.jit
def _fwd(q_ptr, k_ptr, v_ptr, am_ptr, pairs_ptr, gate_ptr, out_ptr, outc_ptr, lse_ptr,
         H, Tq, Tk, D, scale,
         s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
         s_amb, s_amh, s_amm, s_amn, s_ob, s_oh, s_ot, s_od,
         HAS_AM: tl.constexpr, AM_BOOL: tl.constexpr, CAUSAL: tl.constexpr, GATED: tl.constexpr,
         STORE_OUT: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    p, b, h = _pair(pairs_ptr, H)
    pid_m = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rd = tl.arange(0, BD)
    m_ok = rm < Tq
    d_ok = rd < D
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rm[:, None] * s_qt + rd[None, :] * s_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(ACC)
    m_i = tl.full((BM,), float("-inf"), ACC)
    l_i = tl.zeros((BM,), ACC)
    acc = tl.zeros((BM, BD), ACC)
    hi = _key_end(Tk, pid_m, BM, CAUSAL)
    for n0 in range(0, hi, BN):
        s = _scores(q, k_ptr, b * s_kb + h * s_kh, s_kt, s_kd, am_ptr, b * s_amb + h * s_amh, s_amm, s_amn,
                    rm, n0, Tq, Tk, D, scale, HAS_AM, AM_BOOL, CAUSAL, UPCAST, ACC, PREC, BN, BD)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # rows with no visible key so far keep m = -inf; subtract 0 there so no inf - inf appears
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        pr = tl.exp(s - m_sub[:, None])
        alpha = tl.exp(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        rn = (n0 + tl.arange(0, BN)).to(tl.int64)
        vv = tl.load(v_ptr + b * s_vb + h * s_vh + rn[:, None] * s_vt + rd[None, :] * s_vd,
                     mask=(rn[:, None] < Tk) & d_ok[None, :], other=0.0)
        if UPCAST:
            vv = vv.to(ACC)
        acc = acc * alpha[:, None] + tl.dot(pr.to(vv.dtype), vv, out_dtype=ACC, input_precision=PREC)
        m_i = m_new
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("inf"))
    tl.store(lse_ptr + p * Tq + rm, lse, mask=m_ok)
    st_ok = m_ok[:, None] & d_ok[None, :]
    if GATED:
        tl.store(outc_ptr + p * Tq * D + rm[:, None] * D + rd[None, :], o.to(outc_ptr.dtype.element_ty),
                 mask=st_ok)
        if STORE_OUT:
            o = o * tl.load(gate_ptr + p).to(ACC)
    if STORE_OUT:
        tl.store(out_ptr + b * s_ob + h * s_oh + rm[:, None] * s_ot + rd[None, :] * s_od,
                 o.to(out_ptr.dtype.element_ty), mask=st_ok)


@triton.jit
def _bwd_pre(do_ptr, o_ptr, pairs_ptr, gate_ptr, rs_ptr, delta_ptr, H, Tq, D,
             s_gb, s_gh, s_gt, s_gd, s_ob, s_oh, s_ot, s_od,
             O_COMPACT: tl.constexpr, GATED: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr,
             BD: tl.constexpr):
    p, b, h = _pair(pairs_ptr, H)
    pid_m = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rd = tl.arange(0, BD)
    ok = (rm[:, None] < Tq) & (rd[None, :] < D)
    do = tl.load(do_ptr + b * s_gb + h * s_gh + rm[:, None] * s_gt + rd[None, :] * s_gd, mask=ok, other=0.0)
    if O_COMPACT:
        o = tl.load(o_ptr + p * Tq * D + rm[:, None] * D + rd[None, :], mask=ok, other=0.0)
    else:
        o = tl.load(o_ptr + b * s_ob + h * s_oh + rm[:, None] * s_ot + rd[None, :] * s_od, mask=ok, other=0.0)
    rs = tl.sum(do.to(ACC) * o.to(ACC), axis=1)
    g = 1.0
    if GATED:
        g = tl.load(gate_ptr + p).to(ACC)
    tl.store(rs_ptr + p * Tq + rm, rs, mask=rm < Tq)
    tl.store(delta_ptr + p * Tq + rm, rs * g, mask=rm < Tq)


@triton.jit
def _bwd_dkdv(q_ptr, k_ptr, v_ptr, am_ptr, do_ptr, pairs_ptr, gate_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
              H, Tq, Tk, D, scale,
              s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
              s_amb, s_amh, s_amm, s_amn, s_gb, s_gh, s_gt, s_gd, s_db, s_dh, s_dt, s_dd,
              HAS_AM: tl.constexpr, AM_BOOL: tl.constexpr, CAUSAL: tl.constexpr, GATED: tl.constexpr,
              NEED_K: tl.constexpr, NEED_V: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
              PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    p, b, h = _pair(pairs_ptr, H)
    pid_n = tl.program_id(1)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rd = tl.arange(0, BD)
    nd_ok = (rn[:, None] < Tk) & (rd[None, :] < D)
    # k and v of this key block, both as [BD, BN] (transposed) for the dS K^T / dO V^T products
    kt = tl.load(k_ptr + b * s_kb + h * s_kh + rn[None, :] * s_kt + rd[:, None] * s_kd,
                 mask=(rd[:, None] < D) & (rn[None, :] < Tk), other=0.0)
    vt = tl.load(v_ptr + b * s_vb + h * s_vh + rn[None, :] * s_vt + rd[:, None] * s_vd,
                 mask=(rd[:, None] < D) & (rn[None, :] < Tk), other=0.0)
    if UPCAST:
        kt = kt.to(ACC)
        vt = vt.to(ACC)
    g = 1.0
    if GATED:
        g = tl.load(gate_ptr + p).to(ACC)
    dk = tl.zeros((BN, BD), ACC)
    dv = tl.zeros((BN, BD), ACC)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BN // BM) * BM
    for m0 in range(lo, Tq, BM):
        rm = (m0 + tl.arange(0, BM)).to(tl.int64)
        md_ok = (rm[:, None] < Tq) & (rd[None, :] < D)
        q = tl.load(q_ptr + b * s_qb + h * s_qh + rm[:, None] * s_qt + rd[None, :] * s_qd, mask=md_ok, other=0.0)
        do = tl.load(do_ptr + b * s_gb + h * s_gh + rm[:, None] * s_gt + rd[None, :] * s_gd, mask=md_ok,
                     other=0.0)
        if UPCAST:
            q = q.to(ACC)
        do = (do.to(ACC) * g).to(q.dtype)
        lse = tl.load(lse_ptr + p * Tq + rm, mask=rm < Tq, other=float("inf"))
        s = _mask_scores(tl.dot(q, kt, out_dtype=ACC, input_precision=PREC) * scale, rm, rn, Tq, Tk,
                         am_ptr, b * s_amb + h * s_amh, s_amm, s_amn, HAS_AM, AM_BOOL, CAUSAL, ACC)
        pr = tl.exp(s - lse[:, None])  # 0 where masked; lse = +inf (a row with no visible key) gives 0 too
        if NEED_V:
            dv += tl.dot(tl.trans(pr.to(q.dtype)), do, out_dtype=ACC, input_precision=PREC)
        if NEED_K:
            delta = tl.load(delta_ptr + p * Tq + rm, mask=rm < Tq, other=0.0)
            dp = tl.dot(do, vt, out_dtype=ACC, input_precision=PREC)
            ds = pr * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, out_dtype=ACC, input_precision=PREC)
    if NEED_K:
        tl.store(dk_ptr + b * s_db + h * s_dh + rn[:, None] * s_dt + rd[None, :] * s_dd,
                 (dk * scale).to(dk_ptr.dtype.element_ty), mask=nd_ok)
    if NEED_V:
        tl.store(dv_ptr + b * s_db + h * s_dh + rn[:, None] * s_dt + rd[None, :] * s_dd,
                 dv.to(dv_ptr.dtype.element_ty), mask=nd_ok)


@triton.jit
def _bwd_dq(q_ptr, k_ptr, v_ptr, am_ptr, do_ptr, pairs_ptr, gate_ptr, lse_ptr, delta_ptr, dq_ptr,
            H, Tq, Tk, D, scale,
            s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
            s_amb, s_amh, s_amm, s_amn, s_gb, s_gh, s_gt, s_gd, s_db, s_dh, s_dt, s_dd,
            HAS_AM: tl.constexpr, AM_BOOL: tl.constexpr, CAUSAL: tl.constexpr, GATED: tl.constexpr,
            UPCAST: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    p, b, h = _pair(pairs_ptr, H)
    pid_m = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rd = tl.arange(0, BD)
    md_ok = (rm[:, None] < Tq) & (rd[None, :] < D)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rm[:, None] * s_qt + rd[None, :] * s_qd, mask=md_ok, other=0.0)
    do = tl.load(do_ptr + b * s_gb + h * s_gh + rm[:, None] * s_gt + rd[None, :] * s_gd, mask=md_ok, other=0.0)
    if UPCAST:
        q = q.to(ACC)
    g = 1.0
    if GATED:
        g = tl.load(gate_ptr + p).to(ACC)
    do = (do.to(ACC) * g).to(q.dtype)
    lse = tl.load(lse_ptr + p * Tq + rm, mask=rm < Tq, other=float("inf"))
    delta = tl.load(delta_ptr + p * Tq + rm, mask=rm < Tq, other=0.0)
    dq = tl.zeros((BM, BD), ACC)
    hi = _key_end(Tk, pid_m, BM, CAUSAL)
    for n0 in range(0, hi, BN):
        s = _scores(q, k_ptr, b * s_kb + h * s_kh, s_kt, s_kd, am_ptr, b * s_amb + h * s_amh, s_amm, s_amn,
                    rm, n0, Tq, Tk, D, scale, HAS_AM, AM_BOOL, CAUSAL, UPCAST, ACC, PREC, BN, BD)
        pr = tl.exp(s - lse[:, None])
        rn = (n0 + tl.arange(0, BN)).to(tl.int64)
        nd_ok = (rn[:, None] < Tk) & (rd[None, :] < D)
        vt = tl.load(v_ptr + b * s_vb + h * s_vh + rn[None, :] * s_vt + rd[:, None] * s_vd,
                     mask=(rd[:, None] < D) & (rn[None, :] < Tk), other=0.0)
        kk = tl.load(k_ptr + b * s_kb + h * s_kh + rn[:, None] * s_kt + rd[None, :] * s_kd, mask=nd_ok, other=0.0)
        if UPCAST:
            vt = vt.to(ACC)
            kk = kk.to(ACC)
        dp = tl.dot(do, vt, out_dtype=ACC, input_precision=PREC)
        ds = pr * (dp - delta[:, None])
        dq += tl.dot(ds.to(q.dtype), kk, out_dtype=ACC, input_precision=PREC)
    tl.store(dq_ptr + b * s_db + h * s_dh + rm[:, None] * s_dt + rd[None, :] * s_dd,
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=md_ok)


# ------------------------------------------------------------------ launchers
def _blocks(Tq, Tk, D):
    BD = max(16, triton.next_power_of_2(D))
    cap = 64 if BD <= 64 else 32
    BM = max(16, min(cap, triton.next_power_of_2(max(Tq, 1))))
    BN = max(16, min(cap, triton.next_power_of_2(max(Tk, 1))))
    return BM, BN, BD


def _bthd(q, T):
    """A zero [B, H, T, D] tensor laid out [B, T, H, D], like the C++ op's outputs."""
    B, H, _, D = q.shape
    return q.new_zeros((B, T, H, D)).transpose(1, 2)


def _check(q, k, v, head_mask, attn_mask, is_causal, scale):
    require_device(q, "masked_head_attention")
    if q.dim() != 4:
        raise ValueError(f"masked_head_attention (triton): q must be 4-D [B, H, Tq, D]; got {list(q.shape)}")
    B, H, Tq, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"masked_head_attention (triton): k must be [B, H, Tk, D] = [{B}, {H}, Tk, {D}]; "
                         f"got {list(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"masked_head_attention (triton): v must be shaped like k {list(k.shape)}; "
                         f"got {list(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"masked_head_attention (triton): {name} must have the same dtype as q ({q.dtype}); "
                             f"got {t.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"masked_head_attention (triton): q must be float16, bfloat16, float32 or float64; "
                         f"got {q.dtype}")
    _ref.check_causal(Tq, k.shape[2], is_causal, "masked_head_attention (triton)")
    if not (1 <= D <= 256):
        raise ValueError(f"masked_head_attention (triton): head dim D must be in [1, 256]; got {D}")
    if tuple(head_mask.shape) not in ((B, H), (H,)):
        raise ValueError(f"masked_head_attention (triton): head_mask must be [B, H] = {[B, H]} or [H] = {[H]}; "
                         f"got {list(head_mask.shape)}")
    if head_mask.dtype != torch.bool and head_mask.dtype != q.dtype:
        raise ValueError(f"masked_head_attention (triton): head_mask must be bool or have q's dtype ({q.dtype}); "
                         f"got {head_mask.dtype}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise ValueError(f"masked_head_attention (triton): attn_mask must be bool or have q's dtype "
                             f"({q.dtype}); got {attn_mask.dtype}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, H, Tq, k.shape[2]))
            ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, (B, H, Tq, k.shape[2])) == \
                (B, H, Tq, k.shape[2])
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"masked_head_attention (triton): attn_mask must be broadcastable to "
                             f"[B, H, Tq, Tk] = {[B, H, Tq, k.shape[2]]}; got {list(attn_mask.shape)}")
    if scale is not None and not scale > 0 and not scale < 0:
        raise ValueError(f"masked_head_attention (triton): scale must be a finite non-zero number; got {scale}")


def _am_args(attn_mask, q, Tk):
    """(tensor, 4 strides, has, is_bool) of attn_mask expanded to [B, H, Tq, Tk] as a view."""
    B, H, Tq, _ = q.shape
    if attn_mask is None:
        return q, (0, 0, 0, 0), False, False
    am = attn_mask.expand(B, H, Tq, Tk)
    if am.dtype == torch.bool:
        am = am.view(torch.uint8)
        return am, am.stride(), True, True
    return am, am.stride(), True, False


def _resolve(head_mask, B, H):
    """(pairs int64 [P], gate values [P] or None) of the running pairs."""
    hm = head_mask.expand(B, H).reshape(B * H)
    run = hm if hm.dtype == torch.bool else hm != 0
    pairs = torch.nonzero(run).flatten()
    gate = hm.index_select(0, pairs).contiguous() if hm.dtype != torch.bool else None
    return pairs, gate


def _run_fwd(q, k, v, attn_mask, is_causal, scale, pairs, gate, out, out_c, lse, store_out):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    P = pairs.shape[0]
    if P == 0 or Tq == 0:
        return
    if Tk == 0:  # no keys: every row is empty (output 0, lse +inf)
        lse.fill_(float("inf"))
        return
    BM, BN, BD = _blocks(Tq, Tk, D)
    am, s_am, has_am, am_bool = _am_args(attn_mask, q, Tk)
    o = out if store_out else q
    _launch(_fwd, (P, triton.cdiv(Tq, BM)), q, k, v, am, pairs, gate if gate is not None else q, o,
            out_c if gate is not None else q, lse, H, Tq, Tk, D, scale,
            *q.stride(), *k.stride(), *v.stride(), *s_am, *o.stride(),
            HAS_AM=has_am, AM_BOOL=am_bool, CAUSAL=bool(is_causal), GATED=gate is not None,
            STORE_OUT=bool(store_out), UPCAST=_upcast(q), ACC=_acc(q), PREC=_precision(q),
            BM=BM, BN=BN, BD=BD)


def _scale(scale, D):
    return float(scale) if scale is not None else D ** -0.5


def forward(q, k, v, head_mask, attn_mask, is_causal, scale, dense_grad):
    """sparse_ops::masked_head_attention on the Triton kernels: (out, pairs, out_c, lse)."""
    _check(q, k, v, head_mask, attn_mask, is_causal, scale)
    B, H, Tq, D = q.shape
    pairs, gate = _resolve(head_mask, B, H)
    P = pairs.shape[0]
    out = torch.zeros_like(q)  # q's layout, as the C++ op (pairs that do not run stay 0)
    out_c = q.new_empty((P, Tq, D)) if gate is not None else q.new_empty((0,))
    lse = q.new_empty((P, Tq), dtype=_ref.acc_dtype(q.dtype))
    _run_fwd(q, k, v, attn_mask, is_causal, _scale(scale, D), pairs, gate, out, out_c, lse, True)
    return out, pairs, out_c, lse


def backward(grad_out, q, k, v, head_mask, attn_mask, pairs, out, out_c, lse, is_causal, scale, dense_grad, need):
    """sparse_ops::masked_head_attention_backward on the Triton kernels: (dq, dk, dv, dhead_mask)."""
    _check(q, k, v, head_mask, attn_mask, is_causal, scale)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    op = "masked_head_attention_backward (triton)"
    _ref.check_shape(grad_out, q.shape, f"{op}: grad_out", q.dtype)
    _ref.check_shape(out, q.shape, f"{op}: out", q.dtype)
    run = (head_mask != 0).expand(B, H).reshape(-1)
    _ref.check_sorted_subset(pairs, run, f"{op}: pairs must be the sorted running pairs b * H + h of head_mask "
                                         "(as the forward returned them)")
    P = pairs.shape[0]
    if P and Tq:
        _ref.check_shape(lse, (P, Tq), f"{op}: lse", _ref.acc_dtype(q.dtype))
        if head_mask.dtype != torch.bool:
            _ref.check_shape(out_c, (P, Tq, D), f"{op}: out_c", q.dtype)
    sc = _scale(scale, D)
    gated = head_mask.dtype != torch.bool
    need_q, need_k, need_v = bool(need[0]), bool(need[1]), bool(need[2])
    need_m = bool(need[3]) and gated
    e = q.new_empty((0,))
    dq = _bthd(q, Tq) if need_q else e
    dk = _bthd(q, Tk) if need_k else q.new_empty((0,))
    dv = _bthd(q, Tk) if need_v else q.new_empty((0,))
    dm = torch.zeros_like(head_mask) if need_m else q.new_empty((0,))
    P = pairs.shape[0]
    gate = head_mask.expand(B, H).reshape(B * H).index_select(0, pairs).contiguous() if gated else None
    acc_t = _ref.acc_dtype(q.dtype)
    BM, BN, BD = _blocks(Tq, Tk, D)
    rs = torch.zeros((P, Tq), dtype=acc_t, device=q.device)
    delta = torch.zeros((P, Tq), dtype=acc_t, device=q.device)
    if P and Tq and Tk:
        o = out_c if gated else out
        _launch(_bwd_pre, (P, triton.cdiv(Tq, BM)), grad_out, o, pairs, gate if gated else q, rs, delta, H, Tq, D,
                *grad_out.stride(), *(out.stride() if not gated else (0, 0, 0, 0)),
                O_COMPACT=gated, GATED=gated, ACC=_acc(q), BM=BM, BD=BD)
        am, s_am, has_am, am_bool = _am_args(attn_mask, q, Tk)
        common = dict(HAS_AM=has_am, AM_BOOL=am_bool, CAUSAL=bool(is_causal), GATED=gated,
                      UPCAST=_upcast(q), ACC=_acc(q), PREC=_precision(q), BM=BM, BN=BN, BD=BD)
        if need_k or need_v:
            dst = dk if need_k else dv
            _launch(_bwd_dkdv, (P, triton.cdiv(Tk, BN)), q, k, v, am, grad_out, pairs, gate if gated else q, lse,
                    delta, dk if need_k else dst, dv if need_v else dst, H, Tq, Tk, D, sc,
                    *q.stride(), *k.stride(), *v.stride(), *s_am, *grad_out.stride(), *dst.stride(),
                    NEED_K=need_k, NEED_V=need_v, **common)
        if need_q:
            _launch(_bwd_dq, (P, triton.cdiv(Tq, BM)), q, k, v, am, grad_out, pairs, gate if gated else q, lse,
                    delta, dq, H, Tq, Tk, D, sc,
                    *q.stride(), *k.stride(), *v.stride(), *s_am, *grad_out.stride(), *dq.stride(), **common)
    if need_m:
        dflat = torch.zeros(B * H, dtype=acc_t, device=q.device)
        if P:
            dflat.index_copy_(0, pairs, rs.sum(1))
        if dense_grad:
            # pairs a zero gate skipped: their attention runs here (backward only) for the exact gradient
            hm = head_mask.expand(B, H).reshape(B * H)
            skipped = torch.nonzero(hm == 0).flatten()
            S = skipped.shape[0]
            if S and Tq:
                ones = torch.ones(S, dtype=q.dtype, device=q.device)
                oc = q.new_zeros((S, Tq, D))
                lse_s = q.new_empty((S, Tq), dtype=acc_t)
                _run_fwd(q, k, v, attn_mask, is_causal, sc, skipped, ones, q, oc, lse_s, False)
                rs_s = torch.zeros((S, Tq), dtype=acc_t, device=q.device)
                _launch(_bwd_pre, (S, triton.cdiv(Tq, BM)), grad_out, oc, skipped, ones, rs_s, torch.empty_like(rs_s),
                        H, Tq, D, *grad_out.stride(), 0, 0, 0, 0,
                        O_COMPACT=True, GATED=True, ACC=_acc(q), BM=BM, BD=BD)
                dflat.index_copy_(0, skipped, rs_s.sum(1))
        dbh = dflat.view(B, H)
        dm = (dbh.sum(0) if head_mask.dim() == 1 else dbh).to(head_mask.dtype)
    return dq, dk, dv, dm
