"""SparseMultiheadAttention on every backend usable here (cpp, torch, triton through the interpreter):
the per-sample, shared and all-on paths equal the head-masked nn.MultiheadAttention reference
(test_attention_module.reference), forward and backward, with bool masks and float gates
(straight-through gradient), attn_mask and key_padding_mask; proof that the attention core ran on
the chosen backend's op (forward and backward); `backend=` and sparse_ops.set_backend through
"auto"; dropout > 0 in training stays on F.scaled_dot_product_attention. Shapes are tiny
(B=3, L=S=5, E=16, H=4): the Triton interpreter is slow."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparse_ops
from sparse_ops import backend as _backend
from sparse_ops import reference as _reference
from sparse_ops.nn import SparseMultiheadAttention
from test_attention_module import D, E, H, S, attn_mask_cases, inputs, make, masks, params, reference, tol

F32 = torch.float32


def _have_triton():
    return _backend.triton_status("cpu")[0]


BACKENDS = ["cpp", "torch", pytest.param("triton", marks=pytest.mark.skipif(
    not _have_triton(), reason="Triton is not usable on CPU here (needs triton and TRITON_INTERPRET=1)"))]

# path -> head mask (None: every head on). Per-sample: K = 2, 3, 1, three groups of one sample.
PATHS = {
    "all_on": lambda: None,
    "shared_bool": lambda: masks()["bool_H"],
    "per_sample_bool": lambda: masks()["bool_BH"],
    "per_sample_equalK": lambda: masks()["bool_BH_equalK"],  # one group of every sample
    "shared_gate": lambda: masks()["float_H"],
    "per_sample_gate": lambda: masks()["float_BH"],
    "gate_no_zero": lambda: masks()["float_BH_no_zero"],  # every head runs, a per-sample gate
}
AMS = ["none", "kpm_bool", "attn_bool_3d", "attn_float_3d_and_kpm"]


class OpLog(TorchDispatchMode):
    """Names of the top-level ops dispatched while active (ops a kernel calls are not seen)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket._qualified_op_name))
        return func(*args, **(kwargs or {}))


# The op each backend runs for the attention core, forward and backward.
CORE_OPS = {
    "cpp": ("sparse_ops::masked_head_attention", "sparse_ops::masked_head_attention_backward"),
    "triton": ("sparse_ops::masked_head_attention_triton", "sparse_ops::masked_head_attention_triton_backward"),
}
SDPA_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def run_and_compare(smha, mha, m, am, batch_first=True):
    q, k, v = inputs(batch_first)
    kw = attn_mask_cases(S, S)[am]
    mm = None if m is None else (m.clone().requires_grad_() if m.is_floating_point() else m)
    log = OpLog()
    with log:
        out = smha(q, k, v, need_weights=False, head_mask=mm, **kw)[0]
    m2 = None if m is None else (m.clone().requires_grad_() if m.is_floating_point() else m)
    ref = reference(mha, q, k, v, m2, **kw)
    torch.testing.assert_close(out, ref, **tol(F32))
    go = torch.randn_like(ref)
    gated = mm is not None and mm.is_floating_point()
    ins = [q] + params(smha) + ([mm] if gated else [])
    ins2 = [q] + params(mha) + ([m2] if gated else [])
    with log:
        ga = torch.autograd.grad(out, ins, go)
    gb = torch.autograd.grad(ref, ins2, go)
    if gated:  # straight-through: exact where the head ran, 0 where it was skipped
        gb = gb[:-1] + (torch.where(m != 0, gb[-1], 0.0),)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **tol(F32))
    if gated:
        assert (ga[-1][m == 0] == 0).all()
    if m is not None:  # heads off for every sample: exact-zero weight gradients
        off = ~((m != 0) if gated else m).reshape(-1, H).any(0)
        gW = dict(zip([n for n, _ in sorted(smha.named_parameters())], ga[1:]))
        assert (gW["in_proj_weight"].view(3, H, D, E)[:, off] == 0).all()
        assert (gW["out_proj.weight"].view(E, H, D)[:, off] == 0).all()
    return log.names


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("am", AMS)
def test_paths_equal_reference_on_backend(backend, path, am, monkeypatch):
    mha, _ = make(batch_first=True)
    smha = SparseMultiheadAttention.from_module(mha, backend=backend)
    calls = []
    if backend == "torch":
        ref_op = _reference.masked_head_attention

        def spy(*a, **k):
            calls.append(1)
            return ref_op(*a, **k)
        monkeypatch.setattr(_reference, "masked_head_attention", spy)
    names = run_and_compare(smha, mha, PATHS[path](), am)
    if backend == "torch":
        assert calls, "the torch backend's reference was not called"
    else:
        fwd, bwd = CORE_OPS[backend]
        assert fwd in names and bwd in names, names
        assert not any(n in SDPA_OPS for n in names), names


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_second_unbatched_and_causal(backend):
    mha, _ = make(batch_first=False)
    smha = SparseMultiheadAttention.from_module(mha, backend=backend)
    for m in (None, masks()["bool_BH"], masks()["float_H"]):
        run_and_compare(smha, mha, m, "kpm_float", batch_first=False)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(S)
    q, k, v = inputs(False)
    for m in (None, masks()["bool_BH"]):
        out = smha(q, k, v, need_weights=False, head_mask=m, attn_mask=causal, is_causal=True)[0]
        torch.testing.assert_close(out, reference(mha, q, k, v, m, attn_mask=causal), **tol(F32))
    mha1, _ = make(batch_first=True)
    smha1 = SparseMultiheadAttention.from_module(mha1, backend=backend)
    q, k, v = inputs(True, batched=False)
    m = torch.tensor([True, False, True, True])
    torch.testing.assert_close(smha1(q, k, v, need_weights=False, head_mask=m)[0],
                               reference(mha1, q, k, v, m), **tol(F32))


