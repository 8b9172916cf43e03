"""Contextual (CATS-style) FFN sparsity of LLaMA-family MLPs: calibrate_contextual_ffn /
set_contextual_ffn (sparse_ops/patching/contextual.py).

The reference is the unpatched model with one hook per MLP: h = where(|a| > t, a, 0) * up(x),
a = silu(gate(x)), then down(h). Both paths of the patched MLP (sparse decode through gated_ffn
with the identity activation, and dense with the mask applied, where the rows' union of kept
columns is large) must give it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparse_ops
from sparse_ops.patching import contextual

transformers = pytest.importorskip("transformers")

LL, LF = 3, 64


def small_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=LF, num_hidden_layers=LL,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def cats_hooks(model, thresholds):
    """The CATS MLP on an unpatched model, as forward hooks that replace each MLP's output."""
    hs = []
    for layer, t in zip(model.model.layers, thresholds):
        def hook(mlp, args, out, t=t):
            x = args[0]
            a = F.silu(mlp.gate_proj(x))
            return mlp.down_proj(torch.where(a.abs() > t, a, torch.zeros(())) * mlp.up_proj(x))
        hs.append(layer.mlp.register_forward_hook(hook))
    return hs


def batches(n=3, B=2, T=9, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (B, T), generator=g) for _ in range(n)]


@pytest.mark.parametrize("transposed_down", [False, True])
def test_calibrated_model_equals_the_cats_reference_in_prefill_and_generation(transposed_down):
    model = small_llama()
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    sparse_ops.patch(model)
    th = sparse_ops.patching.calibrate_contextual_ffn(model, batches(), sparsity=0.5,
                                                      transposed_down=transposed_down)
    assert len(th) == LL and all(t > 0 for t in th)
    with torch.no_grad():
        out = model(ids).logits
    toks = model.generate(ids, max_new_tokens=10, do_sample=False)
    sparse_ops.unpatch(model)
    hs = cats_hooks(model, th)
    with torch.no_grad():
        ref = model(ids).logits
    ref_toks = model.generate(ids, max_new_tokens=10, do_sample=False)
    for h in hs:
        h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(toks, ref_toks)


def test_the_calibrated_sparsity_is_what_runs_in_decode():
    """One token per step: the kept fraction counted by stats is close to 1 - sparsity on the
    calibration text itself, and both paths (sparse, dense with the mask) are taken."""
    model = sparse_ops.patch(small_llama())
    cal = batches(n=4, B=2, T=12)
    th = sparse_ops.patching.calibrate_contextual_ffn(model, cal, sparsity=0.6)
    fracs = []
    for b in cal:
        for t in range(b.shape[1]):
            with torch.no_grad():
                model(b[:1, t:t + 1])  # a token on its own: decode-sized calls (no cache needed here)
            fracs.append(sparse_ops.stats(model)["ffn"])
    mean = sum(fracs) / len(fracs)
    assert abs(mean - 0.4) < 0.08, mean
    # A 24-token call: more rows than the decode kernel takes, so it runs dense (mask applied).
    with torch.no_grad():
        model(torch.cat(cal)[:2, :12])
    assert sparse_ops.stats(model)["ffn"] == 1.0
    assert th == [st.ffn_threshold for st in model._sparse_patch["states"]]


