"""masked_head_attention, Triton backend (sparse_ops/triton_kernels/heads.py), run on CPU tensors
through the interpreter (TRITON_INTERPRET=1, set in conftest.py): reference equality for every
mask form, causal / attn_mask / key padding, Tq != Tk, odd head dims, fully masked rows,
gradients (gradcheck in float64, STE gate gradient, dense_grad), opcheck, errors, and proof that
pairs that are off are never computed. Shapes are tiny: the interpreter is ~3000x slower than eager.
"""
import os

import pytest
import torch

pytest.importorskip("triton")

from sparse_ops import reference as R  # noqa: E402
from sparse_ops.ops.heads import masked_head_attention as _mha  # noqa: E402

from attention_data import check_off_pairs_untouched  # noqa: E402

D64 = torch.float64
# The kernels compiled for the GPU where one is visible (tests/conftest.py then leaves the
# interpreter off), else the interpreter on CPU tensors.
DEV = "cuda" if (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1") else "cpu"


@pytest.fixture(autouse=True)
def _on_test_device():
    with torch.device(DEV):  # factory calls without a generator make tensors on DEV
        yield


def mha(*args, **kw):
    return _mha(*args, backend="triton", **kw)


def qkv(B, H, Tq, Tk, D, dtype=torch.float32, layout="bhtd", seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for T in (Tq, Tk, Tk):
        if layout == "bthd":  # the layout a fused QKV projection gives
            t = torch.randn(B, T, H, D, generator=g, device="cpu").to(DEV).to(dtype).transpose(1, 2)
        else:
            t = torch.randn(B, H, T, D, generator=g, device="cpu").to(DEV).to(dtype)
        out.append(t.detach().requires_grad_(grad) if grad else t)
    return out


def head_masks(B, H, dtype):
    g = torch.Generator().manual_seed(3)
    on = torch.tensor([[True, False, True], [False, True, False]])
    gate = (torch.rand(B, H, generator=g, device="cpu").to(DEV) + 0.25).to(dtype)
    single = torch.zeros(B, H, dtype=torch.bool)
    single[1, 1] = True
    return {
        "bool_BH": on,
        "bool_H": torch.tensor([True, False, True]),
        "float_BH": gate * on,                               # exact zeros where off
        "float_H": torch.tensor([0.5, 0.0, 1.5], dtype=dtype),
        "all_on": torch.ones(B, H, dtype=torch.bool),
        "all_off": torch.zeros(B, H, dtype=torch.bool),
        "single": single,
    }


def attn_masks(B, H, Tq, Tk, dtype):
    g = torch.Generator().manual_seed(1)
    pad = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    pad[1, ..., -3:] = False  # key padding of sample 1
    full = torch.rand(B, H, Tq, Tk, generator=g, device="cpu").to(DEV) > 0.3
    full[..., 0] = True
    fpad = torch.zeros(B, 1, 1, Tk, dtype=dtype).masked_fill(~pad, float("-inf"))
    return {
        "none": None,
        "key_padding": pad,
        "bool_full": full,
        "float_TqTk": torch.randn(Tq, Tk, generator=g, device="cpu").to(DEV).to(dtype),
        "float_key_padding": fpad,
    }


def tol(dtype):
    return {torch.float32: 2e-5, D64: 1e-10, torch.float16: 3e-3}[dtype]


def close(a, b, dtype):
    t = tol(dtype)
    torch.testing.assert_close(a, b, rtol=t, atol=t)


def run_both(q, k, v, hm, dtype, **kw):
    """Output and gradients (q, k, v and a float head_mask) of the Triton op and the reference."""
    gated = hm.is_floating_point()
    h1 = hm.clone().requires_grad_(gated)
    h2 = hm.clone().requires_grad_(gated)
    out = mha(q, k, v, h1, **kw)
    ref = R.masked_head_attention(q, k, v, h2, **kw)
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), device="cpu").to(DEV).to(dtype)
    ins1 = [q, k, v] + ([h1] if gated else [])
    ins2 = [q, k, v] + ([h2] if gated else [])
    return out, ref, torch.autograd.grad(out, ins1, go), torch.autograd.grad(ref, ins2, go)


