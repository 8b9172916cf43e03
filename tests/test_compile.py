"""torch.compile(fullgraph=True) with a dynamic batch: results equal eager, and one graph serves
every mask of a form (the active count and the kept samples are symbols of the graph, not guards).

Each case compiles one function (aot_eager: fake tensors, functionalisation and the compiled
backward, without inductor's code generation; one case also through inductor), calls it with
masks whose counts change and batches of 2, 3 and 5, and asserts the number of graphs built.
"""
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import sparse_ops
from sparse_ops.nn import GatedFFN, SparseMultiheadAttention

BATCHES = (2, 3, 5)  # dynamic=True: 0 and 1 would be specialised, so they are not among them


def compiled(f, backend="aot_eager"):
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend(backend)
    return torch.compile(f, backend=cnt, fullgraph=True, dynamic=True), cnt


def graphs_of(f):
    """How many compiled versions of f dynamo keeps (its cache entries: one per set of guards).
    Not the backend's call count, which also counts a restarted analysis of the same frame."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(f.__code__))


def check_calls(f, calls, params=(), graphs=1, backend="aot_eager", atol=1e-5):
    """Run f compiled and eager on each argument tuple: outputs and gradients (of the float inputs
    that require grad, and of `params`) equal; `graphs` graphs built over all the calls."""
    cf, cnt = compiled(f, backend)
    for args in calls:
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + list(params)
        got, exp = cf(*args), f(*args)
        torch.testing.assert_close(got, exp, atol=atol, rtol=1e-4)
        if leaves:
            w = torch.randn_like(exp)
            gg = torch.autograd.grad((got * w).sum(), leaves, allow_unused=True)
            ge = torch.autograd.grad((exp * w).sum(), leaves, allow_unused=True)
            for a, b in zip(gg, ge):
                if b is None:
                    assert a is None or not a.any()
                else:
                    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
    n = graphs_of(f)
    assert cnt.frame_count >= 1 and n == graphs, f"{n} graphs for {len(calls)} calls (expected {graphs})"


# ----------------------------------------------------------------- GatedFFN
def ffn_masks(form, B, T, F, p):
    if form == "none":
        return None
    if form == "shared":
        m = torch.rand(F) < p
        m[0] = True
        return m
    if form == "per_row":
        return torch.rand(B, T, F) < p
    if form == "all_off":
        return torch.zeros(F, dtype=torch.bool)
    raise AssertionError(form)


@pytest.mark.parametrize("form", ["none", "shared", "per_row", "all_off"])
def test_gated_ffn_module(form):
    torch.manual_seed(0)
    ffn = GatedFFN(16, 24, glu=True, activation="silu")
    T = 4
    calls = [(torch.randn(B, T, 16, requires_grad=True), ffn_masks(form, B, T, 24, p))
             for B, p in zip(BATCHES, (0.5, 0.25, 0.75))]
    check_calls(lambda x, a: ffn(x, active=a), calls, params=list(ffn.parameters()))


@pytest.mark.parametrize("gate", ["hard_concrete", "threshold"])
def test_gated_ffn_learned_gate(gate):
    torch.manual_seed(1)
    ffn = GatedFFN(16, 24, gate=gate).eval()  # eval: hard_concrete is deterministic
    with torch.no_grad():
        if gate == "threshold":
            ffn.gate_scores.copy_(torch.randn(24))
        else:
            ffn.gate.log_alpha.copy_(torch.randn(24) * 3)
    calls = [(torch.randn(B, 3, 16, requires_grad=True),) for B in BATCHES]
    check_calls(lambda x: ffn(x), calls, params=list(ffn.parameters()))


def test_gated_ffn_through_inductor():
    torch.manual_seed(2)
    ffn = GatedFFN(16, 24)
    calls = [(torch.randn(B, 4, 16, requires_grad=True), torch.rand(24) < p) for B, p in zip(BATCHES, (0.5, 0.2, 0.9))]
    check_calls(lambda x, a: ffn(x, active=a), calls, params=list(ffn.parameters()), backend="inductor")


# ----------------------------------------------------------------- SparseMultiheadAttention
H = 4


def head_masks(form, B, p):
    if form == "none":
        return None
    if form == "shared_bool":
        return torch.rand(H) < p
    if form == "shared_float":
        return (torch.rand(H) < p).float() * (0.5 + torch.rand(H))
    if form == "per_sample_bool":
        return torch.rand(B, H) < p
    if form == "per_sample_float":
        return ((torch.rand(B, H) < p).float() * (0.5 + torch.rand(B, H))).requires_grad_()
    if form == "all_off":
        return torch.zeros(B, H, dtype=torch.bool)
    if form == "all_on":
        return torch.ones(B, H, dtype=torch.bool)
    raise AssertionError(form)


FORMS = ["none", "shared_bool", "shared_float", "per_sample_bool", "per_sample_float", "all_off", "all_on"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("masks", ["none", "padding_causal"])
def test_mha_every_mask_form(form, masks):
    torch.manual_seed(3)
    mha = SparseMultiheadAttention(16, H, batch_first=True)
    T = 5
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)

    def f(x, hm, kpm):
        if masks == "none":
            return mha(x, x, x, need_weights=False, head_mask=hm)[0]
        return mha(x, x, x, need_weights=False, head_mask=hm, key_padding_mask=kpm, attn_mask=causal,
                   is_causal=True)[0]

    calls = []
    for B, p in zip(BATCHES, (0.5, 0.25, 0.75)):
        kpm = torch.zeros(B, T, dtype=torch.bool)
        kpm[0, -2:] = True
        calls.append((torch.randn(B, T, 16, requires_grad=True), head_masks(form, B, p), kpm))
    check_calls(f, calls, params=list(mha.parameters()))


def test_mha_need_weights_and_cross_attention():
    torch.manual_seed(4)
    mha = SparseMultiheadAttention(16, H, kdim=8, vdim=12)

    def f(q, k, v, hm):
        out, w = mha(q, k, v, head_mask=hm)  # need_weights=True: the dense path, weights of off heads 0
        return out + w.sum()

    calls = [(torch.randn(5, B, 16, requires_grad=True), torch.randn(7, B, 8), torch.randn(7, B, 12),
              torch.rand(B, H) < p) for B, p in zip(BATCHES, (0.5, 0.25, 0.75))]
    check_calls(f, calls, params=list(mha.parameters()))


@pytest.mark.parametrize("gate", ["hard_concrete", "threshold"])
def test_mha_learned_gate(gate):
    torch.manual_seed(5)
    mha = SparseMultiheadAttention(16, H, batch_first=True, gate=gate).eval()
    with torch.no_grad():
        if gate == "threshold":
            mha.gate_scores.copy_(torch.tensor([1.0, -1.0, 0.5, -0.2]))
        else:
            mha.gate.log_alpha.copy_(torch.tensor([4.0, -4.0, 3.0, -3.0]))
    calls = [(torch.randn(B, 5, 16, requires_grad=True),) for B in BATCHES]
    check_calls(lambda x: mha(x, x, x, need_weights=False)[0], calls, params=list(mha.parameters()))


# ----------------------------------------------------------------- skip_layer
class TupleLayer(nn.Module):
    """A Hugging Face-style layer: (hidden, per-sample extra), with an attention-style mask argument."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, mask):
        h = torch.tanh(self.lin(x)) * mask[..., None]
        return h, h.sum(-1)


