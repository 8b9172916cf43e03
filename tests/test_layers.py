"""skip_layer, gather_rows / scatter_rows, SkipLayer, LayerDrop, TokenRouter."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparse_ops
from sparse_ops.nn import LayerDrop, SkipLayer, TokenRouter
from sparse_ops.ops.layers import gather_rows, scatter_rows

BACKENDS = ["cpp", "torch", "triton"]
D64 = torch.float64
# Triton cases run on the GPU where one is visible (tests/conftest.py then leaves the interpreter
# off), else in the interpreter on CPU tensors.
TRITON_DEV = "cuda" if (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1") else "cpu"


@pytest.fixture(autouse=True)
def _triton_cases_on_their_device(request):
    cs = getattr(request.node, "callspec", None)
    if (cs is not None and cs.params.get("backend") == "triton") or "triton" in request.node.name:
        with torch.device(TRITON_DEV):  # tensors and layers these tests make land there
            yield
    else:
        yield


class Recorder(nn.Module):
    """A layer that records the batch it saw and returns a tuple, like HF layers."""

    def __init__(self, d, dtype=D64):
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=dtype)
        self.seen = []

    def forward(self, x, mask=None, offset=None):
        self.seen.append(x.detach().clone())
        y = torch.tanh(self.lin(x))
        if mask is not None:
            y = y + 0.5 * mask[..., None]
        if offset is not None:
            y = y + offset
        return (y, "extra")


def ref_per_sample(layer, x, keep, gate=None, *args):
    out = layer(x, *args)[0]
    g = torch.ones(x.shape[0], dtype=x.dtype) if gate is None else gate
    blended = x + g.view(-1, *([1] * (x.dim() - 1))) * (out - x)
    return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), blended, x)


def ref_per_token(layer, x, keep, gate=None):
    outs = []
    for b in range(x.shape[0]):
        i = torch.nonzero(keep[b]).flatten()
        yb = x[b]
        if len(i):
            o = layer(x[b][i][None])[0][0]
            if gate is not None:
                o = x[b][i] + gate[b][i][:, None] * (o - x[b][i])
            yb = yb.index_copy(0, i, o)
        outs.append(yb)
    return torch.stack(outs)


# ----------------------------------------------------------------- row ops
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rows_match_reference(backend, dtype):
    torch.manual_seed(0)
    x = torch.randn(9, 3, 5).to(dtype)
    idx = torch.tensor([4, -1, 0, 8, 2])
    src = torch.randn(5, 3, 5).to(dtype)
    gate = torch.rand(5).to(dtype)
    g = gather_rows(x, idx, backend)
    assert torch.equal(g[0], x[4]) and torch.equal(g[1], torch.zeros_like(x[0])) and torch.equal(g[3], x[8])
    y = scatter_rows(x, idx, src, None, backend)
    exp = x.clone()
    for k, i in enumerate(idx.tolist()):
        if i >= 0:
            exp[i] = src[k]
    assert torch.equal(y, exp)
    yg = scatter_rows(x, idx, src, gate, backend)
    exp = x.clone().float()
    for k, i in enumerate(idx.tolist()):
        if i >= 0:
            exp[i] = x[i].float() + gate[k].float() * (src[k].float() - x[i].float())
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(yg.float(), exp, rtol=tol, atol=tol)


def test_rows_triton_gradcheck_and_opcheck():
    from sparse_ops.ops import registry
    gather_op, scatter_op = registry.triton_op("gather_rows"), registry.triton_op("scatter_rows")
    torch.manual_seed(0)
    x = torch.randn(7, 3, 5, dtype=D64, requires_grad=True)
    idx = torch.tensor([4, -1, 0, 6])
    src = torch.randn(4, 3, 5, dtype=D64, requires_grad=True)
    gate = torch.rand(4, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: gather_op(x, idx), [x])
    assert torch.autograd.gradcheck(lambda x, s, g: scatter_op(x, idx, s, g), [x, src, gate])
    torch.library.opcheck(scatter_op, (x, idx, src, gate))
    torch.library.opcheck(gather_op, (x, idx))
    with pytest.raises(ValueError, match="must not repeat a row"):
        scatter_op(x, torch.tensor([1, 1]), src[:2], None)


def test_rows_gradcheck_and_opcheck():
    torch.manual_seed(0)
    x = torch.randn(7, 3, 5, dtype=D64, requires_grad=True)
    idx = torch.tensor([4, -1, 0, 6])
    src = torch.randn(4, 3, 5, dtype=D64, requires_grad=True)
    gate = torch.rand(4, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: torch.ops.sparse_ops.gather_rows(x, idx), [x])
    assert torch.autograd.gradcheck(lambda x, s, g: torch.ops.sparse_ops.scatter_rows(x, idx, s, g), [x, src, gate])
    assert torch.autograd.gradcheck(lambda x, s: torch.ops.sparse_ops.scatter_rows(x, idx, s, None), [x, src])
    torch.library.opcheck(torch.ops.sparse_ops.gather_rows.default, (x, idx))
    torch.library.opcheck(torch.ops.sparse_ops.scatter_rows.default, (x, idx, src, gate))
    torch.library.opcheck(torch.ops.sparse_ops.scatter_rows.default, (x, idx, src, None))
    empty = torch.empty(0, dtype=torch.int64)
    torch.library.opcheck(torch.ops.sparse_ops.gather_rows.default, (x, empty))


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([0, 7]), r"idx must be in \[-1, 7\)"),
    (torch.tensor([-2]), r"idx must be in \[-1, 7\)"),
    (torch.tensor([1, 1]), "must not repeat a row"),
    (torch.tensor([1], dtype=torch.int32), "idx must be int64"),
    (torch.tensor([[1]]), r"idx must be 1-D"),
])
def test_rows_bad_idx(bad, match):
    x = torch.randn(7, 3)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparse_ops.scatter_rows(x, bad, torch.randn(bad.shape[0] if bad.dim() == 1 else 1, 3), None)
    with pytest.raises(RuntimeError, match=match.replace("scatter", "gather")):
        torch.ops.sparse_ops.gather_rows(x, bad)


def test_rows_bad_src_and_gate():
    x = torch.randn(7, 3)
    idx = torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="src must be"):
        torch.ops.sparse_ops.scatter_rows(x, idx, torch.randn(3, 3), None)
    with pytest.raises(RuntimeError, match="src must match"):
        torch.ops.sparse_ops.scatter_rows(x, idx, torch.randn(2, 3, dtype=D64), None)
    with pytest.raises(RuntimeError, match=r"gate must be \[K\]"):
        torch.ops.sparse_ops.scatter_rows(x, idx, torch.randn(2, 3), torch.rand(3))


# ----------------------------------------------------------------- skip_layer
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep_list", [[1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]])
def test_per_sample_matches_reference(backend, keep_list):
    torch.manual_seed(0)
    layer = Recorder(6)
    x = torch.randn(5, 7, 6, dtype=D64, requires_grad=True)
    mask = torch.randn(5, 7, dtype=D64)          # per-sample arg, compacted alongside
    keep = torch.tensor(keep_list, dtype=torch.bool)
    y = sparse_ops.skip_layer(layer, x, keep, mask, backend=backend)
    ref = ref_per_sample(layer, x, keep, None, mask)
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(y)
    params = [x] + list(layer.parameters())
    got = torch.autograd.grad(y, params, gy, allow_unused=True)
    exp = torch.autograd.grad(ref, params, gy, allow_unused=True)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a))


def test_skipped_rows_never_reach_the_layer():
    torch.manual_seed(0)
    layer = Recorder(4)
    x = torch.randn(6, 3, 4, dtype=D64)
    keep = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)
    layer.seen.clear()
    sparse_ops.skip_layer(layer, x, keep)
    assert len(layer.seen) == 1
    assert torch.equal(layer.seen[0], x[keep])
    # per token: the layer sees only each sample's kept tokens, in order
    kt = torch.zeros(6, 3, dtype=torch.bool)
    kt[1, 2] = True
    kt[4, 0] = True
    layer.seen.clear()
    sparse_ops.skip_layer(layer, x, kt)
    assert layer.seen[0].shape == (6, 1, 4)
    assert torch.equal(layer.seen[0][1, 0], x[1, 2]) and torch.equal(layer.seen[0][4, 0], x[4, 0])
    assert torch.equal(layer.seen[0][0, 0], torch.zeros(4, dtype=D64))  # padding is zeros, not data


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_blend_and_gradients(backend):
    torch.manual_seed(1)
    layer = Recorder(6)
    x = torch.randn(5, 7, 6, dtype=D64, requires_grad=True)
    keep = torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool)
    gate = torch.tensor([0.3, 0.9, 0.0, 1.0, 0.6], dtype=D64, requires_grad=True)
    y = sparse_ops.skip_layer(layer, x, keep, gate=gate, backend=backend)
    ref = ref_per_sample(layer, x, keep & (gate != 0), gate)
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(y)
    params = [x, gate] + list(layer.parameters())
    got = torch.autograd.grad(y, params, gy)
    exp = torch.autograd.grad(ref, params, gy)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)
    # straight-through: a row the zero gate skipped gets gate gradient 0 by default ...
    assert got[1][2] == 0
    # ... and its exact value with dense_grad=True (computed in backward only)
    layer.seen.clear()
    yd = sparse_ops.skip_layer(layer, x, keep, gate=gate, dense_grad=True, backend=backend)
    assert sum(s.shape[0] for s in layer.seen) == 3  # forward ran the 3 open rows only
    dg = torch.autograd.grad(yd, gate, gy)[0]
    dense = x + gate.view(-1, 1, 1) * (layer(x)[0] - x)
    dense = torch.where(keep.view(-1, 1, 1), dense, x)
    exp_dense = torch.autograd.grad(dense, gate, gy)[0]
    torch.testing.assert_close(dg, exp_dense)


@pytest.mark.parametrize("T", [1, 7])
def test_per_token_uneven_and_uniform(T):
    torch.manual_seed(2)
    layer = Recorder(5)
    x = torch.randn(4, T, 5, dtype=D64, requires_grad=True)
    for keep in [torch.rand(4, T) > 0.5, torch.ones(4, T, dtype=torch.bool),
                 torch.zeros(4, T, dtype=torch.bool)]:
        y = sparse_ops.skip_layer(lambda t: layer(t), x, keep)
        ref = ref_per_token(lambda t: layer(t), x, keep)
        torch.testing.assert_close(y, ref)
        gy = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(ref, x, gy)[0])
    # token args [B, T, ...] travel with the tokens; a per-token gate blends
    keep = torch.rand(4, T) > 0.4
    off = torch.randn(4, T, 5, dtype=D64)
    gate = torch.rand(4, T, dtype=D64, requires_grad=True)
    y = sparse_ops.skip_layer(layer, x, keep, offset=off, gate=gate)

    def lay(t, o):
        return layer(t, offset=o)

    exp = []
    for b in range(4):
        i = torch.nonzero(keep[b]).flatten()
        yb = x[b]
        if len(i):
            o = lay(x[b][i][None], off[b][i][None])[0][0]
            yb = yb.index_copy(0, i, x[b][i] + gate[b][i][:, None] * (o - x[b][i]))
        exp.append(yb)
    torch.testing.assert_close(y, torch.stack(exp))


def test_pad_mask_kwarg_masks_padding():
    torch.manual_seed(3)
    enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0).double().eval()
    x = torch.randn(3, 6, 8, dtype=D64)
    keep = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)

    def layer(t, src_key_padding_mask):
        return enc(t, src_key_padding_mask=~src_key_padding_mask)

    y = sparse_ops.skip_layer(layer, x, keep, pad_mask_kwarg="src_key_padding_mask")
    for b in range(3):
        i = torch.nonzero(keep[b]).flatten()
        exp = enc(x[b][i][None])[0]
        torch.testing.assert_close(y[b][i], exp)
        torch.testing.assert_close(y[b][~keep[b]], x[b][~keep[b]])


def test_all_skipped_gives_zero_grads_not_none():
    layer = Recorder(4)
    x = torch.randn(3, 4, dtype=D64, requires_grad=True)
    y = sparse_ops.skip_layer(layer, x, torch.zeros(3, dtype=torch.bool))
    assert torch.equal(y, x)
    y.sum().backward()
    for p in layer.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_empty_batch_and_b1():
    layer = Recorder(4)
    x = torch.randn(0, 3, 4, dtype=D64)
    assert sparse_ops.skip_layer(layer, x, torch.zeros(0, dtype=torch.bool)).shape == x.shape
    x1 = torch.randn(1, 3, 4, dtype=D64)
    torch.testing.assert_close(sparse_ops.skip_layer(layer, x1, torch.ones(1, dtype=torch.bool)), layer(x1)[0])


def test_bad_keep_and_gate():
    layer = Recorder(4)
    x = torch.randn(3, 5, 4, dtype=D64)
    with pytest.raises(TypeError, match="keep must be a bool tensor"):
        sparse_ops.skip_layer(layer, x, torch.ones(3))
    with pytest.raises(ValueError, match="keep must be"):
        sparse_ops.skip_layer(layer, x, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="gate must be shaped like keep"):
        sparse_ops.skip_layer(layer, x, torch.ones(3, dtype=torch.bool), gate=torch.ones(4, dtype=D64))
    with pytest.raises(TypeError, match="gate must have x's dtype"):
        sparse_ops.skip_layer(layer, x, torch.ones(3, dtype=torch.bool), gate=torch.ones(3))


def test_compile_runs_skip_layer():
    torch.manual_seed(4)
    lin = nn.Linear(6, 6)
    x = torch.randn(4, 6)
    keep = torch.tensor([1, 0, 1, 0], dtype=torch.bool)

    @torch.compile
    def f(x, keep):
        return sparse_ops.skip_layer(lin, x, keep)

    torch.testing.assert_close(f(x, keep), torch.where(keep[:, None], lin(x), x))


# ----------------------------------------------------------------- modules
def test_layerdrop_per_sample_really_skips_and_eval_prunes():
    torch.manual_seed(5)
    layers = [Recorder(4) for _ in range(4)]
    ld = LayerDrop([_FirstOnly(l) for l in layers], p=0.5, per_sample=True)
    x = torch.randn(32, 4, dtype=D64, requires_grad=True)
    y = ld(x)
    y.sum().backward()
    seen = [sum(s.shape[0] for s in l.seen) for l in layers]
    assert all(n < 32 for n in seen) and sum(seen) > 0, seen  # per-sample drop: fewer rows computed
    for p in ld.parameters():
        assert p.grad is not None
    ld.eval()
    for l in layers:
        l.seen.clear()
    ld.keep_layers = ld._resolve_keep("every_other")
    ld(x)
    assert [len(l.seen) for l in layers] == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="keep_layers must be indices"):
        LayerDrop(layers, keep_layers=[7])
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        LayerDrop(layers, p=1.0)


class _FirstOnly(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)[0]


def test_skiplayer_learned_gate_trains():
    torch.manual_seed(6)
    inner = nn.Linear(4, 4, dtype=D64)
    sl = SkipLayer(inner, gate="learned", d_model=4)
    sl.double()
    x = torch.randn(5, 3, 4, dtype=D64)
    y = sl(x)
    torch.testing.assert_close(y, inner(x))  # starts open: every sample runs
    y.pow(2).sum().backward()
    assert sl.score.bias.grad is not None and sl.score.bias.grad.abs() > 0
    with torch.no_grad():
        sl.score.bias.fill_(-5.0)  # closed: every sample skips
    torch.testing.assert_close(sl(x), x)


def test_token_router_top_k_and_causal_predictor():
    torch.manual_seed(7)
    r = TokenRouter(8, capacity=0.5, causal=True)
    x = torch.randn(3, 10, 8)
    keep, gate = r(x)
    assert keep.sum(1).tolist() == [5, 5, 5]
    assert torch.all(gate[~keep] == 0) and torch.all(gate[keep] > 0)
    layer = nn.Linear(8, 8)
    y = sparse_ops.skip_layer(layer, x, keep, gate=gate)
    (y.sum() + r.aux_loss(x)).backward()
    assert r.score.weight.grad.abs().sum() > 0 and r.predictor[0].weight.grad.abs().sum() > 0
    r.eval()
    keep_e, _ = r(x)
    # causal: each token's decision depends on that token only
    keep_prefix, _ = r(x[:, :4])
    assert torch.equal(keep_e[:, :4], keep_prefix)
    with pytest.raises(ValueError, match="capacity"):
        TokenRouter(8, capacity=0.0)


_DDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, sys.argv[3])
import sparse_ops
rank, world = int(sys.argv[1]), int(sys.argv[2])
os.environ["MASTER_ADDR"] = "127.0.0.1"
dist.init_process_group("gloo", rank=rank, world_size=world)
torch.manual_seed(0)
model = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.layers = model
    def forward(s, x, keep):
        x = sparse_ops.skip_layer(s.layers[0], x, keep)
        return sparse_ops.skip_layer(s.layers[1], x, torch.ones_like(keep))
ddp = nn.parallel.DistributedDataParallel(M())  # find_unused_parameters=False (the default)
x = torch.randn(3, 4)
keep = torch.zeros(3, dtype=torch.bool) if rank == 0 else torch.tensor([True, False, True])
for step in range(2):
    ddp.zero_grad()
    ddp(x, keep).sum().backward()
g = model[0].weight.grad
assert g is not None
print("rank", rank, "ok", float(g.abs().sum()))
dist.destroy_process_group()
"""