def test_set_backend_reaches_the_module_through_auto(monkeypatch):
    mha, smha = make(batch_first=True)
    assert smha.backend == "auto"
    calls = []
    ref_op = _reference.masked_head_attention

    def spy(*a, **k):
        calls.append(1)
        return ref_op(*a, **k)
    monkeypatch.setattr(_reference, "masked_head_attention", spy)
    q, _, _ = inputs(True)
    prev = sparse_ops.get_backend()
    try:
        sparse_ops.set_backend("torch")
        for m in (None, masks()["bool_H"], masks()["bool_BH"]):
            n0 = len(calls)
            out = smha(q, q, q, need_weights=False, head_mask=m)[0]
            assert len(calls) > n0
            torch.testing.assert_close(out, reference(mha, q, q, q, m), **tol(F32))
    finally:
        sparse_ops.set_backend(prev)
    n0 = len(calls)
    smha(q, q, q, need_weights=False, head_mask=masks()["bool_BH"])
    assert len(calls) == n0  # back on the C++ op


def test_backend_argument():
    mha, _ = make(batch_first=True)
    assert SparseMultiheadAttention(E, H, backend="torch").backend == "torch"
    assert SparseMultiheadAttention.from_module(mha, backend="cpp").backend == "cpp"
    assert "backend='cpp'" in repr(SparseMultiheadAttention.from_module(mha, backend="cpp"))
    with pytest.raises(ValueError, match="backend"):
        SparseMultiheadAttention(E, H, backend="fast")
    with pytest.raises(ValueError, match="backend"):
        SparseMultiheadAttention.from_module(mha, backend="cuda-ish")
    q, _, _ = inputs(True)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not usable"):
        SparseMultiheadAttention.from_module(mha, backend="cuda")(q, q, q, need_weights=False)


def test_dropout_in_training_stays_on_sdpa():
    mha, _ = make(batch_first=True, dropout=0.5)
    smha = SparseMultiheadAttention.from_module(mha).train()
    q, _, _ = inputs(True)
    for m in (None, masks()["bool_H"], masks()["bool_BH"]):
        log = OpLog()
        with log:
            smha(q, q, q, need_weights=False, head_mask=m)[0].sum().backward()
        assert "sparse_ops::masked_head_attention" not in log.names
        assert any("bernoulli" in n or "dropout" in n for n in log.names), log.names  # SDPA's dropout ran
    smha.eval()
    log = OpLog()
    with log:
        smha(q, q, q, need_weights=False, head_mask=masks()["bool_BH"])
    assert "sparse_ops::masked_head_attention" in log.names
