"""gated_ffn on CPU: reference equality, gradients, opcheck, compile, errors, skipped work.

Both CPU paths are covered: N <= 16 rows in float32/float64 take the fused decode kernel
(csrc/cpu/ffn_cpu.cpp), more rows (or other dtypes) the gathered-GEMM path
(csrc/ffn_compute.cpp), and per-row masks with few distinct rows the grouped path.
"""
import pytest
import torch

import sparse_ops
from sparse_ops import reference as R

D64 = torch.float64
ACTS = ["gelu", "gelu_tanh", "relu", "silu"]


def make(N, d=13, F=29, *, w2t=False, glu=False, bias=True, dtype=D64, grad=False, lead=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
    x = t(*(lead or (N,)), d)
    p = {"w1": t(F, d), "w2": t(F, d) if w2t else t(d, F), "w3": t(F, d) if glu else None,
         "b1": t(F) if bias else None, "b2": t(d) if bias else None}
    return x, p


def tol(dtype):
    return {D64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2),
            torch.float16: (3e-3, 3e-3)}[dtype]


def call(fn, x, p, active=None, gate=None, w2t=False, **kw):
    return fn(x, p["w1"], p["w2"], active, b1=p["b1"], b2=p["b2"], w3=p["w3"], gate=gate,
              w2_transposed=w2t, **kw)


def masks(N, F, lead=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (lead or (N,)) + (F,)
    return {
        "none": None,
        "idx": torch.tensor([3, 0, 7, 28, 12]),                   # unsorted (repeats are refused)
        "bool": torch.rand(F, generator=g) > 0.5,
        "per_row": torch.rand(*shape, generator=g) > 0.5,
        "one": torch.tensor([5]),
        "all": torch.ones(F, dtype=torch.bool),
        "off": torch.zeros(F, dtype=torch.bool),
    }


@pytest.mark.parametrize("N", [1, 4, 16, 17, 37])
@pytest.mark.parametrize("w2t", [False, True])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("mask", ["none", "idx", "bool", "per_row", "one", "all", "off"])
def test_forward_matches_reference(N, w2t, glu, mask):
    x, p = make(N, w2t=w2t, glu=glu)
    m = masks(N, 29)[mask]
    got = call(sparse_ops.gated_ffn, x, p, m, w2t=w2t)
    exp = call(R.gated_ffn, x, p, m, w2t=w2t)
    torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("N", [1, 2, 5, 6, 16])
@pytest.mark.parametrize("w2t", [False, True])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("mask", ["none", "bool", "per_row"])
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_decode_kernel_many_blocks(N, w2t, glu, mask, dtype):
    """F = 301 columns: several 64-column phase blocks per thread, groups of four columns with a
    short last group, rows in tiles of four with leftover rows (N = 5, 6), odd d, and the
    prefetch reaching across blocks and phases."""
    x, p = make(N, d=45, F=301, w2t=w2t, glu=glu, dtype=dtype)
    m = masks(N, 301)[mask]
    got = call(sparse_ops.gated_ffn, x, p, m, w2t=w2t)
    # the reference in float64 on the same values; float32 sums of 301 terms of size ~10
    exp = call(R.gated_ffn, x.double(), {k: v.double() if v is not None else None for k, v in p.items()},
               m, w2t=w2t)
    scale = exp.abs().max().item()
    eps = 1e-12 if dtype == D64 else 1e-5
    torch.testing.assert_close(got.double(), exp, rtol=eps, atol=eps * scale)


@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("mask", ["bool", "per_row"])
def test_decode_kernel_is_deterministic(N, mask):
    """The threads split the columns the same way every call, so identical calls agree bitwise."""
    x, p = make(N, d=45, F=301, w2t=True, dtype=torch.float32)
    m = masks(N, 301)[mask]
    first = call(sparse_ops.gated_ffn, x, p, m, w2t=True)
    for _ in range(20):
        assert torch.equal(call(sparse_ops.gated_ffn, x, p, m, w2t=True), first)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("N", [2, 20])
def test_activations_and_no_bias(act, N):
    x, p = make(N, bias=False, w2t=True)
    m = masks(N, 29)["bool"]
    torch.testing.assert_close(call(sparse_ops.gated_ffn, x, p, m, w2t=True, activation=act),
                               call(R.gated_ffn, x, p, m, w2t=True, activation=act))


@pytest.mark.parametrize("N", [3, 40])
@pytest.mark.parametrize("gate_kind", ["shared", "per_row", "per_sample", "scalar", "zeros"])
def test_gate_forms(N, gate_kind):
    B, T = 2, N // 2 if N > 3 else 1
    lead = (B, T)
    x, p = make(None, lead=lead)
    g = torch.Generator().manual_seed(3)
    F = 29
    gate = {"shared": torch.rand(F, generator=g, dtype=D64),
            "per_row": torch.rand(B, T, F, generator=g, dtype=D64),
            "per_sample": torch.rand(B, 1, F, generator=g, dtype=D64),
            "scalar": torch.rand(1, generator=g, dtype=D64),
            "zeros": torch.rand(F, generator=g, dtype=D64) * (torch.rand(F, generator=g) > 0.5)}[gate_kind]
    for m in [None, torch.rand(F, generator=g) > 0.3, torch.rand(B, 1, F, generator=g) > 0.3]:
        torch.testing.assert_close(call(sparse_ops.gated_ffn, x, p, m, gate),
                                   call(R.gated_ffn, x, p, m, gate))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N", [4, 33])
def test_lower_precision(dtype, N):
    x, p = make(N, dtype=dtype, w2t=True)
    m = masks(N, 29)["bool"]
    got = call(sparse_ops.gated_ffn, x, p, m, w2t=True)
    x64, p64 = make(N, w2t=True)
    exp = call(R.gated_ffn, x64, p64, m, w2t=True)
    rt, at = tol(dtype)
    torch.testing.assert_close(got.double(), exp, rtol=rt * 10, atol=at * 10 * exp.abs().max().item())


def test_all_off_is_bias_and_empty_batch():
    x, p = make(5)
    off = torch.zeros(29, dtype=torch.bool)
    out = call(sparse_ops.gated_ffn, x, p, off)
    torch.testing.assert_close(out, p["b2"].expand(5, 13))
    p["b2"] = None
    assert torch.equal(call(sparse_ops.gated_ffn, x, p, off), torch.zeros(5, 13, dtype=D64))
    for lead in [(0,), (2, 0)]:
        xe, pe = make(None, lead=lead)
        for m in [None, masks(1, 29)["bool"], torch.tensor([1, 2])]:
            assert call(sparse_ops.gated_ffn, xe, pe, m).shape == (*lead, 13)


# ----------------------------------------------------------------- gradients
@pytest.mark.parametrize("N", [3, 37])
@pytest.mark.parametrize("w2t", [False, True])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("mask", ["none", "idx", "per_row"])
def test_gradcheck(N, w2t, glu, mask):
    x, p = make(N, d=5, F=9, w2t=w2t, glu=glu, grad=True)
    m = {"none": None, "idx": torch.tensor([0, 4, 8]),
         "per_row": torch.rand(N, 9, generator=torch.Generator().manual_seed(2)) > 0.4}[mask]
    gate = torch.rand(9, dtype=D64, requires_grad=True)  # no zeros: STE equals the true gradient
    names = [k for k in ("w1", "w2", "w3", "b1", "b2") if p[k] is not None]

    def f(x, gate, *ws):
        q = dict(p, **dict(zip(names, ws)))
        return call(sparse_ops.gated_ffn, x, q, m, gate, w2t=w2t)

    assert torch.autograd.gradcheck(f, [x, gate] + [p[k] for k in names])


@pytest.mark.parametrize("N", [3, 37])
@pytest.mark.parametrize("per_row", [False, True])
def test_gate_straight_through(N, per_row):
    x, p = make(N, grad=True, w2t=True)
    g = torch.Generator().manual_seed(4)
    shape = (N, 29) if per_row else (29,)
    gate = (torch.rand(*shape, generator=g, dtype=D64) * (torch.rand(*shape, generator=g) > 0.4)).requires_grad_()
    gy = torch.randn(N, 13, generator=g, dtype=D64)
    params = [x, gate, p["w1"], p["w2"], p["b1"], p["b2"]]
    for dense_grad in (False, True):
        got = torch.autograd.grad(call(sparse_ops.gated_ffn, x, p, None, gate, w2t=True, dense_grad=dense_grad),
                                  params, gy)
        exp = torch.autograd.grad(call(R.gated_ffn, x, p, None, gate, w2t=True, dense_grad=dense_grad),
                                  params, gy)
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b)
        zero = gate == 0
        if not dense_grad:
            assert torch.all(got[1][zero] == 0)
        else:
            assert torch.count_nonzero(got[1][zero]) > 0  # the exact (reference) values, not zeros
    # with dense_grad, gradcheck holds even at zero gates
    x2, p2 = make(3, d=5, F=9, w2t=True, grad=True)
    gz = torch.tensor([0.0, 0.5, 0.0, 1.0, 0.2, 0.0, 0.3, 0.9, 0.0], dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda gz: call(sparse_ops.gated_ffn, x2, p2, None, gz, w2t=True, dense_grad=True), [gz])