def test_ddp_without_find_unused_parameters(tmp_path):
    """A layer that every sample on one rank skipped must still produce (zero) grads there."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MASTER_PORT=str(29500 + os.getpid() % 1000))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", root], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "ok" in out
    # both ranks end with the same averaged gradient (rank 0 contributed zeros)
    vals = [float(o.split()[-1]) for o, _ in outs]
    assert vals[0] == pytest.approx(vals[1]) and vals[0] > 0


class _Bad(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        return {"batch": lambda: x[:1], "width": lambda: x[..., :2], "dtype": lambda: x.double(),
                "dict": lambda: {"h": x}, "none": lambda: None}[self.kind]()


@pytest.mark.parametrize("kind,err,msg", [
    ("batch", ValueError, r"turned its input \[5, 4\] into"), ("width", ValueError, "must keep the batch"),
    ("dtype", TypeError, "returned torch.float64 for a torch.float32"), ("dict", TypeError, "returned dict"),
    ("none", TypeError, "returned NoneType")])
@pytest.mark.parametrize("keep", ["some", "all"])
def test_layer_that_breaks_the_rows_is_named(kind, err, msg, keep):
    """A layer that changes the batch, the width or the dtype, or returns no tensor, is reported as
    that, naming its class (not as a scatter_rows argument error)."""
    x = torch.randn(8, 4)
    k = torch.tensor([True, False, True, True, False, True, True, False]) if keep == "some" else torch.ones(8, dtype=torch.bool)
    if keep == "all" and kind == "batch":
        msg = r"turned its input \[8, 4\] into"
    with pytest.raises(err, match=msg) as e:
        sparse_ops.skip_layer(_Bad(kind), x, k)
    assert str(e.value).startswith("skip_layer: the layer (_Bad) ")


def test_public_functions_on_meta_tensors():
    """Meta inputs give meta outputs of the right shape (no values are read)."""
    m = dict(device="meta")
    x = torch.empty(6, 5, 8, **m)
    layer = nn.Linear(8, 8, device="meta")
    for keep in (torch.empty(6, dtype=torch.bool, **m), torch.empty(6, 5, dtype=torch.bool, **m)):
        y = sparse_ops.skip_layer(layer, x, keep)
        assert y.device.type == "meta" and y.shape == x.shape
    w1, w2 = torch.empty(12, 8, **m), torch.empty(8, 12, **m)
    for active in (None, torch.empty(12, dtype=torch.bool, **m), torch.empty(3, dtype=torch.int64, **m)):
        y = sparse_ops.gated_ffn(x, w1, w2, active)
        assert y.device.type == "meta" and y.shape == x.shape
    q = torch.empty(2, 3, 7, 16, **m)
    y = sparse_ops.masked_head_attention(q, q, q, torch.empty(2, 3, dtype=torch.bool, **m))
    assert y.device.type == "meta" and y.shape == q.shape
    idx = torch.empty(4, dtype=torch.int64, **m)
    assert gather_rows(x, idx).shape == (4, 5, 8)
    assert scatter_rows(x, idx, torch.empty(4, 5, 8, **m)).shape == x.shape


def test_arguments_that_travel_are_named_where_the_shape_cannot_tell():
    """B == T: a [T, T] causal mask and a [B, T] padding mask look alike. Unnamed, it is an error
    that says how to name it; named (stay= / travel=), the result is the layer's on the kept rows."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(6, 6, 16)
    keep = torch.tensor([True, False, True, True, False, True])
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    with pytest.raises(ValueError, match=r"src_mask \[6, 6\] is ambiguous.*stay=\['src_mask'\]"):
        sparse_ops.skip_layer(layer, x, keep, src_mask=causal)
    with torch.no_grad():
        y = sparse_ops.skip_layer(layer, x, keep, src_mask=causal, stay=["src_mask"])
        ref = torch.where(keep[:, None, None], layer(x, src_mask=causal), x)
        torch.testing.assert_close(y, ref)
        pad = torch.zeros(6, 6, dtype=torch.bool)
        pad[0, -2:] = True
        y = sparse_ops.skip_layer(layer, x, keep, src_key_padding_mask=pad, travel=["src_key_padding_mask"])
        ref = torch.where(keep[:, None, None], layer(x, src_key_padding_mask=pad), x)
        torch.testing.assert_close(y, ref)
    with pytest.raises(ValueError, match="not arguments of this call"):
        sparse_ops.skip_layer(layer, x, keep, travel=["mask"])
    with pytest.raises(ValueError, match="named in both"):
        sparse_ops.skip_layer(layer, x, keep, src_mask=causal, travel=["src_mask"], stay=["src_mask"])
    with pytest.raises(ValueError, match="must have the batch B = 6 first"):
        sparse_ops.skip_layer(layer, x, keep, src_mask=torch.zeros(5, 6), travel=["src_mask"])


