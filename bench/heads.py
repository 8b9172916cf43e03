"""Head cases: sparse_ops.masked_head_attention / SparseMultiheadAttention against dense attention.

Attention core (q, k, v [B, H, T, D] given):
  dense:  F.scaled_dot_product_attention on every (sample, head) pair
  masked: the same, times head_mask[b, h]                     (HF `head_mask` style)
  sparse: sparse_ops.masked_head_attention(q, k, v, head_mask) (off pairs never computed)
  flex:   torch.compile(flex_attention) with a BlockMask whose mask_mod returns head_mask[b, h]
          (FlexAttention skips the blocks of off pairs); when it cannot run here, the case name
          says why (the error it raised).
Whole attention block (x [B, T, d], d=768, 12 heads):
  dense:  torch.nn.MultiheadAttention(768, 12, batch_first=True)(x, x, x, need_weights=False)
  masked: the same math written out (F.linear -> SDPA -> times head_mask -> F.linear), i.e. every
          head's attention output multiplied by its mask before out_proj (HF `head_mask` style)
  sparse: sparse_ops.nn.SparseMultiheadAttention.from_module(mha)(x, x, x, head_mask=mask)
Masks are per sample: exactly round(keep * H) heads on in every sample, chosen at random (seeded).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import sparse_ops
from sparse_ops import backend as _backend

B, H, T, DH = 8, 12, 256, 64
D_MODEL = H * DH

_flex_state = {}  # the compiled flex_attention (one per process, so its compile is paid once)


def _head_mask(keep, g, device):
    """[B, H] bool, exactly round(keep * H) heads on in every sample."""
    m = torch.zeros(B, H, dtype=torch.bool)
    for b in range(B):
        m[b, torch.randperm(H, generator=g)[:round(keep * H)]] = True
    return m.to(device)


def _close(a, b, what, tol=1e-4):
    if not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol):
        raise AssertionError(f"bench heads {what}: result differs from the masked one "
                             f"(max abs diff {(a.float() - b.float()).abs().max().item():.3g})")


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = msg.split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {msg[:160]}" if msg else type(e).__name__


def _flex(q, k, v, head_mask, causal, train):
    """(callable running flex_attention over the running pairs, None, first-call seconds) or
    (None, the reason it cannot run here, None).

    Runs it once here (forward, or forward+backward for training rows): that pays the compile
    (timed; JSON field flex_compile_s) and surfaces any error before the row is timed.
    """
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as e:  # noqa: BLE001 - any failure is the reason
        return None, f"flex: {_short(e)}", None
    if "fn" not in _flex_state:
        _flex_state["fn"] = torch.compile(flex_attention)
    fa = _flex_state["fn"]
    # One mask_mod for causal and not: a different mask_mod function would compile again.
    full = torch.tensor(not causal, device=q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return head_mask[b, h] & ((q_idx >= kv_idx) | full)

    try:
        bm = create_block_mask(mask_mod, B, H, q.shape[2], k.shape[2], device=q.device)

        def run():
            return fa(q, k, v, block_mask=bm)

        t0 = time.perf_counter()
        if train:
            with torch.enable_grad():
                run().sum().backward()
            for t in (q, k, v):
                t.grad = None
        else:
            with torch.inference_mode():
                run()
        if q.device.type == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a measured failure is reported, not hidden
        return None, f"flex: {_short(e)}", None
    return run, None, compile_s


def _row(name, shape, keep, device, fns, check, train, note=None, **extra):
    row = {"op": "heads", "case": name, "device": device, "dtype": "float32", "shape": shape, "keep": keep,
           "backend": _backend.choose("masked_head_attention", torch.device(device)),
           "fns": fns, "check": check, "train": train}
    if note:
        row["note"] = note
    row.update({k: v for k, v in extra.items() if v is not None})
    return row


def _stepper(fn, params, grad):
    def step():
        for p in params:
            p.grad = None
        fn().backward(grad)
    return step


def core(keep, device, train=False, causal=False, flex=True, seed=0):
    """The attention core on given q, k, v [B, H, T, D]."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, DH, generator=g).to(device).requires_grad_(train) for _ in range(3))
    hm = _head_mask(keep, g, device)
    hm_f = hm.to(q.dtype)[..., None, None]

    def dense():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def masked():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal) * hm_f

    def sparse():
        return sparse_ops.masked_head_attention(q, k, v, hm, is_causal=causal)

    fns = {"dense": dense, "masked": masked, "sparse": sparse}
    flex_fn, note, compile_s = _flex(q, k, v, hm, causal, train) if flex else (None, None, None)
    if flex_fn is not None:
        fns["flex"] = flex_fn
    grad = torch.randn(B, H, T, DH, generator=g).to(device) if train else None

    def check():
        with torch.no_grad():
            ref = masked()
            _close(sparse(), ref, "core sparse")
            if flex_fn is not None:
                _close(flex_fn(), ref, "core flex")
        if train:
            grads = {}
            for name, fn in (("masked", masked), ("sparse", sparse)):
                for t in (q, k, v):
                    t.grad = None
                fn().backward(grad)
                grads[name] = [t.grad.clone() for t in (q, k, v)]
            for a, b, w in zip(grads["sparse"], grads["masked"], "qkv"):
                _close(a, b, f"core sparse d{w}")

    if train:
        fns = {n: _stepper(f, (q, k, v), grad) for n, f in fns.items()}
    name = "core " + ("causal " if causal else "") + ("fwd+bwd" if train else "fwd") + " (keep*H/sample)"
    return _row(name, f"B={B} H={H} T={T} D={DH}", keep, device, fns, check, train, note,
                flex_compile_s=None if compile_s is None else round(compile_s, 2))