@pytest.mark.parametrize("N", [4, 40])
@pytest.mark.parametrize("w2t", [False, True])
def test_inactive_weight_grads_are_exact_zeros(N, w2t):
    x, p = make(N, w2t=w2t, glu=True, grad=True)
    m = torch.zeros(29, dtype=torch.bool)
    m[[1, 5, 20]] = True
    out = call(sparse_ops.gated_ffn, x, p, m, w2t=w2t)
    out.pow(2).sum().backward()
    off = ~m
    assert torch.all(p["w1"].grad[off] == 0) and torch.all(p["w3"].grad[off] == 0)
    assert torch.all(p["b1"].grad[off] == 0)
    w2g = p["w2"].grad[off] if w2t else p["w2"].grad[:, off]
    assert torch.all(w2g == 0)
    assert torch.count_nonzero(p["w1"].grad[m]) > 0


# ----------------------------------------------------------------- skipped work is not done
@pytest.mark.parametrize("N", [1, 4, 6, 40])
@pytest.mark.parametrize("w2t", [False, True])
@pytest.mark.parametrize("kind", ["shared", "per_row"])
@pytest.mark.parametrize("F", [29, 301])
def test_planted_nan_in_inactive_columns_never_reaches_results(N, w2t, kind, F):
    x, p = make(N, F=F, w2t=w2t, glu=True, grad=True)
    g = torch.Generator().manual_seed(5)
    if kind == "shared":
        m = torch.rand(F, generator=g) > 0.5
        dead = ~m
    else:
        m = torch.rand(N, F, generator=g) > 0.5
        m[:, :4] = False  # columns 0..3 inactive for every row
        dead = ~m.any(0)
    clean = {k: (v.detach().clone() if v is not None else None) for k, v in p.items()}
    with torch.no_grad():
        for k in ("w1", "w3"):
            p[k][dead] = float("nan")
        p["b1"][dead] = float("nan")
        if w2t:
            p["w2"][dead] = float("nan")
        else:
            p["w2"][:, dead] = float("nan")
    out = call(sparse_ops.gated_ffn, x, p, m, w2t=w2t)
    gy = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + [p[k] for k in ("w1", "w2", "w3", "b1", "b2")], gy)
    assert torch.isfinite(out).all()
    for gr in grads:
        assert torch.isfinite(gr).all()
    clean = {k: (v.requires_grad_() if v is not None else None) for k, v in clean.items()}
    xc = x.detach().clone().requires_grad_()
    exp = call(R.gated_ffn, xc, clean, m, w2t=w2t)
    torch.testing.assert_close(out, exp)
    exp_g = torch.autograd.grad(exp, [xc] + [clean[k] for k in ("w1", "w2", "w3", "b1", "b2")], gy)
    for a, b in zip(grads, exp_g):
        torch.testing.assert_close(a, b)