@pytest.mark.parametrize("mask_name", ["bool_BH", "bool_H", "float_BH", "float_H", "all_on", "all_off", "single"])
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_mask_forms(mask_name, dtype):
    B, H, Tq, Tk, D = 2, 3, 9, 11, 16
    q, k, v = qkv(B, H, Tq, Tk, D, dtype, grad=True)
    hm = head_masks(B, H, dtype)[mask_name]
    out, ref, g1, g2 = run_both(q, k, v, hm, dtype)
    close(out, ref, dtype)
    for a, b in zip(g1, g2):
        close(a, b, dtype)
    off = ~((hm != 0) if hm.is_floating_point() else hm).expand(B, H)
    assert (out.detach()[off] == 0).all()
    for gr in g1[:3]:
        assert (gr[off] == 0).all()


@pytest.mark.parametrize("am_name", ["none", "key_padding", "bool_full", "float_TqTk", "float_key_padding"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("TqTkD", [(5, 19, 24), (17, 7, 32)])
def test_attn_mask_causal_shapes(am_name, causal, TqTkD):
    Tq, Tk, D = TqTkD
    if causal and Tq < Tk:  # is_causal needs Tq >= Tk
        Tq, Tk = Tk, Tq
    B, H, dtype = 2, 3, torch.float32
    q, k, v = qkv(B, H, Tq, Tk, D, dtype, grad=True)
    hm = head_masks(B, H, dtype)["float_BH"]
    am = attn_masks(B, H, Tq, Tk, dtype)[am_name]
    out, ref, g1, g2 = run_both(q, k, v, hm, dtype, attn_mask=am, is_causal=causal)
    close(out, ref, dtype)
    for a, b in zip(g1, g2):
        close(a, b, dtype)


@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_strided_inputs_and_scale(layout):
    B, H, Tq, Tk, D = 2, 3, 9, 6, 24
    q, k, v = qkv(B, H, Tq, Tk, D, layout=layout, grad=True)
    hm = head_masks(B, H, torch.float32)["bool_BH"]
    out, ref, g1, g2 = run_both(q, k, v, hm, torch.float32, scale=0.3, is_causal=True)
    close(out, ref, torch.float32)
    for a, b in zip(g1, g2):
        close(a, b, torch.float32)


def test_rows_with_no_visible_key_match_the_cpu_op():
    """A query row whose keys are all masked: output 0 and zero gradients, like the C++ op."""
    B, H, Tq, Tk, D = 2, 3, 5, 7, 16
    q, k, v = qkv(B, H, Tq, Tk, D, D64, grad=True)
    hm = torch.tensor([[0.5, 1.0, 0.0], [1.0, 1.0, 2.0]], dtype=D64)
    am = torch.ones(B, 1, Tq, Tk, dtype=torch.bool)
    am[0, :, 2] = False
    am[1, :, 4] = False
    for mask in (am, torch.zeros(am.shape, dtype=D64).masked_fill(~am, float("-inf"))):
        outs = []
        for backend in ("triton", "cpp"):
            qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
            hh = hm.clone().requires_grad_()
            o = _mha(qq, kk, vv, hh, attn_mask=mask, backend=backend)
            o.backward(torch.ones_like(o))
            outs.append((o.detach(), qq.grad, kk.grad, vv.grad, hh.grad))
        for a, b in zip(*outs):
            close(a, b, D64)
        o, dq = outs[0][:2]
        assert torch.isfinite(o).all() and (o[0, :, 2] == 0).all() and (o[1, :, 4] == 0).all()
        assert (dq[0, :, 2] == 0).all()


def test_float16():
    B, H, Tq, Tk, D = 2, 3, 10, 7, 16
    q, k, v = qkv(B, H, Tq, Tk, D, torch.float16, grad=True)
    hm = head_masks(B, H, torch.float16)["float_BH"]
    out, ref, g1, g2 = run_both(q, k, v, hm, torch.float16, is_causal=True)
    assert out.dtype == torch.float16
    close(out, ref, torch.float16)
    for a, b in zip(g1[:3], g2[:3]):
        close(a, b, torch.float16)
    torch.testing.assert_close(g1[3], g2[3], rtol=1e-2, atol=1e-2)  # a sum over Tq * D products


def test_gradcheck_float64():
    # Full gradcheck on the tiniest shape (each numerical column is an interpreter run), then
    # fast_mode (random projections of the Jacobian) on a batch with gates and padding.
    q, k, v = qkv(1, 2, 3, 3, 3, D64, grad=True)
    pad = torch.tensor([True, True, False]).view(1, 1, 1, 3)
    on = torch.tensor([[True, False]])
    assert torch.autograd.gradcheck(lambda q, k, v: mha(q, k, v, on, attn_mask=pad, is_causal=True), [q, k, v])
    B, H, Tq, Tk, D = 2, 3, 4, 4, 5
    q, k, v = qkv(B, H, Tq, Tk, D, D64, grad=True)
    pad = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    pad[1, ..., -1:] = False
    gate = torch.tensor([[0.7, 1.3, 0.4], [0.9, 0.6, 1.1]], dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, g: mha(q, k, v, g, attn_mask=pad, is_causal=True),
                                    [q, k, v, gate], fast_mode=True)
    # gates with zeros: the straight-through gradient is the true one only with dense_grad=True
    gz = torch.tensor([[0.7, 0.0, 1.2], [0.0, 0.9, 0.4]], dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, g: mha(q, k, v, g, attn_mask=pad, dense_grad=True),
                                    [q, k, v, gz], fast_mode=True)


@pytest.mark.parametrize("shared", [False, True])
def test_dense_grad_gate_gradient(shared):
    B, H, Tq, Tk, D = 2, 3, 5, 6, 16
    q, k, v = qkv(B, H, Tq, Tk, D, D64)
    gz = torch.tensor([0.7, 0.0, 1.2], dtype=D64) if shared else \
        torch.tensor([[0.7, 0.0, 1.2], [0.0, 0.9, 0.4]], dtype=D64)
    go = torch.randn(B, H, Tq, D, dtype=D64, generator=torch.Generator().manual_seed(5), device="cpu").to(DEV)
    pad = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    pad[0, ..., -2:] = False
    for dense in (False, True):
        g1, g2 = gz.clone().requires_grad_(), gz.clone().requires_grad_()
        (mha(q, k, v, g1, attn_mask=pad, dense_grad=dense) * go).sum().backward()
        (R.masked_head_attention(q, k, v, g2, attn_mask=pad, dense_grad=dense) * go).sum().backward()
        close(g1.grad, g2.grad, D64)
        if not dense:
            assert (g1.grad[gz == 0] == 0).all()
        else:
            assert (g1.grad[gz == 0] != 0).all()


def test_opcheck():
    from sparse_ops.ops import registry as _reg
    B, H, Tq, Tk, D = 2, 3, 4, 3, 8
    q, k, v = qkv(B, H, Tq, Tk, D, grad=True)
    on = torch.tensor([[True, False, True], [False, True, True]])
    gate = torch.tensor([[0.5, 0.0, 1.5], [1.0, 0.25, 0.0]], requires_grad=True)
    pad = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    pad[0, ..., -2:] = False
    for hm, am, causal, dg in ((on, pad, True, False), (gate, pad, False, True),
                               (torch.zeros(B, H, dtype=torch.bool), None, False, False)):
        torch.library.opcheck(_reg.triton_op("masked_head_attention"), (q, k, v, hm, am, causal, None, dg))


def test_off_pairs_are_never_computed():
    """NaN planted in the q/k/v of pairs that are off reaches neither the output nor any gradient."""
    B, H, Tq, Tk, D = 2, 3, 8, 6, 16
    on = torch.tensor([[True, False, True], [False, True, False]])
    check_off_pairs_untouched(mha, *qkv(B, H, Tq, Tk, D), on,
                              (on, on.float() * 0.5, torch.tensor([[0.5, 0.0, 2.0], [0.0, 1.0, 0.0]])),
                              is_causal=True)


def test_empty_batch_and_zero_queries():
    q, k, v = qkv(0, 3, 5, 6, 16, grad=True)
    out = mha(q, k, v, torch.ones(0, 3, dtype=torch.bool))
    assert out.shape == (0, 3, 5, 16)
    out.sum().backward()
    q, k, v = qkv(2, 3, 0, 5, 16)
    assert mha(q, k, v, torch.ones(3, dtype=torch.bool)).shape == (2, 3, 0, 16)


@pytest.mark.parametrize("args, match", [
    (lambda q, k, v, m, a: (q, k[:, :2], v, m, a), r"k must be \[B, H, Tk, D\]"),
    (lambda q, k, v, m, a: (q, k, v[..., :8], m, a), r"v must be shaped like k"),
    (lambda q, k, v, m, a: (q, k.double(), v, m, a), r"k must have the same dtype as q"),
    (lambda q, k, v, m, a: (q, k, v, m[:, :2], a), r"head_mask must be \[B, H\]"),
    (lambda q, k, v, m, a: (q, k, v, m, torch.ones(5, 5, dtype=torch.bool)), r"attn_mask must be broadcastable"),
    (lambda q, k, v, m, a: (q, k, v, m, torch.ones(5, 6, dtype=torch.int32)), r"attn_mask must be bool or have"),
])
def test_errors_name_the_argument(args, match):
    q, k, v = qkv(2, 3, 5, 6, 16)
    m = torch.ones(2, 3, dtype=torch.bool)
    q2, k2, v2, m2, a2 = args(q, k, v, m, None)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        mha(q2, k2, v2, m2, attn_mask=a2)


def test_errors_from_the_op():
    from sparse_ops.ops import registry as _reg
    q, k, v = qkv(2, 3, 5, 6, 16)
    with pytest.raises(ValueError, match=r"head_mask must be bool or have q's dtype"):
        _reg.triton_op("masked_head_attention")(q, k, v, torch.ones(2, 3, dtype=D64), None, False, None, False)
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        _reg.triton_op("masked_head_attention")(q[0], k, v, torch.ones(2, 3, dtype=torch.bool), None, False, None, False)


def test_pairs_on_grid_axis_0(monkeypatch):
    """Every attention kernel puts the running pairs on grid axis 0 (up to 2^31 - 1 programs;
    axes 1 and 2 allow only 65535, fewer than B * H pairs can be): the grids launched, recorded."""
    import sparse_ops.triton_kernels.heads as tk
    grids = []
    real = tk._launch

    def record(kernel, grid, *args, **kw):
        grids.append((kernel.fn.__name__, tuple(grid)))
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(tk, "_launch", record)
    B, H, Tq, Tk, D = 2, 3, 40, 24, 16
    q, k, v = qkv(B, H, Tq, Tk, D, grad=True)
    hm = torch.tensor([[0.5, 0.0, 2.0], [0.0, 1.0, 1.5]], requires_grad=True)  # 4 pairs run
    mha(q, k, v, hm, is_causal=True).sum().backward()
    names = {n for n, _ in grids}
    assert {"_fwd", "_bwd_pre", "_bwd_dkdv", "_bwd_dq"} <= names, names
    for name, grid in grids:
        assert grid[0] == 4 and all(g < 65535 for g in grid[1:]), (name, grid)
