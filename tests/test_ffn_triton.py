"""gated_ffn through the Triton kernels (sparse_ops/triton_kernels/ffn.py), on CPU tensors
with TRITON_INTERPRET=1 (tests/conftest.py) and tiny shapes: the interpreter is slow."""
import os

import pytest
import torch

import sparse_ops

triton = pytest.importorskip("triton", reason="triton is not installed")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from sparse_ops.triton_kernels import ffn as tffn  # noqa: E402

DEV = "cuda" if (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1") else "cpu"
D64 = torch.float64


def make(N, d=13, F=37, w2t=False, glu=False, dtype=D64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(DEV).requires_grad_()
    return t(N, d), {"w1": t(F, d), "w2": t(F, d) if w2t else t(d, F), "w3": t(F, d) if glu else None,
                     "b1": t(F), "b2": t(d)}


def run(backend, x, p, active=None, gate=None, w2t=False, **kw):
    return sparse_ops.gated_ffn(x, p["w1"], p["w2"], active, b1=p["b1"], b2=p["b2"], w3=p["w3"], gate=gate,
                                w2_transposed=w2t, backend=backend, **kw)


def active_forms(N, F=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"none": None, "idx": torch.tensor([0, 5, 7, 36]), "bool": torch.rand(F, generator=g) > 0.5,
            "per_row": torch.rand(N, F, generator=g) > 0.5, "one": torch.tensor([3]),
            "off": torch.zeros(F, dtype=torch.bool)}


@pytest.mark.parametrize("N", [1, 3, 20])
@pytest.mark.parametrize("w2t", [False, True])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("form", ["none", "idx", "bool", "per_row", "one", "off"])
def test_forward_and_grads_match_reference(N, w2t, glu, form):
    x, p = make(N, w2t=w2t, glu=glu)
    a = active_forms(N)[form]
    a = a.to(DEV) if a is not None else None
    gate = (torch.rand(37, dtype=D64) * (torch.rand(37) > 0.3)).to(DEV).requires_grad_()
    params = [x, gate] + [v for v in p.values() if v is not None]
    out = run("triton", x, p, a, gate, w2t)
    ref = run("torch", x, p, a, gate, w2t)
    torch.testing.assert_close(out, ref)
    gy = torch.randn_like(out)
    for got, exp in zip(torch.autograd.grad(out, params, gy), torch.autograd.grad(ref, params, gy)):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu"])
def test_activations_float32(act):
    x, p = make(5, dtype=torch.float32, w2t=True)
    a = active_forms(5)["bool"]
    torch.testing.assert_close(run("triton", x, p, a, None, True, activation=act),
                               run("torch", x, p, a, None, True, activation=act), rtol=1e-4, atol=1e-4)


def test_gradcheck_tiny():
    x, p = make(3, d=5, F=9, w2t=True)
    a = torch.tensor([0, 4, 8])
    gate = torch.rand(9, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w1, w2, g: sparse_ops.gated_ffn(x, w1, w2, a, b1=p["b1"], gate=g, w2_transposed=True,
                                                  backend="triton"),
        [x, p["w1"], p["w2"], gate])


def test_dense_grad_gate():
    x, p = make(4, w2t=True)
    gate = torch.tensor([0.0, 0.5] * 18 + [0.0], dtype=D64, requires_grad=True)
    gy = torch.randn(4, 13, dtype=D64)
    for dg in (False, True):
        got = torch.autograd.grad(run("triton", x, p, None, gate, True, dense_grad=dg), gate, gy)[0]
        exp = torch.autograd.grad(run("torch", x, p, None, gate, True, dense_grad=dg), gate, gy)[0]
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("N", [2, 20])
def test_opcheck(N):
    x, p = make(N, w2t=True, glu=True)
    args = (x, p["w1"], p["w2"], p["b1"], p["b2"], p["w3"], torch.tensor([1, 2, 30]), None, "gelu", True, False)
    from sparse_ops.ops import registry
    torch.library.opcheck(registry.triton_op("gated_ffn"), args)
    # save=False (inputs that do not require grad): out and the plan as with save=True, pre and up empty
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    full, lean = registry.triton_op("gated_ffn")(*args), registry.triton_op("gated_ffn")(*args, False)
    assert all(torch.equal(lean[i], full[i]) for i in (0, 1, 4, 5)) and lean[2].numel() == lean[3].numel() == 0
    torch.library.opcheck(registry.triton_op("gated_ffn"), args + (False,))


@pytest.mark.parametrize("N", [1, 20])
@pytest.mark.parametrize("w2t", [False, True])
def test_planted_nan_in_inactive_rows(N, w2t):
    x, p = make(N, w2t=w2t, glu=True)
    a = active_forms(N)["bool"]
    with torch.no_grad():
        for k in ("w1", "w3"):
            p[k][~a] = float("nan")
        if w2t:
            p["w2"][~a] = float("nan")
        else:
            p["w2"][:, ~a] = float("nan")
        p["b1"][~a] = float("nan")
    out = run("triton", x, p, a, None, w2t)
    grads = torch.autograd.grad(out.sum(), [x] + [v for v in p.values() if v is not None])
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def test_bad_inputs():
    x, p = make(3)
    with pytest.raises(ValueError, match=r"active indices must be distinct and in \[0, F\).*max 37"):
        run("triton", x, p, torch.tensor([0, 37]))
    with pytest.raises(ValueError, match=r"active indices must be distinct.*min -1"):
        run("triton", x, p, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"active indices must be distinct.*1 repeated"):
        run("triton", x, p, torch.tensor([4, 2, 4]))
    with pytest.raises(ValueError, match=r"w2 must be \[37, 13\]"):
        run("triton", x, p, None, None, True)


@pytest.mark.parametrize("N", [1, 3, 20])
@pytest.mark.parametrize("shape", ["scalar", "N1", "one_F"])
def test_broadcast_gates(N, shape):
    # A scalar gate reaches the kernels as a stride-0 view of [F], an [N, 1] gate as a stride-0
    # [N, F] view: the decode GEMV (N <= 16, w2 transposed) must read them through their strides.
    x, p = make(N, w2t=True, glu=True)
    g = {"scalar": torch.tensor(0.5, dtype=D64), "N1": torch.rand(N, 1, dtype=D64) + 0.5,
         "one_F": torch.rand(1, 37, dtype=D64) + 0.5}[shape].to(DEV).requires_grad_()
    out, ref = run("triton", x, p, None, g, True), run("torch", x, p, None, g, True)
    torch.testing.assert_close(out, ref)
    gy = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, g, gy)[0], torch.autograd.grad(ref, g, gy)[0])