def test_large_finite_inputs_stay_finite():
    x, p = make(6, w2t=True)
    x = x * 1e3
    m = masks(6, 29)["bool"]
    got = call(sparse_ops.gated_ffn, x, p, m, w2t=True, activation="silu")
    exp = call(R.gated_ffn, x, p, m, w2t=True, activation="silu")
    assert torch.isfinite(exp).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got, exp)


# ----------------------------------------------------------------- opcheck, compile
def _op_args(N, w2t, glu, active, gate):
    x, p = make(N, w2t=w2t, glu=glu, grad=True)
    return (x, p["w1"], p["w2"], p["b1"], p["b2"], p["w3"], active, gate, "gelu", w2t, False)


@pytest.mark.parametrize("N", [3, 37])
@pytest.mark.parametrize("case", ["none", "idx", "bool", "per_row", "gate", "glu_w2t"])
def test_opcheck(N, case):
    g = torch.Generator().manual_seed(6)
    active = {"idx": torch.tensor([0, 5, 9]), "bool": torch.rand(29, generator=g) > 0.5,
              "per_row": torch.rand(N, 29, generator=g) > 0.5}.get(case)
    gate = torch.rand(29, dtype=D64, generator=g).requires_grad_() if case == "gate" else None
    args = _op_args(N, case == "glu_w2t", case == "glu_w2t", active, gate)
    torch.library.opcheck(torch.ops.sparse_ops.gated_ffn.default, args)


def test_compile_fullgraph_no_mask_and_shared_mask():
    torch._dynamo.reset()
    x, p = make(20, w2t=True, dtype=torch.float32, grad=True)
    m = masks(20, 29)["bool"]

    def f(x, w1, w2, b1, b2, active):
        return sparse_ops.gated_ffn(x, w1, w2, active, b1=b1, b2=b2, w2_transposed=True)

    cf = torch.compile(f, fullgraph=True)
    for active in (None, m):
        got = cf(x, p["w1"], p["w2"], p["b1"], p["b2"], active)
        exp = call(R.gated_ffn, x, p, active, w2t=True)
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
        gg = torch.autograd.grad(got.sum(), [x, p["w1"]])
        ge = torch.autograd.grad(exp.sum(), [x, p["w1"]])
        for a, b in zip(gg, ge):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- errors
def _bad(**over):
    x, p = make(4, w2t=False)
    args = dict(x=x, w1=p["w1"], w2=p["w2"], active=None, b1=p["b1"], b2=p["b2"], w3=None, gate=None)
    args.update(over)
    a = args.pop("active")
    return lambda: sparse_ops.gated_ffn(args.pop("x"), args.pop("w1"), args.pop("w2"), a, **args)


