"""Property-based tests (hypothesis): every public op against its plain-PyTorch reference
(sparse_ops/reference.py) over random shapes, masks, gates, dtypes and layouts.

- gated_ffn: N = 1..20 rows of a flat x (the decode path N <= 16 and the gathered path), or x
  [B, T, d] with up to 40 rows (per-sample masks there take the CPU row-grouping path); d = 1..40,
  F = 1..48, every activation, with / without b1, b2, w3 (GLU), active None / bool [F] / int64
  indices (unsorted, distinct, possibly empty) / per-row bool (all on, all off, single unit
  included), gate None / [F] / per row (exact zeros included), w2_transposed both ways, float32
  and float64, strided (transposed-view) weights and x. float64 examples also compare the
  gradients of x, the weights, the biases and the gate with the reference's (straight-through: a
  unit a zero gate skipped gets gate gradient 0 unless dense_grad=True); float32 outputs are
  compared with the reference evaluated in float64 on the same values.
- masked_head_attention: B = 1..3, H = 1..4, Tq, Tk = 1..9 (is_causal only where Tq >= Tk, as the
  op requires), D = 1..16, head_mask bool / float gates with zeros, [B, H] or [H], attn_mask None /
  bool / additive float (with -inf entries) in broadcast shapes, q / k / v in the [B, T, H, D]
  memory layout, a scale; output and q / k / v / gate gradients. Fully masked query rows: zeros,
  as the reference gives (compared exactly by assert_close, which treats NaN as a mismatch).
- gather_rows / scatter_rows (with and without a gate; -1 padding rows; float32, float64,
  bfloat16; strided x and src) and skip_layer (per sample and per token, with a token-mixing
  layer that reads the pad mask, gates with zeros, dense_grad, HF tuple outputs, an argument that
  travels with the rows), values and gradients (float64 for the row ops, both dtypes for
  skip_layer). skip_layer has no function in reference.py: ref_skip_layer below writes its
  contract (docstring, tests/test_layers.py) densely with the layer run per sample.

Backends: cpp and torch for every property (backend="torch" runs the reference itself behind the
op's wrapper: those tests check the wrapper's reshaping of x, masks and gates). Triton runs only
through the interpreter on a CPU-only machine (~3000x slower than eager), so each Triton test
gets one or two examples with tiny shapes and float64 (masked_head_attention: float32 too); on a
GPU machine they run there, as the other Triton tests do.

Reproducible: each test runs hypothesis with a fixed seed of its own (derived from the test's
parameters, so the tests of one property draw different examples), and no example database is
used: every run of a checkout, here and in CI, draws the same examples. (Hypothesis also mixes
in integer constants it finds in the source of the local modules imported, so editing the code
can change which examples a seed gives.) Tensor values come from a torch.Generator seeded by a
drawn integer, so data generation is cheap and a failing example prints everything needed to
rebuild it.
"""
import os
import zlib

import pytest
import torch

pytest.importorskip("hypothesis")  # ./run installs it; a bare GPU machine may not have it
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from torch import nn

import sparse_ops
from sparse_ops import activations as _acts
from sparse_ops import backend as _backend
from sparse_ops import reference as R
from sparse_ops.ops.layers import gather_rows, scatter_rows