@pytest.mark.parametrize("kind, per_token", [("linear", False), ("linear", True), ("encoder_layer", False)])
def test_skip_layer(kind, per_token):
    torch.manual_seed(6)
    T, d = 6, 16
    layer = nn.Linear(d, d) if kind == "linear" else nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0,
                                                                                 batch_first=True)
    pad = "src_key_padding_mask" if (per_token and kind == "encoder_layer") else None

    def f(x, keep):
        if pad is None:
            return sparse_ops.skip_layer(layer, x, keep)

        def body(xc, src_key_padding_mask):
            return layer(xc, src_key_padding_mask=~src_key_padding_mask)
        return sparse_ops.skip_layer(body, x, keep, pad_mask_kwarg="src_key_padding_mask")

    calls = []
    for B, p in zip(BATCHES, (0.5, 0.2, 0.8)):
        keep = torch.rand(B, T) < p if per_token else torch.rand(B) < p
        if per_token:
            keep[:, 0] = True  # a row with no real token would be all padding for the attention
        calls.append((torch.randn(B, T, d, requires_grad=True), keep))
    if not per_token:  # all skipped and all kept, at other batch sizes
        calls += [(torch.randn(4, T, d, requires_grad=True), torch.zeros(4, dtype=torch.bool)),
                  (torch.randn(6, T, d, requires_grad=True), torch.ones(6, dtype=torch.bool))]
    check_calls(f, calls, params=list(layer.parameters()))


def test_skip_layer_gate_and_tuple_output():
    torch.manual_seed(7)
    T, d = 4, 8  # T not among BATCHES: a [B, T] mask then cannot look like a [T, T] one
    layer = TupleLayer(d)

    def f(x, keep, gate, mask):
        y, extra = sparse_ops.skip_layer(layer, x, keep, mask, gate=gate, full_output=True)
        return y + extra.sum()

    calls = []
    for B, p in zip(BATCHES, (0.5, 0.3, 0.7)):
        keep = torch.rand(B) < p
        gate = torch.rand(B).requires_grad_()
        calls.append((torch.randn(B, T, d, requires_grad=True), keep, gate, torch.ones(B, T)))
    check_calls(f, calls, params=list(layer.parameters()))


def test_skip_layer_per_token_attention_does_not_trace():
    """The documented limit: per token, the compact width is a symbol of the graph, and torch's
    own attention guards on it (Eq(1, u0) in F.multi_head_attention_forward's SDPA call), so
    fullgraph fails with torch's message. When torch stops guarding, this test says so."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    cf, _ = compiled(lambda x, keep: sparse_ops.skip_layer(layer, x, keep))
    keep = torch.tensor([[True, False, True, True], [True, True, False, False]])
    with pytest.raises(Exception, match="data-dependent"):
        cf(torch.randn(2, 4, 8), keep)


def test_skip_layer_dense_grad_refuses_to_compile():
    lin = nn.Linear(4, 4)
    cf, _ = compiled(lambda x, k, g: sparse_ops.skip_layer(lin, x, k, gate=g, dense_grad=True))
    with pytest.raises(Exception, match="dense_grad=True does not compile"):
        cf(torch.randn(3, 4), torch.ones(3, dtype=torch.bool), torch.tensor([1.0, 0.0, 0.5], requires_grad=True))


def test_graph_count_sees_a_recompile():
    """The count the tests above assert does see recompiles: a value-dependent branch adds one."""
    def f(x, flag):
        return x * 2 if flag else x - 1

    cf, _ = compiled(f)
    for flag in (True, False, True):
        torch.testing.assert_close(cf(torch.ones(3), flag), f(torch.ones(3), flag))
    assert graphs_of(f) == 2