@pytest.mark.parametrize("over,exc,match", [
    (dict(active=torch.tensor([0, 29])), RuntimeError, r"active indices must be in \[0, F\)"),
    (dict(active=torch.tensor([-1, 2])), RuntimeError, r"active indices must be in \[0, F\)"),
    (dict(active=torch.tensor([3, 1, 3])), RuntimeError, "active indices must be distinct; got 3 more than once"),
    (dict(active=torch.tensor([5, 5]), gate=torch.rand(29, dtype=D64)), RuntimeError,
     "active indices must be distinct; got 5 more than once"),
    (dict(active=torch.tensor([2, 29]), gate=torch.rand(4, 29, dtype=D64)), RuntimeError,
     r"active indices must be in \[0, F\) = \[0, 29\); got min 2, max 29"),
    (dict(active=torch.tensor([1, 2], dtype=torch.int32)), TypeError, "active must be int64 indices"),
    (dict(active=torch.tensor([1.0, 2.0])), TypeError, "active must be int64 indices"),
    (dict(active=torch.ones(28, dtype=torch.bool)), RuntimeError, "bool active mask must be"),
    (dict(active=torch.ones(3, 29, dtype=torch.bool)), ValueError, "per-row active mask"),
    (dict(gate=torch.rand(28, dtype=D64)), ValueError, "gate must be broadcastable"),
    (dict(gate=torch.ones(29, dtype=torch.int64)), TypeError, "gate must be a floating tensor"),
    (dict(gate=torch.rand(29, dtype=torch.float32)), RuntimeError, "gate must have the same dtype as x"),
    (dict(w1=torch.randn(29, 13, dtype=torch.float32)), RuntimeError, "w1 must have the same dtype as x"),
    (dict(w2=torch.randn(29, 13, dtype=D64)), RuntimeError, r"w2 must be \[d, F\]"),
    (dict(w3=torch.randn(28, 13, dtype=D64)), RuntimeError, r"w3 must be \[F, d\]"),
    (dict(b1=torch.randn(28, dtype=D64)), RuntimeError, r"b1 must be \[F\]"),
    (dict(b2=torch.randn(12, dtype=D64)), RuntimeError, r"b2 must be \[d\]"),
    (dict(w1=torch.randn(29, 12, dtype=D64)), RuntimeError, r"w1 must be \[F, d\]"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**over)()


def test_bad_layout_activation_and_backend():
    x, p = make(4, w2t=False)
    with pytest.raises(RuntimeError, match=r"w2 must be \[F, d\] = \[29, 13\] with w2_transposed=True"):
        call(sparse_ops.gated_ffn, x, p, None, w2t=True)
    with pytest.raises(ValueError, match="activation must be one of"):
        call(sparse_ops.gated_ffn, x, p, None, activation="tanh")
    with pytest.raises(ValueError, match="backend must be one of"):
        call(sparse_ops.gated_ffn, x, p, None, backend="fast")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not usable here"):
        call(sparse_ops.gated_ffn, x, p, None, backend="cuda")


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([1, 4, 29]), r"idx must be the sorted columns .*; got 29 at position 2, outside \[0, F\) = \[0, 29\)"),
    (torch.tensor([-1, 4, 5]), r"idx must be the sorted columns .*; got -1 at position 0, outside \[0, F\)"),
    (torch.tensor([2, 9, 16]), r"idx must be the sorted columns .*or an index of a column that does not run"),
    (torch.tensor([9, 2, 17]), r"idx must be the sorted columns .*; got 2 after 9 at position 1"),
    (torch.tensor([1.0, 4.0, 5.0]), "idx must be int64"),
])
def test_backward_op_rejects_bad_idx(bad, match):
    # gated_ffn_backward is a public op: an idx that did not come from gated_ffn is refused
    # before anything is indexed with it (pre and row_mask have the matching K = 3 columns).
    x, p = make(4)
    m = torch.zeros(4, 29, dtype=torch.bool)
    m[:, [2, 9, 17]] = True
    m[0, 9] = False
    out, idx, pre, up, rm, rg = torch.ops.sparse_ops.gated_ffn(x, p["w1"], p["w2"], p["b1"], p["b2"], None, m,
                                                               None, "gelu", False, False)
    assert idx.tolist() == [2, 9, 17] and rm.shape == (4, 3) and rg.tolist() == [-1] * 4
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparse_ops.gated_ffn_backward(torch.ones_like(out), x, p["w1"], p["w2"], p["b1"], None, m,
                                                None, bad, pre, up, rm, rg, "gelu", False, False,
                                                [True, True, True])


def test_torch_backend_matches_cpp():
    x, p = make(6, w2t=True)
    m = masks(6, 29)["per_row"]
    torch.testing.assert_close(call(sparse_ops.gated_ffn, x, p, m, w2t=True, backend="torch"),
                               call(sparse_ops.gated_ffn, x, p, m, w2t=True, backend="cpp"))