D64 = torch.float64
F32 = torch.float32
BACKENDS = ["cpp", "torch", "triton"]
# Triton cases run on the GPU where one is visible (tests/conftest.py then leaves the interpreter
# off), else in the interpreter on CPU tensors.
TRITON_DEV = "cuda" if (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1") else "cpu"

# derandomize=True would give every test of a property the same draws (it seeds from the
# function, which is the same inner `prop` for all of them): a fixed seed per test instead.
COMMON = dict(deadline=None, database=None, print_blob=False, suppress_health_check=[HealthCheck.too_slow])
# Examples per test and backend. Each property is split by pytest over its main categorical
# axis (the mask / gate form), so every form gets examples whatever hypothesis draws for the
# rest. The whole file runs in ~15 s on 2 cores (90 tests, 972 examples).
EXAMPLES = {
    "gated_ffn": {"cpp": 20, "torch": 6, "triton": 1},              # x 11 active forms
    "masked_head_attention": {"cpp": 25, "torch": 8, "triton": 1},  # x 8 head_mask forms
    "rows": {"cpp": 40, "torch": 15, "triton": 2},                  # x 3 gate forms
    "skip_layer": {"cpp": 20, "torch": 8, "triton": 1},             # x 8 modes
}


def _device(backend):
    return TRITON_DEV if backend == "triton" else "cpu"


def _need(backend, op):
    if backend == "triton":
        pytest.importorskip("triton")
    ok, why = _backend.usable(backend, op, _device(backend))
    if not ok:
        pytest.skip(f"backend {backend!r} is not usable for {op} here: {why}")


def _run_property(family, backend, kind, strategy, check):
    """Run check(case, backend) over EXAMPLES[family][backend] of `strategy`'s examples, with a
    fixed seed of this test's own (family, backend, kind)."""
    @seed(zlib.crc32(f"{family}/{backend}/{kind}".encode()))
    @settings(max_examples=EXAMPLES[family][backend], **COMMON)
    @given(case=strategy)
    def prop(case):
        check(case, backend)
    prop()


def _gen(s):
    return torch.Generator().manual_seed(s)


def _randn(g, shape, dtype, device="cpu", strided=False):
    """randn values (drawn in float64 on the CPU, then cast and moved); strided: the same values
    as a non-contiguous view (the transpose of a contiguous tensor of the reversed last two dims)."""
    shape = tuple(shape)
    if strided and len(shape) >= 2:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g, dtype=D64)
        return t.to(dtype).to(device).transpose(-1, -2)
    return torch.randn(*shape, generator=g, dtype=D64).to(dtype).to(device)


def _leaf(t, grad):
    return t.detach().requires_grad_(grad) if grad else t


def _zero_some(g, t, frac):
    """t with a fraction `frac` of its entries set to exactly 0."""
    if frac <= 0:
        return t
    keep = torch.rand(t.shape, generator=g) >= frac
    return t * keep.to(t.dtype)


# ----------------------------------------------------------------- gated_ffn
ACTIVE_KINDS = ["none", "bool", "idx", "idx_empty", "single", "all_on", "all_off", "per_row", "per_row_all_on",
                "per_row_all_off", "per_sample"]
GATE_KINDS = ["none", "shared", "per_row", "per_sample", "scalar"]


