"""Per-sample routers for heads, FFN columns and layers: patch(model, gate={"heads": ("router", keep),
"ffn": ("router", keep), "layers": "router"}) (sparse_ops.gates.SampleRouter, read by
patching/state.begin_layer; the FFN router is per sample outside the LLaMA family, whose FFN router
is per token: tests/test_router.py).

References: in training, the unpatched model with the same routers' values applied by mask
multiplication (heads' outputs before the output projection, x + g * (layer(x) - x) per sample);
in eval, the same model patched without gates and given the routers' masks through set_masks.
"""
from __future__ import annotations

import copy

import pytest
import torch

import sparse_ops
from sparse_ops.gates import SampleRouter, budget_loss, keep_fractions, topk_mask

transformers = pytest.importorskip("transformers")
from test_patch_gates import batch, output, parts, small  # noqa: E402

ROUTED = {"heads": ("router", 0.5), "layers": "router"}
ROUTED_FFN = {"heads": ("router", 0.5), "ffn": ("router", 0.5), "layers": "router"}


def _randomize(model, seed=1):
    """Router weights large enough that the choice depends on the input, and layers that run for
    some samples only."""
    g = torch.Generator().manual_seed(seed)
    for lg in (m for m in model.modules() if isinstance(m, sparse_ops.gates.LayerGates)):
        for r in (lg.get("heads"), lg.get("ffn"), lg.get("layer")):
            if not isinstance(r, SampleRouter):
                continue
            with torch.no_grad():
                r.score.weight.copy_(torch.randn(r.score.weight.shape, generator=g) * 0.5)
                r.score.bias.copy_(torch.randn(r.score.bias.shape, generator=g) * 0.5)


def routed(family, seed=0, gate=ROUTED):
    model = small(family, seed)
    sparse_ops.patch(model, gate=gate)
    _randomize(model)
    return model


def layer_list(family, model):
    return [l for l, _, _ in parts(family, model)[0]]