@pytest.mark.parametrize("N", [1, 40])
def test_no_grad_fast_path_equals_graph_path(N):
    # With nothing to differentiate the wrapper skips the autograd layer: same result,
    # no graph; with an input requiring grad (grad mode on) the graph is recorded.
    x, p = make(N, grad=True, w2t=True)
    m = masks(N, 29)["bool"]
    ref = call(R.gated_ffn, x, p, m, w2t=True)
    with torch.no_grad():
        y = call(sparse_ops.gated_ffn, x, p, m, w2t=True)
    assert y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, ref.detach(), rtol=1e-10, atol=1e-10)
    y2 = call(sparse_ops.gated_ffn, x, p, m, w2t=True)
    assert y2.grad_fn is not None
    y2.sum().backward()
    assert x.grad is not None and p["w1"].grad is not None
    xd = x.detach()
    y3 = call(sparse_ops.gated_ffn, xd, {k: (v.detach() if v is not None else None) for k, v in p.items()},
              m, w2t=True)
    assert y3.grad_fn is None
    torch.testing.assert_close(y3, ref.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("N", [1, 4, 40])
def test_repeated_or_out_of_range_indices_are_refused_on_every_path(N):
    # N = 1, 4: the decode kernel's plan; 40: the GEMM path's. Repeats used to be deduplicated
    # on CPU; now K is always len(active), as on CUDA (where they are checked on the device).
    x, p = make(N, w2t=True)
    for bad, match in [(torch.tensor([7, 0, 7]), "active indices must be distinct"),
                       (torch.tensor([0, 29]), r"active indices must be in \[0, F\)"),
                       (torch.tensor([-3]), r"active indices must be in \[0, F\)")]:
        with pytest.raises(RuntimeError, match=match):
            call(sparse_ops.gated_ffn, x, p, bad, w2t=True)


# ----------------------------------------------------------------- the saved plan
def _op(x, p, active, gate=None, w2t=False, act="gelu"):
    return torch.ops.sparse_ops.gated_ffn(x, p["w1"], p["w2"], p["b1"], p["b2"], p["w3"], active, gate, act,
                                          w2t, False)


def _per_sample(B, T, F, keep, seed):
    """[B * T, F]: every token of a sample shares its sample's random mask."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, 1, F, generator=g) < keep).expand(B, T, F).reshape(B * T, F)


@pytest.mark.parametrize("N", [1, 4, 40])
def test_forward_returns_plan_shaped_by_input_shapes(N):
    x, p = make(N)
    g = torch.Generator().manual_seed(7)
    for active, gate, per_row in [(None, None, False), (torch.tensor([4, 1, 20]), None, False),
                                  (torch.rand(29, generator=g) > 0.5, None, False),
                                  (None, torch.rand(29, generator=g, dtype=D64), False),
                                  (torch.rand(N, 29, generator=g) > 0.5, None, True),
                                  (torch.tensor([4, 1, 20]), torch.rand(N, 29, generator=g, dtype=D64), True)]:
        out, idx, pre, up, rm, rg = _op(x, p, active, gate)
        K = idx.shape[0]
        assert idx.tolist() == sorted(idx.tolist())
        if active is not None and active.dtype == torch.int64 and gate is None:
            assert idx.tolist() == [1, 4, 20]
        assert pre.shape == (N, K)
        if per_row:
            eff = R.ffn_mask(active, 29, "cpu") & (gate != 0 if gate is not None else True)
            assert rm.dtype == torch.bool and torch.equal(rm, eff.expand(N, 29)[:, idx])
            assert rg.dtype == torch.int64 and rg.shape == (N,)
            if N >= 32 and active.dtype == torch.int64:  # a gate without zeros: every row alike, one group
                assert torch.equal(rg, torch.zeros(N, dtype=torch.int64))
            else:  # too few rows to group, or (random rows) too many distinct masks
                assert torch.equal(rg, torch.full((N,), -1))
        else:
            assert rm.dtype == torch.bool and rm.shape == (0,)
            assert rg.dtype == torch.int64 and rg.shape == (0,)


def test_forward_groups_rows_and_saves_the_groups():
    B, T, F = 4, 16, 29
    x, p = make(B * T, F=F)
    m = _per_sample(B, T, F, 0.5, seed=8)
    out, idx, pre, up, rm, rg = _op(x, p, m)
    assert torch.equal(idx, torch.nonzero(m.any(0)).flatten())
    assert torch.equal(rm, m[:, idx])
    # one group per sample (the samples' masks differ), in order of first appearance
    assert torch.equal(rg, torch.arange(B).repeat_interleave(T))
    torch.testing.assert_close(out, R.gated_ffn(x, p["w1"], p["w2"], m, b1=p["b1"], b2=p["b2"]))


@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("w2t", [False, True])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_parallel_groups_interleaved_rows_and_an_all_off_sample(dtype, w2t, glu, bias):
    """The CPU forward runs row groups side by side (csrc/cpu/ffn_cpu.cpp forward_groups): rows
    laid out token-major (a sample's rows are not contiguous), one sample with every column off
    (a group with no column), a per-row gate: out equals the reference, and pre / up hold each
    row's values at its columns of idx and zeros elsewhere, as the union path saves them."""
    B, T, F, d = 5, 16, 29, 13
    g = torch.Generator().manual_seed(12)
    sm = torch.rand(B, F, generator=g) < 0.5
    sm[2] = False
    m = sm[None].expand(T, B, F).reshape(T * B, F)  # row t * B + b: token t of sample b
    gate = (torch.rand(B, F, generator=g, dtype=D64) + 0.5).to(dtype)[None].expand(T, B, F).reshape(T * B, F)
    x, p = make(T * B, d=d, F=F, w2t=w2t, glu=glu, bias=bias, dtype=dtype)
    out, idx, pre, up, rm, rg = _op(x, p, m, gate, w2t)
    assert rg.min() >= 0 and rg.unique().numel() == B  # one group per sample
    exp = R.gated_ffn(x, p["w1"], p["w2"], m, b1=p["b1"], b2=p["b2"], w3=p["w3"], gate=gate, w2_transposed=w2t)
    rtol, atol = tol(dtype)
    torch.testing.assert_close(out, exp, rtol=rtol, atol=atol)
    assert torch.equal(rm, m[:, idx])
    pre_full = x @ p["w1"][idx].t() + (p["b1"][idx] if bias else 0)
    torch.testing.assert_close(pre, torch.where(rm, pre_full, 0), rtol=rtol, atol=atol)
    if glu:
        torch.testing.assert_close(up, torch.where(rm, x @ p["w3"][idx].t(), 0), rtol=rtol, atol=atol)


def _grads_vs_reference(N, active, gate, w2t, glu, dense_grad=False, seed=0):
    x, p = make(N, F=29, w2t=w2t, glu=glu, grad=True, seed=seed)
    if gate is not None:
        gate = gate.clone().requires_grad_()
    names = [k for k in ("w1", "w2", "w3", "b1", "b2") if p[k] is not None]
    params = [x] + [p[k] for k in names] + ([gate] if gate is not None else [])
    gy = torch.randn(N, 13, generator=torch.Generator().manual_seed(seed + 1), dtype=D64)
    got = torch.autograd.grad(call(sparse_ops.gated_ffn, x, p, active, gate, w2t=w2t, dense_grad=dense_grad),
                              params, gy)
    exp = torch.autograd.grad(call(R.gated_ffn, x, p, active, gate, w2t=w2t, dense_grad=dense_grad), params, gy)
    for name, a, b in zip(["x"] + names + ["gate"], got, exp):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
        assert a.is_contiguous(), name


@pytest.mark.parametrize("w2t", [False, True])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("form", ["mask", "gate", "mask_and_gate", "dense_grad"])
@pytest.mark.parametrize("union", ["every column", "columns off"])
def test_grads_in_the_grouping_regime(w2t, glu, form, union):
    # 64 rows, 4 distinct masks (per sample): the CPU forward groups rows (row_group holds the
    # group ids) and the backward runs on those groups. The groups' down-projection rows come
    # from w2 itself (w2t), from w2's transposed copy (the batch's masks cover every column) or
    # from its copy at idx (columns 3 and 20 run in no sample).
    B, T, F = 4, 16, 29
    N = B * T
    g = torch.Generator().manual_seed(10)
    sm = torch.rand(B, 1, F, generator=g) < 0.5
    sm[0] = True  # sample 0 runs every column
    sample_gate = torch.rand(B, 1, F, generator=g, dtype=D64) + 0.1
    if union == "columns off":
        sm[:, :, [3, 20]] = False
        sample_gate[:, :, [3, 20]] = 0
    m = sm.expand(B, T, F).reshape(N, F)
    gate_on = torch.rand(B, 1, F, generator=g) > 0.4
    gate_on[0] = True  # sample 0's gate is nonzero wherever its mask runs
    sample_gate = (sample_gate * gate_on).expand(B, T, F).reshape(N, F).contiguous()
    active, gate = {"mask": (m, None), "gate": (None, sample_gate), "mask_and_gate": (m, sample_gate),
                    "dense_grad": (m, sample_gate)}[form]
    x, p = make(N, F=F, w2t=w2t, glu=glu)
    _, idx, _, _, _, rg = _op(x, p, active, gate, w2t)
    assert rg.min() >= 0 and rg.unique().numel() > 1  # the grouping path ran
    assert idx.numel() == (F if union == "every column" else F - 2)
    _grads_vs_reference(N, active, gate, w2t, glu, dense_grad=form == "dense_grad")


@pytest.mark.parametrize("w2t", [False, True])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("form", ["mask", "gate", "mask_and_gate", "shared_gate"])
def test_grads_in_the_union_regime(w2t, glu, form):
    # 64 rows with random masks (more than N / 16 distinct): the union path with a per-row where().
    N, F = 64, 29
    g = torch.Generator().manual_seed(11)
    m = torch.rand(N, F, generator=g) > 0.5
    m[:, 3] = False  # a column no row runs
    row_gate = torch.rand(N, F, generator=g, dtype=D64) * (torch.rand(N, F, generator=g) > 0.4)
    active, gate = {"mask": (m, None), "gate": (None, row_gate), "mask_and_gate": (m, row_gate),
                    "shared_gate": (m, torch.rand(F, generator=g, dtype=D64))}[form]
    x, p = make(N, F=F, w2t=w2t, glu=glu)
    rg = _op(x, p, active, gate, w2t)[5]
    assert torch.equal(rg, torch.full((N,), -1))  # the union path ran
    _grads_vs_reference(N, active, gate, w2t, glu)


@pytest.mark.parametrize("N", [4, 64])
def test_backward_reads_the_saved_plan_not_active(N):
    # The backward runs on idx / row_mask / row_group (it does not re-derive the plan from active),
    # and refuses an `active` that does not match them (the op is public: wrong gradients otherwise).
    B = 4
    m = _per_sample(B, N // B, 29, 0.5, seed=12)
    x, p = make(N, w2t=True, glu=True)
    out, idx, pre, up, rm, rg = _op(x, p, m, None, True)
    gy = torch.randn(N, 13, generator=torch.Generator().manual_seed(13), dtype=D64)

    def bwd(active):
        return torch.ops.sparse_ops.gated_ffn_backward(gy, x, p["w1"], p["w2"], p["b1"], p["w3"], active, None,
                                                       idx, pre, up, rm, rg, "gelu", True, False,
                                                       [True, True, False])
    assert all(t.numel() for t in bwd(m)[:3])
    with pytest.raises(RuntimeError, match="idx must be the sorted columns that run"):
        bwd(torch.zeros_like(m))


def _raw_backward(N=40, per_row=True, **over):
    x, p = make(N)
    g = torch.Generator().manual_seed(14)
    active = torch.rand(N, 29, generator=g) > 0.5 if per_row else torch.rand(29, generator=g) > 0.5
    out, idx, pre, up, rm, rg = _op(x, p, active)
    args = dict(grad_out=torch.ones_like(out), x=x, w1=p["w1"], w2=p["w2"], b1=p["b1"], w3=None, active=active,
                gate=None, idx=idx, pre=pre, up=up, row_mask=rm, row_group=rg)
    args.update({k: (v(args) if callable(v) else v) for k, v in over.items()})
    return lambda: torch.ops.sparse_ops.gated_ffn_backward(*args.values(), "gelu", False, False,
                                                           [True, True, True])


@pytest.mark.parametrize("per_row,over,match", [
    (True, dict(row_mask=torch.zeros(0, dtype=torch.bool)),
     r"row_mask must be bool \[N, K\] = \[40, \d+\] for a per-row active mask or gate"),
    (True, dict(row_mask=lambda a: a["row_mask"][:, 1:]), r"row_mask must be bool \[N, K\]"),
    (True, dict(row_mask=lambda a: a["row_mask"].double()), r"row_mask must be bool \[N, K\]"),
    (True, dict(row_group=torch.full((39,), -1)), r"row_group must be int64 \[N\] = \[40\]"),
    (True, dict(row_group=torch.zeros(0, dtype=torch.int64)), r"row_group must be int64 \[N\] = \[40\]"),
    (True, dict(row_group=torch.full((40,), -1, dtype=torch.int32)), r"row_group must be int64 \[N\]"),
    (False, dict(row_mask=lambda a: torch.ones(40, a["idx"].shape[0], dtype=torch.bool)),
     r"row_mask must be bool \[0\] without a per-row active mask or gate"),
    (False, dict(row_group=torch.full((40,), -1)), r"row_group must be int64 \[0\] without a per-row"),
    (True, dict(pre=lambda a: a["pre"][:, 1:]), r"pre must be \[N, K\]"),
    (True, dict(grad_out=lambda a: a["grad_out"][1:]), r"grad_out must be \[N, d\] = \[40, 13\]"),
    # values of row_group (CPU): group ids in [0, N), or -1 for every row; rows of a group share a mask
    (True, dict(row_group=torch.full((40,), 40)), r"row_group must be -1 for every row or a group id in \[0, N\)"),
    (True, dict(row_group=torch.tensor([-1] * 39 + [0])), r"row_group must be -1 for every row .* at row 39"),
    (True, dict(row_group=torch.tensor(list(range(39)) + [-1])), r"row_group must be -1 for every row .* at row 39"),
    (True, dict(row_group=torch.zeros(40, dtype=torch.int64)), r"share row_group 0 but not their row_mask"),
])
def test_backward_op_rejects_a_bad_plan(per_row, over, match):
    with pytest.raises(RuntimeError, match=match):
        _raw_backward(per_row=per_row, **over)()


@pytest.mark.parametrize("N", [4, 40])
@pytest.mark.parametrize("mask", ["none", "idx", "bool", "per_row"])
@pytest.mark.parametrize("glu", [False, True])
def test_strided_weights(N, mask, glu):
    # w2 = lin.weight.t() with w2_transposed=True (a strided [F, d] view of nn.Linear(F, d)'s
    # weight) and a strided w1 / w3: results and gradients equal the reference, and the
    # gradients are contiguous (on CUDA a strided zeros_like(w2) made the scatter refuse).
    F, d = 29, 13
    torch.manual_seed(15)
    lin = torch.nn.Linear(F, d, dtype=D64)
    w1 = torch.randn(d, F, dtype=D64).t().requires_grad_()      # [F, d], strides (1, F)
    w3 = torch.randn(d, F, dtype=D64).t().requires_grad_() if glu else None
    x = torch.randn(N, d, dtype=D64, requires_grad=True)
    b1 = torch.randn(F, dtype=D64, requires_grad=True)
    w2 = lin.weight.t()
    assert not w1.is_contiguous() and not w2.is_contiguous()
    m = masks(N, F)[mask]
    params = [x, w1, lin.weight, b1, lin.bias] + ([w3] if glu else [])
    kw = dict(b1=b1, b2=lin.bias, w3=w3, w2_transposed=True)
    out = sparse_ops.gated_ffn(x, w1, w2, m, **kw)
    ref = R.gated_ffn(x, w1, w2, m, **kw)
    torch.testing.assert_close(out, ref)
    gy = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, gy), torch.autograd.grad(ref, params, gy)):
        torch.testing.assert_close(a, b)
    # the op's own gradients (before autograd transposes dw2 back to lin.weight's layout)
    res = torch.ops.sparse_ops.gated_ffn(x, w1, w2, b1, lin.bias, w3, m, None, "gelu", True, False)
    grads = torch.ops.sparse_ops.gated_ffn_backward(gy, x, w1, w2, b1, w3, m, None, *res[1:], "gelu", True, False,
                                                    [True, True, False])
    for gr in grads[:6]:
        assert gr.numel() == 0 or gr.is_contiguous()
    assert grads[2].shape == (F, d)


@pytest.mark.parametrize("N", [3, 37])
@pytest.mark.parametrize("case", ["idx", "idx_glu_w2t", "per_row", "per_row_gate", "idx_row_gate",
                                  "strided_w2t"])
def test_opcheck_plan_outputs(N, case):
    g = torch.Generator().manual_seed(16)
    x, p = make(N, w2t=case in ("idx_glu_w2t", "strided_w2t"), glu=case == "idx_glu_w2t", grad=True)
    active = {"idx": torch.tensor([9, 0, 5]), "idx_glu_w2t": torch.tensor([28, 3]),
              "per_row": torch.rand(N, 29, generator=g) > 0.5, "per_row_gate": torch.rand(N, 29, generator=g) > 0.3,
              "idx_row_gate": torch.tensor([1, 7, 20, 4]), "strided_w2t": torch.rand(29, generator=g) > 0.5}[case]
    gate = None
    if case in ("per_row_gate", "idx_row_gate"):
        gate = (torch.rand(N, 29, generator=g, dtype=D64) * (torch.rand(N, 29, generator=g) > 0.3)).requires_grad_()
    w2 = p["w2"]
    if case == "strided_w2t":
        w2 = torch.randn(13, 29, dtype=D64).t().requires_grad_()
    args = (x, p["w1"], w2, p["b1"], p["b2"], p["w3"], active, gate, "gelu", case in ("idx_glu_w2t", "strided_w2t"),
            False)
    torch.library.opcheck(torch.ops.sparse_ops.gated_ffn.default, args)


# ----------------------------------------------------------------- save=False (no backward)
def _save_cases(N):
    g = torch.Generator().manual_seed(17)
    B = max(1, N // 16)
    per_sample = (torch.rand(B, 1, 29, generator=g) < 0.5).expand(B, N // B, 29).reshape(-1, 29)
    return {"none": (None, None), "idx": (torch.tensor([9, 0, 5]), None),
            "per_row": (torch.rand(N, 29, generator=g) > 0.5, None),
            "per_sample": (per_sample, None),
            "per_sample_gate": (None, per_sample * (torch.rand(N, 29, generator=g, dtype=D64) + 0.5))}


@pytest.mark.parametrize("N", [1, 3, 64])
@pytest.mark.parametrize("case", ["none", "idx", "per_row", "per_sample", "per_sample_gate"])
@pytest.mark.parametrize("glu_w2t", [False, True])
def test_save_false_keeps_out_and_plan_and_drops_pre_up(N, case, glu_w2t):
    """save=False (a call autograd does not see): out, idx, row_mask and row_group as with save=True,
    pre and up empty (decode, union, grouped and shared paths)."""
    x, p = make(N, w2t=glu_w2t, glu=glu_w2t)
    active, gate = _save_cases(N)[case]
    args = (x, p["w1"], p["w2"], p["b1"], p["b2"], p["w3"], active, gate, "gelu", glu_w2t, False)
    full = torch.ops.sparse_ops.gated_ffn(*args)
    lean = torch.ops.sparse_ops.gated_ffn(*args, False)
    assert torch.equal(lean[0], full[0])
    for i in (1, 4, 5):
        assert torch.equal(lean[i], full[i])
    assert lean[2].shape == (0,) and lean[3].shape == (0,)
    if case == "per_sample" and N == 64:
        assert full[5].min() >= 0  # the grouped path ran


@pytest.mark.parametrize("case", ["none", "per_row", "per_sample_gate"])
def test_opcheck_save_false(case):
    x, p = make(64, glu=True)
    active, gate = _save_cases(64)[case]
    args = (x, p["w1"], p["w2"], p["b1"], p["b2"], p["w3"], active, gate, "gelu", False, False, False)
    torch.library.opcheck(torch.ops.sparse_ops.gated_ffn.default, args)


def test_save_false_refuses_a_differentiated_call():
    x, p = make(8, grad=True)
    with pytest.raises(RuntimeError, match="save=False"):
        torch.ops.sparse_ops.gated_ffn(x, p["w1"], p["w2"], p["b1"], p["b2"], None, None, None, "gelu", False, False,
                                       False)


@pytest.mark.parametrize("grad", [False, True])
def test_wrapper_saves_only_when_differentiated(grad, monkeypatch):
    """sparse_ops.gated_ffn passes save=True exactly when autograd records the call."""
    from sparse_ops.ops import registry
    seen = []
    run = registry.run
    monkeypatch.setattr(registry, "run", lambda *a, **kw: seen.append((a[-1], kw["grad"])) or run(*a, **kw))
    x, p = make(40, grad=True)
    with torch.set_grad_enabled(grad):
        call(sparse_ops.gated_ffn, x, p)
    with torch.inference_mode():
        call(sparse_ops.gated_ffn, x.detach(), {k: v if v is None else v.detach() for k, v in p.items()})
    assert seen == [(grad, grad), (False, False)]


def test_fake_plan_shapes_static_k_for_indices():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    x, p = make(6)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fx, w1, w2 = (mode.from_tensor(t) for t in (x, p["w1"], p["w2"]))

        def run(active, gate=None):
            return torch.ops.sparse_ops.gated_ffn(fx, w1, w2, None, None, None, active, gate, "gelu", False, False)
        out, idx, pre, up, rm, rg = run(mode.from_tensor(torch.tensor([3, 1, 8])))
        assert idx.shape == (3,) and isinstance(idx.shape[0], int) and pre.shape == (6, 3)
        assert rm.shape == (0,) and rm.dtype == torch.bool and rg.shape == (0,) and rg.dtype == torch.int64
        out, idx, pre, up, rm, rg = run(mode.from_tensor(torch.rand(6, 29) > 0.5))
        assert not isinstance(idx.shape[0], int)  # depends on the mask's values
        assert rm.shape == (6, idx.shape[0]) and rm.dtype == torch.bool and rg.shape == (6,)
        out, idx, pre, up, rm, rg = run(None, mode.from_tensor(torch.rand(6, 29, dtype=D64)))
        assert rm.shape == (6, idx.shape[0]) and rg.shape == (6,)
        out, idx, pre, up, rm, rg = run(None)
        assert idx.shape == (29,) and rm.shape == (0,) and rg.shape == (0,)


@pytest.mark.parametrize("N", [1, 4, 40])
@pytest.mark.parametrize("fill", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_per_row_masks_all_off_or_all_on(N, fill, gated):
    # Every row alike: no column runs (K = 0), or all of them (K = F); at N = 40 the CPU forward
    # takes the grouping path with one group.
    m = torch.full((N, 29), fill, dtype=torch.bool)
    gate = torch.rand(N, 29, generator=torch.Generator().manual_seed(17), dtype=D64) + 0.1 if gated else None
    x, p = make(N, w2t=True, glu=True)
    out, idx, pre, up, rm, rg = _op(x, p, m, gate, True)
    assert idx.shape == (29 if fill else 0,) and rm.shape == (N, idx.shape[0]) and rg.shape == (N,)
    assert torch.equal(rg, torch.full((N,), 0 if N >= 32 else -1))
    _grads_vs_reference(N, m, gate, True, True)