def _mha_masked(x, mha, hm_f=None):
    """nn.MultiheadAttention's math (self-attention, batch_first, no attn mask) with every head's
    attention output multiplied by hm_f [B, H, 1, 1] before out_proj."""
    Bx, Tx, E = x.shape
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.view(Bx, Tx, 3, H, E // H).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, Dh]
    o = F.scaled_dot_product_attention(q, k, v)
    if hm_f is not None:
        o = o * hm_f
    return F.linear(o.transpose(1, 2).reshape(Bx, Tx, E), mha.out_proj.weight, mha.out_proj.bias)


def block(keep, device, train, smha_cls, seed=0):
    """The whole attention block: in_proj, attention, out_proj."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    mha = nn.MultiheadAttention(D_MODEL, H, batch_first=True).to(device).train(train)
    smha = smha_cls.from_module(mha).to(device).train(train)
    x = torch.randn(B, T, D_MODEL, generator=g).to(device).requires_grad_(train)
    hm = _head_mask(keep, g, device)
    hm_f = hm.to(x.dtype)[..., None, None]

    def dense():
        return mha(x, x, x, need_weights=False)[0]

    def masked():
        return _mha_masked(x, mha, hm_f)

    def sparse():
        return smha(x, x, x, need_weights=False, head_mask=hm)[0]

    fns = {"dense": dense, "masked": masked, "sparse": sparse}
    grad = torch.randn(B, T, D_MODEL, generator=g).to(device) if train else None
    params = [x] + list(mha.parameters()) + list(smha.parameters())

    def check():
        with torch.no_grad():
            # the written-out baseline is the module's math
            _close(_mha_masked(x, mha), dense(), "block baseline (all heads on) vs nn.MultiheadAttention",
                   tol=1e-5)
            _close(sparse(), masked(), "block sparse")
        if train:
            xg = {}
            for name, fn in (("masked", masked), ("sparse", sparse)):
                for p in params:
                    p.grad = None
                fn().backward(grad)
                xg[name] = x.grad.clone()
            _close(xg["sparse"], xg["masked"], "block sparse dx")

    if train:
        fns = {n: _stepper(f, params, grad) for n, f in fns.items()}
    name = "MHA block " + ("fwd+bwd" if train else "fwd") + " (keep*H/sample)"
    return _row(name, f"B={B} T={T} d={D_MODEL} H={H}", keep, device, fns, check, train)


def cases(device: str, quick: bool):
    """Core rows, then block rows. --quick drops the slowest rows (training at keep 1.0 / 0.25,
    the block forward at keep 0.5) to stay around a minute and a half on 2 CPU cores."""
    ks = (1.0, 0.5, 0.25)
    for k in ks:
        yield core(k, device)
    yield core(0.5, device, causal=True)
    for k in ((0.5,) if quick else ks):
        yield core(k, device, train=True)
    try:
        from sparse_ops.nn import SparseMultiheadAttention
    except Exception as e:  # noqa: BLE001 - the reason goes in the table
        print(f"heads  MHA block rows skipped: `from sparse_ops.nn import SparseMultiheadAttention` "
              f"failed ({_short(e)})", flush=True)
        return
    for k in ((1.0, 0.25) if quick else ks):
        yield block(k, device, False, SparseMultiheadAttention)
    for k in ((0.5,) if quick else ks):
        yield block(k, device, True, SparseMultiheadAttention)