class _WithExtra(nn.Module):
    """HF-style: (hidden, per-row extra, a constant)."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        h = self.lin(x)
        return h, h.sum(-1), "tag"


@pytest.mark.parametrize("keep_list", [[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]])
def test_full_output_keeps_the_other_elements(keep_list):
    torch.manual_seed(9)
    layer = _WithExtra(5)
    x = torch.randn(4, 3, 5)
    keep = torch.tensor(keep_list, dtype=torch.bool)
    y, extra, tag = sparse_ops.skip_layer(layer, x, keep, full_output=True)
    torch.testing.assert_close(y, sparse_ops.skip_layer(layer, x, keep))
    h = layer.lin(x)
    torch.testing.assert_close(y, torch.where(keep[:, None, None], h, x))
    # The other elements are the layer's, for the rows it ran, in order (all rows: its own output).
    torch.testing.assert_close(extra, h.sum(-1)[keep])
    assert tag == "tag"
    assert layer.calls[0] == int(keep.sum())  # nothing kept: called on zero rows for the structure


def test_full_output_per_token_and_without_a_tuple():
    torch.manual_seed(10)
    layer = _WithExtra(5)
    x = torch.randn(2, 4, 5)
    keep = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)
    y, extra, _ = sparse_ops.skip_layer(layer, x, keep, full_output=True)
    assert extra.shape == (2, 2)  # [B, k]: k = 2 kept tokens at most, as the layer saw them
    torch.testing.assert_close(extra[0], layer.lin(x[0, [0, 2]]).sum(-1))
    torch.testing.assert_close(extra[1, 0], layer.lin(x[1, 2]).sum(-1))
    lin = nn.Linear(5, 5)
    (only,) = sparse_ops.skip_layer(lin, x, keep, full_output=True)  # a tensor layer: (y,)
    torch.testing.assert_close(only, sparse_ops.skip_layer(lin, x, keep))


def test_skiplayer_is_transparent_to_its_layer():
    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    sl = SkipLayer(enc)
    assert sl.self_attn is enc.self_attn and sl.linear1.out_features == 16  # attributes are the layer's
    assert set(sl.state_dict()) == set(enc.state_dict())                    # no "layer." prefix
    twin = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    SkipLayer(twin).load_state_dict(enc.state_dict())                       # a bare layer's checkpoint loads
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), enc.state_dict().values()))
    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    ss = SkipLayer(seq)
    assert ss[0] is seq[0] and len(ss) == 2                                 # indexing and len
    learned = SkipLayer(torch.nn.Linear(4, 4), gate="learned", d_model=4)
    keys = set(learned.state_dict())
    assert keys == {"weight", "bias", "score.weight", "score.bias"}
    other = SkipLayer(torch.nn.Linear(4, 4), gate="learned", d_model=4)
    other.load_state_dict(learned.state_dict())
    assert torch.equal(other.layer.weight, learned.layer.weight) and torch.equal(other.score.bias, learned.score.bias)
    with pytest.raises(AttributeError):
        sl.no_such_attribute
    outer = torch.nn.ModuleDict({"block": SkipLayer(torch.nn.Linear(4, 4))})  # nested: prefixes kept
    assert set(outer.state_dict()) == {"block.weight", "block.bias"}
    outer.load_state_dict(outer.state_dict())
