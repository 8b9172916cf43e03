"""Routed FFN columns: patch(model, gate="router") and fit_routers (sparse_ops/patching/router.py,
sparse_ops.gates.FFNRouter).

The reference is the unpatched model with one hook per MLP that applies the same router's top-k
mask to the dense MLP: down(silu(gate(x)) * up(x) * mask). Every path of the patched MLP (one row
through gated_ffn with k indices, several rows sparse or dense with the mask) must give it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparse_ops
from sparse_ops.gates import FFNRouter

transformers = pytest.importorskip("transformers")

LL, LF = 3, 64


def small_llama(F_=LF, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=F_, num_hidden_layers=LL,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches(n=4, B=2, T=12, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (B, T), generator=g) for _ in range(n)]


def routed(keep=0.5, F_=LF, fit=True, **kw):
    m = sparse_ops.patch(small_llama(F_), gate={"ffn": ("router", keep)})
    if fit:
        sparse_ops.fit_routers(m, batches(), steps=60, **kw)
    return m


def reference_hooks(model, routers):
    hs = []
    for layer, r in zip(model.model.layers, routers):
        def hook(mlp, args, out, r=r):
            x = args[0]
            return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x) * r.mask(x))
        hs.append(layer.mlp.register_forward_hook(hook))
    return hs


def check_against_reference(m, ids, new_tokens=6):
    """Prefill logits and greedy generation of the patched model = the hooked unpatched model."""
    with torch.no_grad():
        out = m(ids).logits
    toks = m.generate(ids[:1], max_new_tokens=new_tokens, do_sample=False)
    decode_keep = sparse_ops.stats(m)["ffn"]  # the last forward: one new token
    routers = [layer.sparse_gates.ffn for layer in m.model.layers]
    sparse_ops.unpatch(m)
    hs = reference_hooks(m, routers)
    try:
        with torch.no_grad():
            ref = m(ids).logits
        ref_toks = m.generate(ids[:1], max_new_tokens=new_tokens, do_sample=False)
    finally:
        for h in hs:
            h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(toks, ref_toks)
    return decode_keep


@pytest.mark.parametrize("transposed_down", [False, True])
def test_routed_model_equals_the_masked_reference_in_prefill_and_generation(transposed_down):
    m = routed(transposed_down=transposed_down)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    assert check_against_reference(m, ids) == pytest.approx(0.5)  # a decode step runs k of F columns


@pytest.mark.parametrize("keep, F_", [(0.0, LF), (1.0, LF), (1 / LF, LF), (0.3, 37)])
def test_all_off_all_on_one_column_and_odd_sizes(keep, F_):
    m = routed(keep=keep, F_=F_)
    k = m.model.layers[0].sparse_gates.ffn.k
    assert k == round(keep * F_)
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(3))
    assert check_against_reference(m, ids, new_tokens=3) == pytest.approx(k / F_)


def test_the_several_rows_paths_sparse_and_dense_both_match():
    """A few rows whose union is small enough runs gated_ffn on the union (stats < 1); many rows run
    dense with the mask (stats 1): both equal the reference."""
    m = routed(keep=0.1)
    x = torch.randn(3, 48)
    mlp, st = m.model.layers[0].mlp, m.model.layers[0]._sparse_state
    r = m.model.layers[0].sparse_gates.ffn
    ref = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x) * r.mask(x))
    st.reset_counts()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)
    union = int(r.mask(x).any(0).sum())
    assert st.counts["ffn"][0] == 3 * union < 3 * LF
    xs = torch.randn(40, 48)
    st.reset_counts()
    with torch.no_grad():
        out = mlp(xs)
    torch.testing.assert_close(out, mlp.down_proj(F.silu(mlp.gate_proj(xs)) * mlp.up_proj(xs) * r.mask(xs)),
                               rtol=1e-5, atol=1e-6)
    assert st.counts["ffn"][0] == 40 * LF  # dense ran (40 rows leave the decode kernel)
    # 12 rows at keep 0.5: the union is (nearly) every column, so dense; the next calls of 12 rows
    # run dense without counting (contextual.RECHECK), still equal to the reference.
    m = routed(keep=0.5)
    mlp, st = m.model.layers[0].mlp, m.model.layers[0]._sparse_state
    r = m.model.layers[0].sparse_gates.ffn
    for i in range(2):
        x12 = torch.randn(12, 48)
        assert int(r.mask(x12).any(0).sum()) > 0.8 * LF
        with torch.no_grad():
            out = mlp(x12)
        torch.testing.assert_close(out, mlp.down_proj(F.silu(mlp.gate_proj(x12)) * mlp.up_proj(x12) * r.mask(x12)),
                                   rtol=1e-5, atol=1e-6)
        assert st.ffn_dense_left == {12: sparse_ops.patching.contextual.RECHECK - 1 - i}


def test_fitting_finds_the_columns_an_untrained_router_misses():
    m = routed(fit=False)
    before = sparse_ops.fit_routers(m, batches(), steps=0)  # recall of the random initialisation
    after = sparse_ops.fit_routers(m, batches(), steps=150)
    assert all(b < 0.65 for b in before)
    assert all(a > b + 0.1 for a, b in zip(after, before)), (before, after)


def test_the_router_learns_from_the_model_loss_and_skipped_columns_get_no_gradient():
    m = routed()
    m.train()
    layer = m.model.layers[0]
    r, mlp = layer.sparse_gates.ffn, layer.mlp
    x = torch.randn(1, 1, 48, requires_grad=True)  # one row: gated_ffn with the ste gate
    with torch.no_grad():
        picked = r.mask(x).reshape(-1)
    # NaN planted in a skipped column's weights stays out of every gradient and of the output
    off = int(torch.nonzero(~picked)[0])
    with torch.no_grad():
        mlp.up_proj.weight[off] = float("nan")
    y = mlp(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert r.up.weight.grad is not None and r.up.weight.grad.abs().sum() > 0
    assert torch.isfinite(r.up.weight.grad).all()
    g = mlp.gate_proj.weight.grad
    assert torch.all(g[~picked] == 0) and g[picked].abs().sum() > 0


def test_keep_fractions_state_dict_and_unpatch():
    m = routed(keep=0.25, fit=False)
    assert sparse_ops.gates.keep_fractions(m)["ffn"] == pytest.approx(0.25)
    keys = [k for k in m.state_dict() if "sparse_gates" in k]
    assert sorted(keys)[:3] == ["model.layers.0.sparse_gates.ffn.down.weight", "model.layers.0.sparse_gates.ffn.up.bias",
                                "model.layers.0.sparse_gates.ffn.up.weight"]
    sparse_ops.unpatch(m)
    assert not any("sparse_gates" in k for k in m.state_dict())


def test_clear_errors():
    with pytest.raises(ValueError, match="only an FFN router takes a rank"):  # heads: per-sample SampleRouter
        sparse_ops.patch(small_llama(), gate={"heads": ("router", 0.5, 8)})
    with pytest.raises(ValueError, match="router keep must be in"):
        sparse_ops.patch(small_llama(), gate={"ffn": ("router", 1.5)})
    with pytest.raises(ValueError, match="router rank must be a positive int"):
        sparse_ops.patch(small_llama(), gate={"ffn": ("router", 0.5, 0)})
    r = sparse_ops.patch(small_llama(), gate={"ffn": ("router", 0.25, 8)}).model.layers[1].sparse_gates.ffn
    assert (r.rank, r.k, r.down.weight.shape) == (8, 16, (8, 48))
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=40, vocab_size=50))
    with pytest.raises(TypeError, match="a rank is for the per-token FFN router of gated \\(SwiGLU\\) MLPs.*BERT"):
        sparse_ops.patch(bert, gate={"ffn": ("router", 0.5, 8)})
    assert not hasattr(bert, "_sparse_patch")  # nothing converted
    # Without a rank, BERT's FFN router is per sample (tests/test_sample_router.py).
    assert isinstance(sparse_ops.patch(bert, gate="router").encoder.layer[0].sparse_gates.ffn,
                      sparse_ops.gates.SampleRouter)
    m = routed(fit=False)
    with pytest.raises(ValueError, match="routed"):
        sparse_ops.set_masks(m, ffn=[torch.ones(LF, dtype=torch.bool)] * LL)
    with pytest.raises(ValueError, match="routed"):
        sparse_ops.patching.calibrate_contextual_ffn(m, batches())
    with pytest.raises(ValueError, match="routed"):
        sparse_ops.pruning.compact(m)
    for kw, msg in (({"steps": -1}, "steps"), ({"lr": 0.0}, "lr"), ({"batch_rows": 0}, "batch_rows")):
        with pytest.raises(ValueError, match=msg):
            sparse_ops.fit_routers(m, batches(), **kw)
    with pytest.raises(ValueError, match="batches is empty"):
        sparse_ops.fit_routers(m, [])
    with pytest.raises(ValueError, match="no FFN routers"):
        sparse_ops.fit_routers(sparse_ops.patch(small_llama()), batches())
    with pytest.raises(TypeError, match="not patched"):
        sparse_ops.fit_routers(small_llama(), batches())
    with pytest.raises(ValueError, match="keep must be a fraction"):
        FFNRouter(8, 16, keep=-0.1)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        FFNRouter(8, 16, rank=0)
    with pytest.raises(ValueError, match=r"x must be a tensor \[\.\.\., 8\]"):
        FFNRouter(8, 16)(torch.randn(2, 9))