@pytest.mark.parametrize("N", [2, 20])
@pytest.mark.parametrize("w2t", [False, True])
def test_strided_weights(N, w2t):
    # nn.Linear weights used transposed (w = W.t()), as a caller holding [d, F] storage would pass them.
    x, p = make(N, w2t=w2t, glu=True)
    q = dict(p)
    for name in ("w1", "w3", "w2"):
        q[name] = p[name].detach().t().contiguous().t().requires_grad_()
        assert not q[name].is_contiguous()
    a = active_forms(N)["bool"].to(DEV)
    out, ref = run("triton", x, q, a, None, w2t), run("torch", x, p, a, None, w2t)
    torch.testing.assert_close(out, ref)
    gy = torch.randn_like(out)
    got = torch.autograd.grad(out, [q["w1"], q["w2"], q["w3"]], gy)
    exp = torch.autograd.grad(ref, [p["w1"], p["w2"], p["w3"]], gy)
    for a_, b_ in zip(got, exp):
        torch.testing.assert_close(a_, b_)


@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("w2t", [False, True])
@pytest.mark.parametrize("form", ["none", "per_row", "gate"])
def test_decode_split_reductions(monkeypatch, split, w2t, form):
    """The decode kernels with their reductions split over programs (d for the up-projection,
    the active columns for the down-projection; on a GPU the split follows the SM count): several
    d tiles (d = 300 > BD = 128) and column tiles (K up to 100 > BK = 32), uneven splits included."""
    monkeypatch.setattr(tffn, "_splits", lambda tiles, other, device: min(tiles, split))
    N, d, F = 5, 300, 100
    x, p = make(N, d=d, F=F, w2t=w2t, glu=True, seed=4)
    g = torch.Generator().manual_seed(5)
    a = (torch.rand(N, F, generator=g) > 0.4).to(DEV) if form == "per_row" else None
    gate = ((torch.rand(N, F, generator=g, dtype=D64) + 0.5) * (torch.rand(N, F, generator=g) > 0.2)).to(DEV) \
        .requires_grad_() if form == "gate" else None
    out, ref = run("triton", x, p, a, gate, w2t), run("torch", x, p, a, gate, w2t)
    torch.testing.assert_close(out, ref)
    params = [x] + [v for v in p.values() if v is not None] + ([gate] if gate is not None else [])
    gy = torch.randn_like(out)
    for got, exp in zip(torch.autograd.grad(out, params, gy), torch.autograd.grad(ref, params, gy)):
        torch.testing.assert_close(got, exp)


def test_decode_kernel_reads_only_active_rows():
    """NaN in every weight row of an inactive column: the decode kernels never load them."""
    N, d, F = 3, 140, 70
    x, p = make(N, d=d, F=F, w2t=True, glu=True, seed=6)
    on = torch.zeros(F, dtype=torch.bool)
    on[[1, 33, 34, 69]] = True
    with torch.no_grad():
        for name in ("w1", "w3", "w2"):
            p[name][~on.to(DEV)] = float("nan")
        p["b1"][~on.to(DEV)] = float("nan")
    out = run("triton", x, p, on.to(DEV), None, True)
    assert torch.isfinite(out).all()
    q = {k: (v.detach().nan_to_num(0.0) if v is not None else None) for k, v in p.items()}
    torch.testing.assert_close(out, run("torch", x, q, on.to(DEV), None, True))
