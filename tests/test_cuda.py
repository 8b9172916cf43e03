"""The CUDA kernels (csrc/cuda) on a GPU: gated_ffn decode and gathered paths, weight-gradient
scatter, and the row ops of skip_layer, against the reference. Skipped without a CUDA device
(CI has none; the GPU machine runs them), and without CUDA kernels in the build."""
import pytest
import torch

import sparse_ops
from sparse_ops import backend

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if not backend.has_kernel("gated_ffn", "CUDA"):
    pytest.skip("sparse_ops._C was built without CUDA kernels (FORCE_CUDA=1 to build them)",
                allow_module_level=True)

DEV = "cuda"


def make(N, d=40, F=77, w2t=False, glu=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(DEV).requires_grad_()
    return t(N, d), {"w1": t(F, d), "w2": t(F, d) if w2t else t(d, F), "w3": t(F, d) if glu else None,
                     "b1": t(F), "b2": t(d)}


def run(backend_name, x, p, active, gate, w2t, **kw):
    return sparse_ops.gated_ffn(x, p["w1"], p["w2"], active, b1=p["b1"], b2=p["b2"], w3=p["w3"], gate=gate,
                                w2_transposed=w2t, backend=backend_name, **kw)


@pytest.mark.parametrize("N", [1, 4, 16, 40])
@pytest.mark.parametrize("w2t", [False, True])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("form", ["none", "idx", "bool", "per_row", "gate", "off"])
def test_gated_ffn_cuda_matches_reference(N, w2t, glu, form):
    x, p = make(N, w2t=w2t, glu=glu)
    g = torch.Generator().manual_seed(1)
    active = {"idx": torch.tensor([0, 5, 9, 76]), "bool": torch.rand(77, generator=g) > 0.5,
              "per_row": torch.rand(N, 77, generator=g) > 0.5,
              "off": torch.zeros(77, dtype=torch.bool)}.get(form)
    active = active.to(DEV) if active is not None else None
    gate = None
    if form == "gate":
        gate = (torch.rand(77, generator=g, dtype=torch.float64) *
                (torch.rand(77, generator=g) > 0.3)).to(DEV).requires_grad_()
    out = run("cuda", x, p, active, gate, w2t)
    ref = run("torch", x, p, active, gate, w2t)
    torch.testing.assert_close(out, ref)
    params = [x] + [v for v in p.values() if v is not None] + ([gate] if gate is not None else [])
    gy = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, gy), torch.autograd.grad(ref, params, gy)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N", [4, 64])
def test_gated_ffn_cuda_low_precision(dtype, N):
    x, p = make(N, d=256, F=512, w2t=True, dtype=dtype)
    m = (torch.rand(512, generator=torch.Generator().manual_seed(2)) > 0.5).to(DEV)
    out = run("cuda", x, p, m, None, True)
    ref = run("torch", x.double(), {k: (v.double() if v is not None else None) for k, v in p.items()}, m, None, True)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_planted_nan_cuda():
    x, p = make(4, w2t=True, glu=True)
    m = (torch.rand(77, generator=torch.Generator().manual_seed(3)) > 0.5).to(DEV)
    with torch.no_grad():
        for k in ("w1", "w3", "w2"):
            p[k][~m] = float("nan")
    out = run("cuda", x, p, m, None, True)
    grads = torch.autograd.grad(out.sum(), [x, p["w1"], p["w2"]])
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def test_rows_cuda_match_cpu():
    x = torch.randn(9, 3, 5, dtype=torch.float64)
    idx = torch.tensor([4, -1, 0, 8])
    src = torch.randn(4, 3, 5, dtype=torch.float64)
    gate = torch.rand(4, dtype=torch.float64)
    for fn, args in ((torch.ops.sparse_ops.gather_rows, (x, idx)),
                     (torch.ops.sparse_ops.scatter_rows, (x, idx, src, gate)),
                     (torch.ops.sparse_ops.scatter_rows, (x, idx, src, None))):
        torch.testing.assert_close(fn(*[a.to(DEV) for a in args]).cpu(), fn(*args))
    xg, sg, gg = (t.to(DEV).requires_grad_() for t in (x, src, gate))
    y = torch.ops.sparse_ops.scatter_rows(xg, idx.to(DEV), sg, gg)
    assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.sparse_ops.scatter_rows(a, idx.to(DEV), b, c),
                                    [xg, sg, gg])
    assert y.is_cuda


def test_opcheck_cuda():
    x, p = make(4, w2t=True)
    args = (x, p["w1"], p["w2"], p["b1"], p["b2"], None, torch.tensor([1, 2, 30], device=DEV), None, "gelu", True,
            False)
    torch.library.opcheck(torch.ops.sparse_ops.gated_ffn.default, args)