def reference_hooks(family, model, gates, H, valid=None):
    """Mask-multiply hooks on the unpatched model with `gates` (copies of the LayerGates); valid: the
    batch's real tokens (bool [B, T]), what the routers average over."""
    hooks = []
    for (layer, o_in, down), lg in zip(parts(family, model)[0], gates):
        vals = {}

        def pre_layer(mod, args, kwargs, lg=lg, vals=vals):
            x = args[0] if args else kwargs["hidden_states"]
            vals.clear()
            r = lg.get("heads") or lg.get("layer")
            p = r.pool(x, valid)
            for kind in ("heads", "ffn", "layer"):
                if lg.get(kind) is not None:
                    vals[kind] = lg.get(kind).gate(p)
            vals["x"] = x

        def pre_o(mod, args, vals=vals):
            if "heads" not in vals:
                return None
            h = args[0]
            b, t, e = h.shape
            return ((h.view(b, t, H, e // H) * vals["heads"][:, None, :, None]).view(b, t, e),)

        def pre_down(mod, args, vals=vals):
            if "ffn" not in vals:
                return None
            return (args[0] * vals["ffn"][:, None, :],)

        def post(mod, args, kwargs, out, vals=vals):
            if "layer" not in vals:
                return None
            x = vals["x"]
            y = out if torch.is_tensor(out) else out[0]
            y = x + vals["layer"][:, None, None] * (y - x)
            return y if torch.is_tensor(out) else (y, *out[1:])
        hooks += [layer.register_forward_pre_hook(pre_layer, with_kwargs=True), o_in.register_forward_pre_hook(pre_o),
                  down.register_forward_pre_hook(pre_down), layer.register_forward_hook(post, with_kwargs=True)]
    return hooks


def _train_run(family, patched, gate=ROUTED):
    model = routed(family, gate=gate).train()
    layers = layer_list(family, model)
    gates = [l.sparse_gates for l in layers]
    hooks = []
    if not patched:
        gates = [copy.deepcopy(g) for g in gates]
        sparse_ops.unpatch(model)
    ids, am = batch(B=4)
    if not patched:
        hooks = reference_hooks(family, model, gates, parts(family, model)[1], am.bool())
    out = output(family, model, ids, am)
    (out * am[..., None]).square().sum().backward()
    for h in hooks:
        h.remove()
    wgrads = {n: p.grad for n, p in model.named_parameters() if "sparse_gates" not in n}
    ggrads = [{n: p.grad for n, p in g.named_parameters()} for g in gates]
    return out, wgrads, ggrads, (sparse_ops.stats(model) if patched else None)


@pytest.mark.parametrize("family,gate", [("bert", ROUTED), ("llama", ROUTED), ("gpt2", ROUTED),
                                         ("bert", ROUTED_FFN), ("gpt2", ROUTED_FFN)])
def test_routed_training_equals_the_mask_multiply_reference(family, gate):
    """Output and every weight gradient equal the mask-multiply reference (with ROUTED_FFN the FFN
    hidden units are multiplied by the router's [B, F] gate too); the routers learn."""
    out, wg, gg, st = _train_run(family, True, gate)
    out_r, wg_r, gg_r, _ = _train_run(family, False, gate)
    torch.testing.assert_close(out, out_r, rtol=1e-4, atol=1e-5)
    scale = max(g.abs().max() for g in wg_r.values() if g is not None)
    for n, g_ref in wg_r.items():
        if g_ref is None:
            assert wg[n] is None or not wg[n].any(), n
            continue
        torch.testing.assert_close(wg[n], g_ref, rtol=1e-4, atol=1e-5 * scale, msg=n)
    # The routers learn (a skipped unit's dL/dgate is 0 by design, where the reference's is not:
    # only finite and nonzero).
    for lg in gg:
        for n, g in lg.items():
            assert g is not None and torch.isfinite(g).all(), n
    assert any(lg["heads.score.weight"].any() for lg in gg)
    assert any(lg["layer.score.weight"].any() for lg in gg)
    if "ffn" in gate:
        assert any(lg["ffn.score.weight"].any() for lg in gg)
        assert st["ffn"] == pytest.approx(0.5 * st["layers"])
    # Some samples skipped some layers, and half of the heads of each sample that ran.
    assert 0.0 < st["layers"] < 1.0
    assert st["heads"] == pytest.approx(0.5 * st["layers"])


def _masks_of(family, model, ids, am):
    """Each layer's router masks on the inputs it receives in a forward of the routed model."""
    seen = []
    hooks = [l.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(args[0] if args else kwargs.get("hidden_states", kwargs.get("src"))),
        with_kwargs=True) for l in layer_list(family, model)]
    with torch.no_grad():
        out = output(family, model, ids, am)
    for h in hooks:
        h.remove()
    heads, keep = [], []
    for l, x in zip(layer_list(family, model), seen):
        r = l.sparse_gates
        p = r.heads.pool(x, am.bool())
        heads.append(r.heads.mask(p))
        keep.append(r.layer.mask(p))
    return out, heads, torch.stack(keep, 1)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_routed_inference_equals_set_masks_with_the_routers_masks(family):
    model = routed(family).eval()
    ids, am = batch(B=5)
    out, heads, keep = _masks_of(family, model, ids, am)
    st = sparse_ops.stats(model)
    assert (~keep).any() and keep.any()
    assert all(h.dtype == torch.bool and (h.sum(1) == h.shape[1] // 2).all() for h in heads)
    ref = small(family).eval()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "sparse_gates" not in k})
    sparse_ops.patch(ref)
    sparse_ops.set_masks(ref, heads=heads, layers=keep)
    with torch.no_grad():
        out_r = output(family, ref, ids, am)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    assert st == sparse_ops.stats(ref)
    assert st["heads"] == pytest.approx(0.5 * float(keep.float().mean()))


def test_routed_torch_encoder_inference_equals_set_masks():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(24, 4, 40, dropout=0.0, batch_first=False)
    enc = torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    ref = copy.deepcopy(enc)
    sparse_ops.patch(enc, gate=ROUTED)
    _randomize(enc)
    x = torch.randn(6, 5, 24)  # [T, B, E]
    pad = torch.zeros(5, 6, dtype=torch.bool)
    pad[2, 4:] = True
    seen = []
    hooks = [l.register_forward_pre_hook(lambda mod, args: seen.append(args[0].transpose(0, 1))) for l in enc.layers]
    with torch.no_grad():
        y = enc(x, src_key_padding_mask=pad)
    for h in hooks:
        h.remove()
    pooled = [l.sparse_gates.heads.pool(s, ~pad) for l, s in zip(enc.layers, seen)]
    heads = [l.sparse_gates.heads.mask(p) for l, p in zip(enc.layers, pooled)]
    keep = torch.stack([l.sparse_gates.layer.mask(p) for l, p in zip(enc.layers, pooled)], 1)
    assert (~keep).any() and keep.any()
    sparse_ops.patch(ref)
    sparse_ops.set_masks(ref, heads=heads, layers=keep)
    with torch.no_grad():
        y_r = ref(x, src_key_padding_mask=pad)
    torch.testing.assert_close(y[~pad.t()], y_r[~pad.t()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_a_samples_route_does_not_depend_on_its_batchs_padding(family):
    """The routers average the real tokens only (the patched layers read them from the attention
    mask): the same sample, padded by 2 or by 7, takes the same route and gives the same output on
    its real tokens."""
    model = routed(family).eval()
    ids, am = batch(B=3, T=7)
    ids2 = torch.cat([ids, torch.full((3, 5), 7)], 1)
    am2 = torch.cat([am, torch.zeros(3, 5, dtype=am.dtype)], 1)
    with torch.no_grad():
        a = output(family, model, ids, am)
        sa = sparse_ops.stats(model)
        b = output(family, model, ids2, am2)
        sb = sparse_ops.stats(model)
    real = am.bool()
    torch.testing.assert_close(a[real], b[:, :7][real], rtol=1e-4, atol=1e-4)
    assert sa["layers"] == sb["layers"] and sa["heads"] == sb["heads"]


def test_routed_llama_generation_with_a_cache_equals_the_reference():
    """Greedy generation: every step routes its own token (per sample, per step); a skipped layer
    still appends its K/V and every KV head is cached, so later steps see a whole cache."""
    model = routed("llama").eval()
    gates = [copy.deepcopy(l.sparse_gates) for l in layer_list("llama", model)]
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = model.generate(ids, **kw)
        sparse_ops.unpatch(model)
        hooks = reference_hooks("llama", model, gates, model.config.num_attention_heads)
        want = model.generate(ids, **kw)
    for h in hooks:
        h.remove()
    assert torch.equal(got, want)


def test_layer_router_keep_fraction_follows_the_budget():
    model = small("bert").train()
    sparse_ops.patch(model, gate=ROUTED)
    ids, am = batch(B=6)
    output("bert", model, ids, am)
    # Layer routers start on; FFN columns have no gate of their own, so they follow the layer's.
    assert keep_fractions(model) == {"heads": 0.5, "ffn": 1.0, "layers": 1.0}
    budget_loss(model, layers=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    for _ in range(30):
        output("bert", model, ids, am)
        loss = budget_loss(model, layers=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        output("bert", model, ids, am)
    kf = keep_fractions(model)
    assert kf["layers"] < 0.5
    assert kf["heads"] == pytest.approx(0.5 * kf["layers"]) and kf["ffn"] == pytest.approx(kf["layers"])
    assert sparse_ops.stats(model)["layers"] == pytest.approx(kf["layers"])


def test_routers_in_state_dict_and_unpatch():
    model = routed("bert")
    keys = [k for k in model.state_dict() if "sparse_gates" in k]
    assert "encoder.layer.0.sparse_gates.heads.score.weight" in keys
    assert "encoder.layer.2.sparse_gates.layer.score.bias" in keys
    sparse_ops.unpatch(model)
    assert not any("sparse_gates" in k for k in model.state_dict())


def test_sample_router_unit_behaviour():
    r = SampleRouter(8, 6, keep=0.5)
    x = torch.randn(3, 5, 8)
    p = r.pool(x)
    assert not p.requires_grad or not x.requires_grad
    torch.testing.assert_close(p, torch.nn.functional.layer_norm(x.mean(1), (8,)))
    torch.testing.assert_close(r.pool(x * 100.0), p, rtol=1e-4, atol=1e-4)  # scale-free
    assert torch.equal(r.mask(p), topk_mask(r(p), 3))
    g = r.gate(p)
    assert torch.equal(g, r.mask(p).float()) and g.requires_grad
    assert float(r.expected()) == 0.5
    for keep, k in ((0.0, 0), (1.0, 6), (1 / 6, 1)):
        assert int(SampleRouter(8, 6, keep).mask(p).sum(1).unique()) == k
    lay = SampleRouter(8, 1, keep=None)
    assert float(lay.expected()) == 1.0  # no forward yet: the bias alone (1: on)
    assert lay.mask(p).shape == (3,) and bool(lay.mask(p).all())  # bias 1: on at the start
    assert float(lay.expected()) == 1.0


def test_router_errors_name_the_problem():
    m = small("bert")
    with pytest.raises(ValueError, match="layer router learns"):
        sparse_ops.patch(m, gate={"layers": ("router", 0.5)})
    with pytest.raises(ValueError, match="only an FFN router takes a rank"):
        sparse_ops.patch(m, gate={"heads": ("router", 0.5, 8)})
    with pytest.raises(ValueError, match=r"gate\['heads'\]'s router keep must be in"):
        sparse_ops.patch(m, gate={"heads": ("router", 1.5)})
    with pytest.raises(TypeError, match="per sample.*give \\('router', keep\\)"):
        sparse_ops.patch(m, gate={"ffn": ("router", 0.5, 16)})
    assert getattr(m, "_sparse_patch", None) is None
    with pytest.raises(ValueError, match="positive int"):
        SampleRouter(0, 4)
    with pytest.raises(ValueError, match="keep must be None"):
        SampleRouter(8, 1, keep=0.5)
    with pytest.raises(ValueError, match=r"\[B, T, 8\]"):
        SampleRouter(8, 4).pool(torch.randn(2, 3, 7))


# ----------------------------------------------------------------- per-sample FFN routers
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_ffn_router_inference_equals_set_masks_with_the_routers_masks(family):
    model = routed(family, gate=ROUTED_FFN).eval()
    ids, am = batch(B=5)
    seen = []
    hooks = [l.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        for l in layer_list(family, model)]
    with torch.no_grad():
        out = output(family, model, ids, am)
    for h in hooks:
        h.remove()
    st = sparse_ops.stats(model)
    heads, ffn, keep = [], [], []
    for l, x in zip(layer_list(family, model), seen):
        r = l.sparse_gates
        p = r.heads.pool(x, am.bool())
        heads.append(r.heads.mask(p))
        ffn.append(r.ffn.mask(p))
        keep.append(r.layer.mask(p))
    keep = torch.stack(keep, 1)
    F_ = ffn[0].shape[1]
    assert all(f.dtype == torch.bool and f.shape == (5, F_) and (f.sum(1) == F_ // 2).all() for f in ffn)
    assert any(not (f == f[:1]).all() for f in ffn)  # the samples' columns differ
    ref = small(family).eval()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "sparse_gates" not in k})
    sparse_ops.patch(ref)
    sparse_ops.set_masks(ref, heads=heads, ffn=ffn, layers=keep)
    with torch.no_grad():
        out_r = output(family, ref, ids, am)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    assert st == sparse_ops.stats(ref)
    assert st["ffn"] == pytest.approx(float(keep.float().mean()) * (F_ // 2) / F_)


def test_ffn_router_torch_encoder_and_keep_fractions():
    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(24, 4, 40, dropout=0.0, batch_first=True), 2,
                                      enable_nested_tensor=False)
    sparse_ops.patch(enc, gate={"ffn": ("router", 0.25)})
    _randomize(enc)
    assert keep_fractions(enc) == {"heads": None, "ffn": 0.25, "layers": None}
    x = torch.randn(4, 6, 24, requires_grad=True)
    enc.train()
    enc(x).square().sum().backward()
    assert sparse_ops.stats(enc)["ffn"] == pytest.approx(0.25)
    assert all(l.sparse_gates.ffn.score.weight.grad.abs().sum() > 0 for l in enc.layers)
    enc.eval()
    with torch.no_grad():
        y = enc(x)
    r0 = enc.layers[0].sparse_gates.ffn
    m0 = r0.mask(r0.pool(x))  # layer 0's input is x: each sample's own 10 of the 40 columns
    assert m0.shape == (4, 40) and (m0.sum(1) == 10).all() and not (m0 == m0[:1]).all()
    assert sparse_ops.stats(enc)["ffn"] == pytest.approx(0.25)
    assert torch.isfinite(y).all()
