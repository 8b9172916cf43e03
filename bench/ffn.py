"""FFN cases: sparse_ops.gated_ffn against the dense FFN and the mask-multiply baseline.

dense:  F.linear(act(F.linear(x, w1, b1)), w2, b2)           (all columns)
masked: the same with the hidden multiplied by the mask       (what users do today)
sparse: sparse_ops.gated_ffn(...)                             (inactive columns never computed)
Masks have exactly round(keep * F) active columns, chosen at random (seeded).

Decode rows (N <= 16) cycle through DECODE_LAYERS copies of the weights, as a model with that
many layers would: 4 x 18.9 MB (fp32, d=768, F=3072) is more than this CPU's 32 MB L3, so each
call streams its weights from memory instead of finding them cached by the previous call.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import sparse_ops
from sparse_ops import backend as _backend

D, FF = 768, 3072
D_GLU, FF_GLU = 768, 2048
DECODE_LAYERS = 4


def _mask(F_, keep, g, rows=None):
    k = round(keep * F_)
    if rows is None:
        m = torch.zeros(F_, dtype=torch.bool)
        m[torch.randperm(F_, generator=g)[:k]] = True
        return m
    m = torch.zeros(rows, F_, dtype=torch.bool)
    for r in range(rows):
        m[r, torch.randperm(F_, generator=g)[:k]] = True
    return m


def _weights(d, f, device, glu, g, requires_grad=False):
    def p(*s, scale):
        return (torch.randn(*s, generator=g) * scale).to(device).requires_grad_(requires_grad)
    w = {"w1": p(f, d, scale=d ** -0.5), "w2": p(d, f, scale=f ** -0.5),
         "b1": p(f, scale=0.02), "b2": p(d, scale=0.02)}
    if glu:
        w["w3"] = p(f, d, scale=d ** -0.5)
    return w


def _dense_ffn(x, w, act, mask_f=None, w2t=None):
    h = act(F.linear(x, w["w1"], w["b1"]))
    if "w3" in w:
        h = h * F.linear(x, w["w3"])
    if mask_f is not None:
        h = h * mask_f
    return F.linear(h, w["w2"], w["b2"])


def _close(a, b, what):
    if not torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3):
        raise AssertionError(f"bench ffn {what}: sparse result differs from the masked one "
                             f"(max abs diff {(a - b).abs().max().item():.3g})")


def _case(name, N, keep, device, mask_kind="shared", w2_transposed=False, glu=False, train=False,
          index_select=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, f = (D_GLU, FF_GLU) if glu else (D, FF)
    act_name = "silu" if glu else "gelu"
    act = F.silu if glu else F.gelu
    n_sets = DECODE_LAYERS if N <= 16 else 1
    sets = []
    for _ in range(n_sets):
        w = _weights(d, f, device, glu, g, requires_grad=train)
        w["w2t"] = w["w2"].detach().t().contiguous().requires_grad_(train)
        sets.append(w)
    x = torch.randn(N, d, generator=g).to(device).requires_grad_(train)
    if mask_kind == "per-row":
        mask = _mask(f, keep, g, rows=N).to(device)
    else:
        mask = _mask(f, keep, g).to(device)
    mask_f = mask.to(x.dtype)
    idx = torch.nonzero(mask).flatten()
    turn = itertools.count()

    def cycled(fn):
        return lambda: fn(sets[next(turn) % n_sets])

    def sparse_on(w):
        return sparse_ops.gated_ffn(x, w["w1"], w["w2t"] if w2_transposed else w["w2"], mask, b1=w["b1"],
                                    b2=w["b2"], w3=w.get("w3"), activation=act_name,
                                    w2_transposed=w2_transposed)

    def index_select_on(w):
        w1a = w["w1"].index_select(0, idx)
        w2a = w["w2t"].index_select(0, idx)
        h = act(F.linear(x, w1a, w["b1"].index_select(0, idx)))
        if "w3" in w:
            h = h * F.linear(x, w["w3"].index_select(0, idx))
        return F.linear(h, w2a.t(), w["b2"])

    fns = {"dense": cycled(lambda w: _dense_ffn(x, w, act)),
           "masked": cycled(lambda w: _dense_ffn(x, w, act, mask_f)),
           "sparse": cycled(sparse_on)}
    if index_select:
        fns["index_select"] = cycled(index_select_on)

    if train:
        grad = torch.randn(N, d, generator=g).to(device)
        params = [x] + [p for w in sets for p in w.values()]

        def stepper(fn):
            def step():
                for p in params:
                    p.grad = None
                fn().backward(grad)
            return step

        fns = {k: stepper(v) for k, v in fns.items()}

    def check():
        with torch.no_grad():
            _close(sparse_on(sets[0]), _dense_ffn(x, sets[0], act, mask_f), name)

    ideal = None
    if mask_kind == "per-row" and N > 1:
        union = mask.any(0).float().mean().item()
        ideal = round(1.0 / union, 3)
    row = {"op": "ffn", "case": name, "device": device, "dtype": "float32",
           "shape": f"N={N} d={d} F={f}" + (" glu" if glu else ""), "keep": keep,
           "backend": _backend.choose("gated_ffn", torch.device(device)),
           "fns": fns, "check": check, "train": train}
    if ideal is not None:
        row["ideal"] = ideal
    return row


# The CUDA decode rows: a LLaMA-3-8B-sized SwiGLU FFN in bf16 (d 4096, F 14336), batch 1 and 4.
D_GPU, FF_GPU = 4096, 14336


_GPU_SETS: dict = {}


def _gpu_weights(d, f, dt):
    """DECODE_LAYERS weight sets of the CUDA decode rows, drawn on the GPU once per process
    (4 x 470 MB: no call finds its weights in the 60 MB L2 left by the previous one)."""
    key = (d, f, dt)
    if key not in _GPU_SETS:
        g = torch.Generator(device="cuda").manual_seed(0)

        def p(*s, scale):
            return (torch.randn(*s, generator=g, device="cuda") * scale).to(dt)
        sets = []
        for _ in range(DECODE_LAYERS):
            w = {"w1": p(f, d, scale=d ** -0.5), "w3": p(f, d, scale=d ** -0.5), "w2": p(d, f, scale=f ** -0.5),
                 "b1": p(f, scale=0.02), "b2": p(d, scale=0.02)}
            w["w2t"] = w["w2"].t().contiguous()
            sets.append(w)
        _GPU_SETS[key] = sets
    return _GPU_SETS[key]


def _gpu_decode_case(N, keep, seed=0):
    """bf16 decode on CUDA: sparse (auto: the Triton split-K GEMV), the CUDA op's warp-per-column
    kernel, the TEAL-style Triton GEMV of bench/teal_gemv.py, against dense cuBLAS (F.linear) and
    the mask multiply. Prints the bandwidth the sparse path reaches on its active weight bytes."""
    from . import teal_gemv
    g = torch.Generator().manual_seed(seed)
    d, f, dt = D_GPU, FF_GPU, torch.bfloat16
    sets = _gpu_weights(d, f, dt)
    x = torch.randn(N, d, generator=g).to(dt).to("cuda")
    mask = _mask(f, keep, g).to("cuda")
    mask_f = mask.to(dt)
    idx = torch.nonzero(mask).flatten()
    turn = itertools.count()

    def cycled(fn):
        return lambda: fn(sets[next(turn) % len(sets)])

    def sparse_on(w, backend="auto"):
        return sparse_ops.gated_ffn(x, w["w1"], w["w2t"], idx, b1=w["b1"], b2=w["b2"], w3=w["w3"],
                                    activation="silu", w2_transposed=True, backend=backend)

    fns = {"dense": cycled(lambda w: _dense_ffn(x, w, F.silu)),
           "masked": cycled(lambda w: _dense_ffn(x, w, F.silu, mask_f)),
           "sparse": cycled(sparse_on),
           "cuda_op": cycled(lambda w: sparse_on(w, "cuda")),
           "teal_gemv": cycled(lambda w: teal_gemv.ffn(x, w["w1"], w["w2t"], w["b1"], w["b2"], w["w3"], idx,
                                                       F.silu))}

    def check():
        with torch.no_grad():
            want = _dense_ffn(x, sets[0], F.silu, mask_f)
            for name, got in (("sparse", sparse_on(sets[0])), ("cuda_op", sparse_on(sets[0], "cuda")),
                              ("teal_gemv", teal_gemv.ffn(x, sets[0]["w1"], sets[0]["w2t"], sets[0]["b1"],
                                                          sets[0]["b2"], sets[0]["w3"], idx, F.silu))):
                err = (got.float() - want.float()).abs().max().item()
                if err > 5e-2 * max(1.0, want.float().abs().max().item()):
                    raise AssertionError(f"bench ffn cuda decode: {name} differs from the masked FFN by {err:.3g}")

    return {"op": "ffn", "case": f"cuda decode N={N} swiglu bf16", "device": "cuda", "dtype": "bfloat16",
            "shape": f"N={N} d={d} F={f} glu", "keep": keep,
            "backend": _backend.choose("gated_ffn", torch.device("cuda")),
            "bytes": 3 * idx.numel() * d * 2, "fns": fns, "check": check, "train": False}


def cases(device: str, quick: bool):
    """The FFN benchmark rows."""
    if device == "cuda":
        for N in (1, 4):
            for k in (1.0, 0.5, 0.25):
                yield _gpu_decode_case(N, k)
    ks = (1.0, 0.5, 0.25)
    N_pre = 1024
    for k in ks:
        yield _case("prefill shared", N_pre, k, device)
    for k in ks:
        yield _case("prefill shared w2t", N_pre, k, device, w2_transposed=True)
    for k in ks:
        yield _case("train fwd+bwd shared", N_pre, k, device, train=True)
    for k in ks:
        yield _case("decode N=1 per-row w2t", 1, k, device, mask_kind="per-row", w2_transposed=True)
    for k in ks:
        yield _case("decode N=4 shared w2t", 4, k, device, w2_transposed=True, index_select=True)
    for k in (0.5, 0.25):
        yield _case("decode N=4 per-row union w2t", 4, k, device, mask_kind="per-row", w2_transposed=True)
    for k in (0.5, 0.25):
        yield _case("decode N=4 shared w2 [d,F]", 4, k, device)
    for k in ks:
        yield _case("swiglu prefill shared", N_pre, k, device, glu=True)
    for k in ks:
        yield _case("swiglu decode N=4 shared w2t", 4, k, device, glu=True, w2_transposed=True)