@st.composite
def ffn_cases(draw, active, tiny=False):
    lead = draw(st.sampled_from(["flat", "bt"]))
    if lead == "flat":
        shape = (draw(st.integers(1, 6 if tiny else 20)),)
    else:
        # up to 40 rows: with per-sample masks and >= 32 rows the CPU forward groups rows
        shape = (draw(st.integers(1, 2 if tiny else 4)), draw(st.integers(1, 3 if tiny else 10)))
    return dict(
        lead=shape,
        d=draw(st.integers(1, 6 if tiny else 40)),
        F=draw(st.integers(1, 8 if tiny else 48)),
        activation=draw(st.sampled_from(_acts.NAMES)),
        b1=draw(st.booleans()), b2=draw(st.booleans()), glu=draw(st.booleans()),
        w2t=draw(st.booleans()),
        active=active,
        p_on=draw(st.sampled_from([0.2, 0.5, 0.8])),
        gate=draw(st.sampled_from(GATE_KINDS)),
        gate_zeros=draw(st.sampled_from([0.0, 0.4, 1.0])),
        dense_grad=draw(st.booleans()),
        dtype=D64 if tiny else draw(st.sampled_from([F32, D64])),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def _ffn_active(c, g, N, F_):
    kind, lead, p = c["active"], c["lead"], c["p_on"]
    if kind == "none":
        return None
    if kind == "bool":
        return torch.rand(F_, generator=g) < p
    if kind == "idx":  # distinct, unsorted
        perm = torch.randperm(F_, generator=g)
        return perm[:int(torch.randint(1, F_ + 1, (1,), generator=g))]
    if kind == "idx_empty":
        return torch.zeros(0, dtype=torch.int64)
    if kind == "single":
        return torch.randint(0, F_, (1,), generator=g)
    if kind == "all_on":
        return torch.ones(F_, dtype=torch.bool)
    if kind == "all_off":
        return torch.zeros(F_, dtype=torch.bool)
    if kind == "per_row":
        return torch.rand(*lead, F_, generator=g) < p
    if kind == "per_row_all_on":
        return torch.ones(*lead, F_, dtype=torch.bool)
    if kind == "per_row_all_off":
        return torch.zeros(*lead, F_, dtype=torch.bool)
    if kind == "per_sample":  # [B, 1, F] broadcast over the tokens ([1, F] for flat x)
        return torch.rand(*lead[:-1], 1, F_, generator=g) < p
    raise AssertionError(kind)


def _ffn_gate(c, g, F_, dtype):
    kind, lead = c["gate"], c["lead"]
    if kind == "none":
        return None
    shape = {"shared": (F_,), "per_row": (*lead, F_), "per_sample": (*lead[:-1], 1, F_), "scalar": (1,)}[kind]
    gate = torch.randn(*shape, generator=g, dtype=D64)
    return _zero_some(g, gate, c["gate_zeros"]).to(dtype)


def _ffn_inputs(c, device="cpu", grad=False):
    g = _gen(c["seed"])
    lead, d, F_, dtype, strided = c["lead"], c["d"], c["F"], c["dtype"], c["strided"]
    N = 1
    for s in lead:
        N *= s

    def w(*shape):
        return _leaf(_randn(g, shape, dtype, device, strided), grad)

    x = w(*lead, d)
    p = dict(w1=w(F_, d), w2=w(F_, d) if c["w2t"] else w(d, F_), w3=w(F_, d) if c["glu"] else None,
             b1=w(F_) if c["b1"] else None, b2=w(d) if c["b2"] else None)
    active = _ffn_active(c, g, N, F_)
    gate = _ffn_gate(c, g, F_, dtype)
    if active is not None:
        active = active.to(device)
    if gate is not None:
        gate = _leaf(gate.to(device), grad)
    gy = torch.randn(*lead, d, generator=g, dtype=D64).to(dtype).to(device)
    return x, p, active, gate, gy


def _ffn_call(fn, x, p, active, gate, c, **kw):
    return fn(x, p["w1"], p["w2"], active, b1=p["b1"], b2=p["b2"], w3=p["w3"], gate=gate,
              activation=c["activation"], w2_transposed=c["w2t"], dense_grad=c["dense_grad"], **kw)


def _f64(t):
    return t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def check_gated_ffn(c, backend):
    grad = c["dtype"] == D64
    x, p, active, gate, gy = _ffn_inputs(c, _device(backend), grad=grad)
    out = _ffn_call(sparse_ops.gated_ffn, x, p, active, gate, c, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype
    if c["dtype"] == D64:
        ref = _ffn_call(R.gated_ffn, x, p, active, gate, c)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    else:
        # float32: against the reference evaluated in float64 on the same values
        ref = _ffn_call(R.gated_ffn, _f64(x), {k: _f64(v) for k, v in p.items()}, active, _f64(gate), c)
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * scale)
        return
    names = ["x"] + [k for k in ("w1", "w2", "w3", "b1", "b2") if p[k] is not None] + \
        (["gate"] if gate is not None else [])
    ins = [x] + [p[k] for k in names[1:] if k != "gate"] + ([gate] if gate is not None else [])
    got = torch.autograd.grad(out, ins, gy)
    exp = torch.autograd.grad(ref, ins, gy)
    for name, a, b in zip(names, got, exp):
        torch.testing.assert_close(a, b, msg=lambda m: f"d{name}: {m}")
    if gate is not None and not c["dense_grad"]:  # straight-through: zero gates get gradient 0
        assert torch.all(got[-1][gate.detach() == 0] == 0)


@pytest.mark.parametrize("active", ACTIVE_KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_ffn_matches_reference(backend, active):
    _need(backend, "gated_ffn")
    _run_property("gated_ffn", backend, active, ffn_cases(active, tiny=backend == "triton"), check_gated_ffn)


# ----------------------------------------------------------------- masked_head_attention
HEAD_MASK_KINDS = ["bool_BH", "bool_H", "float_BH", "float_H", "float_BH_nonzero", "all_on", "all_off", "single"]
ATTN_MASK_KINDS = ["none", "bool", "float", "float_inf"]
ATTN_MASK_SHAPES = ["BHQK", "B1QK", "QK", "B11K", "H1K", "111K"]


@st.composite
def mha_cases(draw, head_mask, tiny=False):
    Tq = draw(st.integers(1, 4 if tiny else 9))
    Tk = draw(st.integers(1, 4 if tiny else 9))
    return dict(
        B=draw(st.integers(1, 2 if tiny else 3)), H=draw(st.integers(1, 2 if tiny else 4)),
        Tq=Tq, Tk=Tk, D=draw(st.integers(1, 4 if tiny else 16)),
        is_causal=draw(st.booleans()) if Tq >= Tk else False,  # the op refuses is_causal with Tq < Tk
        head_mask=head_mask,
        attn_mask=draw(st.sampled_from(ATTN_MASK_KINDS)),
        am_shape=draw(st.sampled_from(ATTN_MASK_SHAPES)),
        p_keep=draw(st.sampled_from([0.3, 0.7, 1.0])),
        layouts=tuple(draw(st.sampled_from(["bhtd", "bthd"])) for _ in range(3)),
        scale=draw(st.sampled_from([None, 0.25, 1.7])),
        dense_grad=draw(st.booleans()),
        dtype=draw(st.sampled_from([F32, D64])),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def _head_mask(c, g):
    B, H, dtype = c["B"], c["H"], c["dtype"]
    kind = c["head_mask"]
    if kind == "bool_BH":
        return torch.rand(B, H, generator=g) < 0.5
    if kind == "bool_H":
        return torch.rand(H, generator=g) < 0.5
    if kind == "float_BH":
        return _zero_some(g, torch.rand(B, H, generator=g, dtype=D64) + 0.1, 0.5).to(dtype)
    if kind == "float_H":
        return _zero_some(g, torch.rand(H, generator=g, dtype=D64) + 0.1, 0.5).to(dtype)
    if kind == "float_BH_nonzero":
        return (torch.randn(B, H, generator=g, dtype=D64).abs() + 0.1).to(dtype)
    if kind == "all_on":
        return torch.ones(B, H, dtype=torch.bool)
    if kind == "all_off":
        return torch.zeros(B, H, dtype=torch.bool)
    if kind == "single":
        m = torch.zeros(B, H, dtype=torch.bool)
        m[int(torch.randint(0, B, (1,), generator=g)), int(torch.randint(0, H, (1,), generator=g))] = True
        return m
    raise AssertionError(kind)


def _attn_mask(c, g):
    kind = c["attn_mask"]
    if kind == "none":
        return None
    B, H, Tq, Tk = c["B"], c["H"], c["Tq"], c["Tk"]
    shape = {"BHQK": (B, H, Tq, Tk), "B1QK": (B, 1, Tq, Tk), "QK": (Tq, Tk), "B11K": (B, 1, 1, Tk),
             "H1K": (H, 1, Tk), "111K": (1, 1, 1, Tk)}[c["am_shape"]]
    keep = torch.rand(shape, generator=g) < c["p_keep"]  # rows may be fully masked
    if kind == "bool":
        return keep
    add = torch.randn(shape, generator=g, dtype=D64)
    if kind == "float_inf":
        add = add.masked_fill(~keep, float("-inf"))
    return add.to(c["dtype"])


def _qkv(c, g, device, grad):
    B, H, D, dtype = c["B"], c["H"], c["D"], c["dtype"]
    out = []
    for T, layout in zip((c["Tq"], c["Tk"], c["Tk"]), c["layouts"]):
        if layout == "bthd":  # a transpose(1, 2) view of a contiguous [B, T, H, D] tensor
            t = torch.randn(B, T, H, D, generator=g, dtype=D64).to(dtype).to(device).transpose(1, 2)
        else:
            t = torch.randn(B, H, T, D, generator=g, dtype=D64).to(dtype).to(device)
        out.append(_leaf(t, grad))
    return out


def check_masked_head_attention(c, backend):
    g = _gen(c["seed"])
    dev = _device(backend)
    dtype = c["dtype"]
    q, k, v = _qkv(c, g, dev, grad=True)
    hm = _head_mask(c, g).to(dev)
    am = _attn_mask(c, g)
    am = am.to(dev) if am is not None else None
    gated = hm.is_floating_point()
    h1, h2 = hm.clone().requires_grad_(gated), hm.clone().requires_grad_(gated)
    kw = dict(attn_mask=am, is_causal=c["is_causal"], scale=c["scale"], dense_grad=c["dense_grad"])
    out = sparse_ops.masked_head_attention(q, k, v, h1, backend=backend, **kw)
    ref = R.masked_head_attention(q, k, v, h2, **kw)
    tol = 1e-4 if dtype == F32 else 1e-9  # tests/test_heads.py check_close
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    B, H = c["B"], c["H"]
    off = ~((hm != 0) if gated else hm).expand(B, H)
    assert (out.detach()[off] == 0).all()  # pairs that do not run: exact zeros
    go = torch.randn(ref.shape, generator=g, dtype=D64).to(dtype).to(dev)
    ins1, ins2 = [q, k, v] + ([h1] if gated else []), [q, k, v] + ([h2] if gated else [])
    got = torch.autograd.grad(out, ins1, go)
    exp = torch.autograd.grad(ref, ins2, go)
    for name, a, b in zip(["q", "k", "v", "head_mask"], got, exp):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")
    for name, a in zip("qkv", got[:3]):
        assert (a[off] == 0).all(), f"d{name} of a pair that does not run"
    if gated and not c["dense_grad"]:  # straight-through: zero gates get gradient 0
        assert torch.all(got[3][hm == 0] == 0)


@pytest.mark.parametrize("head_mask", HEAD_MASK_KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_head_attention_matches_reference(backend, head_mask):
    _need(backend, "masked_head_attention")
    _run_property("masked_head_attention", backend, head_mask, mha_cases(head_mask, tiny=backend == "triton"),
                  check_masked_head_attention)


# ----------------------------------------------------------------- gather_rows / scatter_rows
@st.composite
def rows_cases(draw, gate, tiny=False):
    R_ = draw(st.integers(1, 4 if tiny else 10))
    return dict(
        R=R_,
        row=tuple(draw(st.lists(st.integers(1, 3 if tiny else 4), min_size=0, max_size=2))),
        K_real=draw(st.integers(0, R_)),
        K_pad=draw(st.integers(0, 3)),
        gate=gate != "none",
        gate_zeros=0.5 if gate == "gate_zeros" else 0.0,
        dtype=D64 if tiny else draw(st.sampled_from([F32, D64, torch.bfloat16])),
        strided=draw(st.booleans()),  # x and src non-contiguous (where a row has a dimension)
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def check_rows(c, backend):
    g = _gen(c["seed"])
    dev = _device(backend)
    dtype = c["dtype"]
    R_, row = c["R"], c["row"]
    grad = dtype == D64
    # idx: K_real distinct rows in random order, K_pad paddings (-1) at random positions
    real = torch.randperm(R_, generator=g)[:c["K_real"]]
    idx = torch.cat([real, torch.full((c["K_pad"],), -1, dtype=torch.int64)])
    idx = idx[torch.randperm(idx.numel(), generator=g)].to(dev)
    K = idx.numel()
    x = _leaf(_randn(g, (R_, *row), dtype, dev, c["strided"]), grad)
    src = _leaf(_randn(g, (K, *row), dtype, dev, c["strided"]), grad)
    gate = None
    if c["gate"]:
        gate = _zero_some(g, torch.rand(K, generator=g, dtype=D64), c["gate_zeros"])
        gate = _leaf(gate.to(dtype).to(dev), grad)

    gat = gather_rows(x, idx, backend)
    assert torch.equal(gat, R.gather_rows(x, idx))  # a copy: exact
    sc = scatter_rows(x, idx, src, gate, backend)
    ref = R.scatter_rows(x, idx, src, gate)
    if gate is None:
        assert torch.equal(sc, ref)
    elif dtype == torch.bfloat16:
        # the kernels blend in float32 and round once: against the reference in float32 on the
        # same values, with tests/test_layers.py's tolerance
        ref32 = R.scatter_rows(x.float(), idx, src.float(), gate.float())
        torch.testing.assert_close(sc.float(), ref32, rtol=1e-2, atol=1e-2)
    else:
        tol = 1e-6 if dtype == F32 else 1e-12
        torch.testing.assert_close(sc, ref, rtol=tol, atol=tol)
    if not grad:
        return
    gy = torch.randn(gat.shape, generator=g, dtype=D64).to(dev)
    torch.testing.assert_close(torch.autograd.grad(gat, x, gy)[0],
                               torch.autograd.grad(R.gather_rows(x, idx), x, gy)[0], rtol=1e-12, atol=1e-12)
    gy = torch.randn(x.shape, generator=g, dtype=D64).to(dev)
    ins = [x, src] + ([gate] if gate is not None else [])
    got, exp = torch.autograd.grad(sc, ins, gy), torch.autograd.grad(ref, ins, gy)
    for name, a, b in zip(["x", "src", "gate"], got, exp):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("gate", ["none", "gate", "gate_zeros"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_match_reference(backend, gate):
    _need(backend, "gather_rows")
    _run_property("rows", backend, gate, rows_cases(gate, tiny=backend == "triton"), check_rows)


# ----------------------------------------------------------------- skip_layer
class Mixer(nn.Module):
    """A layer that mixes the tokens of a sample in order (each token adds a sum over the real
    tokens after it), so what it returns depends on which tokens it was given, in which order,
    and on masking the padding (a zero padding token adds tanh(1) unless `pad` masks it); it
    takes an optional per-token `offset` that travels with the rows, and may return a tuple (as
    HF layers do)."""

    def __init__(self, d, dtype, mix=True, as_tuple=False):
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=dtype)
        self.mix, self.as_tuple = mix, as_tuple

    def forward(self, x, offset=None, pad=None):
        y = self.lin(x)
        if self.mix and x.dim() >= 3:
            m = x.new_ones(x.shape[:2]) if pad is None else pad.to(x.dtype)
            t = torch.tanh(x + 1) * m.view(*m.shape, *([1] * (x.dim() - 2)))
            y = y + 0.5 * torch.flip(torch.cumsum(torch.flip(t, [1]), dim=1), [1])
        if offset is not None:
            y = y + offset
        y = torch.tanh(y)
        return (y, None) if self.as_tuple else y


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def ref_skip_layer(layer, x, keep, gate, offset, dense_grad):
    """skip_layer's contract, densely: per sample, y = where(run, x + gate * (layer(x) - x), x)
    (a layer that treats the samples of a batch independently); per token, each sample's running
    tokens, in order, form the sequence the layer sees (tests/test_layers.py ref_per_token).
    run = keep & (gate != 0); with dense_grad the rows a zero gate skipped are selected by keep
    alone (they add 0 * (layer(x) - x): the same values, and the gate's exact gradient)."""
    run = keep if gate is None else keep & (gate != 0)
    sel = keep if (dense_grad and gate is not None) else run
    if keep.dim() == 1:
        out = _first(layer(x, offset=offset))
        if gate is not None:
            out = x + gate.view(-1, *([1] * (x.dim() - 1))) * (out - x)
        return torch.where(sel.view(-1, *([1] * (x.dim() - 1))), out, x)
    rows = []
    for b in range(x.shape[0]):
        i = torch.nonzero(sel[b]).flatten()
        yb = x[b]
        if len(i):
            o = _first(layer(x[b][i][None], offset=None if offset is None else offset[b][i][None]))[0]
            if gate is not None:
                o = x[b][i] + gate[b][i].view(-1, *([1] * (x.dim() - 2))) * (o - x[b][i])
            yb = yb.index_copy(0, i, o)
        rows.append(yb)
    return torch.stack(rows)


@st.composite
def skip_cases(draw, per_token, gate_mode, tiny=False):
    gate = gate_mode != "none"
    dense_grad = gate_mode == "gate_zeros_dense"
    return dict(
        per_token=per_token,
        B=draw(st.integers(1, 3 if tiny else 6)), T=draw(st.integers(1, 3 if tiny else 6)),
        d=draw(st.integers(1, 3 if tiny else 8)),
        x3=draw(st.booleans()) if not per_token else True,  # per sample: x [B, T, d] or [B, d]
        keep=draw(st.sampled_from(["random", "all", "none", "single"])),
        p_keep=draw(st.sampled_from([0.3, 0.7])),
        gate=gate, gate_zeros=0.5 if gate_mode.startswith("gate_zeros") else 0.0,
        dense_grad=dense_grad,
        # Per token with dense_grad, the layer runs on the skipped tokens on their own in backward:
        # that is the exact gradient only for a layer that does not mix tokens.
        mix=draw(st.sampled_from([True, True, True, False])) if not (per_token and dense_grad) else False,
        as_tuple=draw(st.booleans()),
        offset=draw(st.booleans()),
        dtype=D64 if tiny else draw(st.sampled_from([F32, D64])),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def check_skip_layer(c, backend):
    g = _gen(c["seed"])
    dev = _device(backend)
    dtype = c["dtype"]
    B, T, d = c["B"], c["T"], c["d"]
    layer = Mixer(d, dtype, mix=c["mix"], as_tuple=c["as_tuple"])
    with torch.no_grad():  # weights from the example's generator (the global RNG is left alone)
        layer.lin.weight.copy_(torch.randn(d, d, generator=g, dtype=D64) / d ** 0.5)
        layer.lin.bias.copy_(torch.randn(d, generator=g, dtype=D64))
    layer = layer.to(dev)
    xs = (B, T, d) if c["x3"] else (B, d)
    kshape = (B, T) if c["per_token"] else (B,)
    x = _leaf(_randn(g, xs, dtype, dev), True)
    keep = {"random": lambda: torch.rand(kshape, generator=g) < c["p_keep"],
            "all": lambda: torch.ones(kshape, dtype=torch.bool),
            "none": lambda: torch.zeros(kshape, dtype=torch.bool),
            "single": lambda: torch.zeros(kshape, dtype=torch.bool).view(-1).index_fill(
                0, torch.randint(0, B * (T if c["per_token"] else 1), (1,), generator=g), True).view(kshape),
            }[c["keep"]]().to(dev)
    gate = None
    if c["gate"]:
        gate = _leaf(_zero_some(g, torch.rand(kshape, generator=g, dtype=D64) + 0.1, c["gate_zeros"])
                     .to(dtype).to(dev), True)
    offset = _randn(g, xs, dtype, dev) if c["offset"] else None
    kw = dict(offset=offset, travel=["offset"]) if offset is not None else {}
    pad = dict(pad_mask_kwarg="pad") if c["per_token"] else {}
    y = sparse_ops.skip_layer(layer, x, keep, gate=gate, dense_grad=c["dense_grad"], backend=backend, **pad, **kw)
    ref = ref_skip_layer(layer, x, keep, gate, offset, c["dense_grad"])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=1e-10, atol=1e-10)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, ref, **tol)
    gy = torch.randn(x.shape, generator=g, dtype=D64).to(dtype).to(dev)
    names = ["x"] + (["gate"] if gate is not None else []) + ["weight", "bias"]
    ins = [x] + ([gate] if gate is not None else []) + [layer.lin.weight, layer.lin.bias]
    got = torch.autograd.grad(y, ins, gy, allow_unused=True)
    exp = torch.autograd.grad(ref, ins, gy, allow_unused=True)
    for name, a, b in zip(names, got, exp):
        if name in ("weight", "bias"):  # zeros, not None, even when every row skips (for DDP)
            assert a is not None, f"d{name} is None"
        if a is None:  # a gate no row used is not in the graph (as in the reference)
            assert b is None or not b.any(), f"d{name}: None, the reference's is {b}"
            continue
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), **tol,
                                   msg=lambda m: f"d{name}: {m}")
    if gate is not None and not c["dense_grad"] and got[1] is not None:  # straight-through
        assert torch.all(got[1][gate.detach() == 0] == 0)


@pytest.mark.parametrize("gate_mode", ["none", "gate", "gate_zeros", "gate_zeros_dense"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_layer_matches_reference(backend, per_token, gate_mode):
    _need(backend, "scatter_rows")
    _run_property("skip_layer", backend, (per_token, gate_mode),
                  skip_cases(per_token, gate_mode, tiny=backend == "triton"), check_skip_layer)