def test_both_paths_of_one_mlp_agree():
    """The sparse path (gated_ffn, identity activation, the masked activation as gate) and the dense
    path with the mask applied give the same output for the same rows."""
    model = sparse_ops.patch(small_llama())
    layer = model.model.layers[0]
    x = torch.randn(1, 3, 48)
    with torch.no_grad():
        t = float(torch.quantile(F.silu(layer.mlp.gate_proj(x)).abs(), 0.8))
    sparse_ops.patching.set_contextual_ffn(model, [t] * LL)
    st = model._sparse_patch["states"][0]
    with torch.no_grad():
        sparse = contextual.forward(st, layer.mlp, x, "silu")
    assert st.counts["ffn"][0] < 3 * LF  # the sparse path ran (the dense one counts every column)
    old = contextual.sparse_pays
    contextual.sparse_pays = lambda *a: False  # every call dense
    try:
        with torch.no_grad():
            dense = contextual.forward(st, layer.mlp, x, "silu")
    finally:
        contextual.sparse_pays = old
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def test_a_wide_union_skips_the_count_for_a_while():
    """A call of several rows whose union is too wide runs dense, and so do the layer's next
    RECHECK - 1 calls of as many rows, without counting; the one after counts again and can run
    sparse. Every call gives what the other path gives; new thresholds start counting afresh."""
    model = sparse_ops.patch(small_llama())
    layer = model.model.layers[0]
    st = model._sparse_patch["states"][0]
    x = torch.randn(1, 3, 48)
    with torch.no_grad():
        t = float(torch.quantile(F.silu(layer.mlp.gate_proj(x)).abs(), 0.9))
    sparse_ops.patching.set_contextual_ffn(model, [0.0] * LL)  # every column kept: the union is all of them
    with torch.no_grad():
        contextual.forward(st, layer.mlp, x, "silu")
    assert st.ffn_dense_left == {3: contextual.RECHECK - 1}
    st.ffn_threshold = t  # a narrow union from now on, the skip still pending
    ran, outs = [], []
    for _ in range(contextual.RECHECK):
        st.reset_counts()
        with torch.no_grad():
            outs.append(contextual.forward(st, layer.mlp, x, "silu"))
        ran.append(st.counts["ffn"][0])
    assert ran[:-1] == [3 * LF] * (contextual.RECHECK - 1), ran  # dense, uncounted
    assert ran[-1] < 3 * LF, ran  # counted again: sparse
    for o in outs[:-1]:
        torch.testing.assert_close(o, outs[-1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        contextual.forward(st, layer.mlp, torch.randn(1, 1, 48), "silu")  # one row: never skipped
    assert st.ffn_dense_left == {3: 0}
    st.ffn_dense_left[3] = 5
    sparse_ops.patching.set_contextual_ffn(model, [t] * LL)
    assert st.ffn_dense_left == {}


def test_gated_ffn_identity_activation_matches_reference():
    torch.manual_seed(3)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(8, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 12, dtype=torch.float64) * (torch.rand(5, 12) > 0.5)
    g.requires_grad_()
    out = sparse_ops.gated_ffn(x, w1, w2, gate=g, activation="identity")
    torch.testing.assert_close(out, ((x @ w1.t()) * g) @ w2.t())
    # Gradients: with zeros in the gate, of x and the weights (a zero gate entry's own gradient is
    # the straight-through 0, which a finite difference through 0 does not see); without, of all.
    torch.autograd.gradcheck(lambda a, b, c: sparse_ops.gated_ffn(a, b, c, gate=g.detach(), activation="identity"),
                             (x, w1, w2))
    g1 = (torch.rand(5, 12, dtype=torch.float64) + 0.5).requires_grad_()
    torch.autograd.gradcheck(lambda *a: sparse_ops.gated_ffn(a[0], a[1], a[2], gate=a[3], activation="identity"),
                             (x, w1, w2, g1))
    torch.library.opcheck(torch.ops.sparse_ops.gated_ffn.default,
                          (x, w1, w2, None, None, None, None, g, "identity", False, False))


def test_errors():
    model = sparse_ops.patch(small_llama())
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        sparse_ops.patching.calibrate_contextual_ffn(model, batches(), sparsity=1.0)
    with pytest.raises(ValueError, match="batches is empty"):
        sparse_ops.patching.calibrate_contextual_ffn(model, [])
    with pytest.raises(ValueError, match=r"thresholds must have one entry per layer \(3\)"):
        sparse_ops.patching.set_contextual_ffn(model, [0.1])
    with pytest.raises(ValueError, match=r"thresholds\[1\] must be a number >= 0"):
        sparse_ops.patching.set_contextual_ffn(model, [0.1, float("nan"), 0.1])
    sparse_ops.patching.set_contextual_ffn(model, [0.1] * LL)
    with pytest.raises(ValueError, match="contextual FFN sparsity is on"):
        sparse_ops.set_masks(model, ffn=[torch.ones(LF, dtype=torch.bool)] * LL)
    sparse_ops.clear_masks(model)  # turns it off
    assert all(st.ffn_threshold is None for st in model._sparse_patch["states"])
    sparse_ops.set_masks(model, ffn=[torch.ones(LF, dtype=torch.bool)] * LL)
    with pytest.raises(ValueError, match="FFN masks are set"):
        sparse_ops.patching.set_contextual_ffn(model, [0.1] * LL)
    bert = sparse_ops.patch(transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)))
    with pytest.raises(TypeError, match="needs a gated"):
        sparse_ops.patching.set_contextual_ffn(bert, [0.1])
