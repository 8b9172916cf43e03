"""Learned gates through patch(model, gate=...): sparse_ops.gates.UnitGate / LayerGates,
keep_fractions and budget_loss.

The reference is CoFi's way of training gates: the unpatched model computes everything and the
same gate values (deep copies of the patched model's gates, called in the same order, so
hard-concrete samples agree under one seed) multiply the head outputs before the output
projection, the FFN hidden units before the down projection, and blend each layer's output with
its input (x + g * (layer(x) - x)). Outputs and every weight gradient must agree; gate
gradients agree where the gate is open (a closed unit is skipped, so the gradient its own output
would give its gate is 0 by design; a hard-concrete gate clamped at 0 gets 0 either way; topk's
softmax surrogate mixes that 0 into every score's gradient, so its gate gradients are only checked
finite and nonzero).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import sparse_ops
from sparse_ops.gates import LayerGates, UnitGate, budget_loss, keep_fractions

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

KINDS = ["hard_concrete", "threshold", "topk"]


def small(family, seed=0):
    torch.manual_seed(seed)
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        return transformers.BertModel(cfg)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_inner=40, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def parts(family, model):
    """[(layer, module whose input is the heads' concatenated output, the FFN down projection)], H."""
    if family == "bert":
        ls = model.encoder.layer
        return [(l, l.attention.output.dense, l.output.dense) for l in ls], ls[0].attention.self.num_attention_heads
    if family == "llama":
        ls = model.model.layers
        return [(l, l.self_attn.o_proj, l.mlp.down_proj) for l in ls], model.config.num_attention_heads
    ls = model.transformer.h
    return [(l, l.attn.c_proj, l.mlp.c_proj) for l in ls], model.config.n_head


def output(family, model, ids, am):
    out = model(input_ids=ids, attention_mask=am)
    return out.last_hidden_state if family == "bert" else out.logits


def batch(B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, T - 2:] = 0
    return ids, am


def cofi_reference(family, model, gates):
    """Hooks on the unpatched `model` that apply `gates` (one LayerGates per layer) by mask
    multiplication; returns (the hook handles, the values each forward used per layer)."""
    hooks, used = [], []
    layers, H = parts(family, model)
    for (layer, o_in, down), lg in zip(layers, gates):
        vals = {}
        used.append(vals)

        def pre_layer(mod, args, kwargs, lg=lg, vals=vals):
            vals.clear()
            for kind in ("heads", "ffn", "layer"):  # the order begin_layer calls them in
                if lg.get(kind) is not None:
                    vals[kind] = lg.get(kind)()

        def pre_o(mod, args, vals=vals):
            if "heads" not in vals:
                return None
            h = args[0]
            b, t, e = h.shape
            return ((h.view(b, t, H, e // H) * vals["heads"][:, None]).view(b, t, e),)

        def pre_d(mod, args, vals=vals):
            return None if "ffn" not in vals else (args[0] * vals["ffn"],)

        def post(mod, args, kwargs, out, vals=vals):
            if "layer" not in vals:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            y = out if torch.is_tensor(out) else out[0]
            y = x + vals["layer"] * (y - x)
            return y if torch.is_tensor(out) else (y, *out[1:])
        hooks += [layer.register_forward_pre_hook(pre_layer, with_kwargs=True),
                  o_in.register_forward_pre_hook(pre_o), down.register_forward_pre_hook(pre_d),
                  layer.register_forward_hook(post, with_kwargs=True)]
    return hooks, used


def _run(family, kind, patched, seed=3):
    model = small(family).train()
    sparse_ops.patch(model, gate=kind)
    layers = [l for l, _, _ in parts(family, model)[0]]
    gates = [l.sparse_gates for l in layers]
    hooks = []
    if not patched:
        gates = [copy.deepcopy(g) for g in gates]
        sparse_ops.unpatch(model)
        hooks, _ = cofi_reference(family, model, gates)
    ids, am = batch()
    torch.manual_seed(seed)  # the hard-concrete samples
    out = output(family, model, ids, am)
    (out * am[..., None]).square().sum().backward()
    for h in hooks:
        h.remove()
    wgrads = {n: p.grad for n, p in model.named_parameters() if "sparse_gates" not in n}
    ggrads = [{n: p.grad for n, p in g.named_parameters()} for g in gates]
    torch.manual_seed(seed)
    vals = [{k: g.get(k)() for k in ("heads", "ffn", "layer") if g.get(k) is not None} for g in gates]
    return out, wgrads, ggrads, vals


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("kind", KINDS)
def test_gate_training_equals_the_mask_multiply_reference(family, kind):
    out, wg, gg, vals = _run(family, kind, True)
    out_r, wg_r, gg_r, vals_r = _run(family, kind, False)
    torch.testing.assert_close(out, out_r, rtol=1e-4, atol=1e-5)
    scale = max(g.abs().max() for g in wg_r.values() if g is not None)
    for n, g_ref in wg_r.items():
        g = wg[n]
        if g_ref is None:
            assert g is None or not g.any(), n
            continue
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * scale, msg=n)
    some_closed = False
    for lg, lg_r, v in zip(gg, gg_r, vals):
        for n, g_ref in lg_r.items():
            kind_key = n.split(".")[0]
            open_ = v[kind_key].detach() != 0
            some_closed |= bool((~open_).any())
            g = lg[n]
            assert g is not None and torch.isfinite(g).all(), n
            if kind == "topk":  # its softmax surrogate mixes every unit's dL/dgate into each score's
                assert g.any(), n  # gradient, and a skipped unit's dL/dgate is 0 here by design
                continue
            torch.testing.assert_close(torch.where(open_, g, 0), torch.where(open_, g_ref, 0), rtol=1e-4,
                                       atol=1e-5 * scale, msg=n)
            if kind == "threshold":  # a closed unit was skipped: its score's gradient is 0 (topk's softmax
                assert not g[~open_].any(), n  # surrogate couples the units, so closed ones get the open ones')
    if kind == "topk":
        assert some_closed


@pytest.mark.parametrize("kind", KINDS)
def test_stats_count_the_open_gates_and_keep_fractions(kind):
    model = small("bert").eval()
    sparse_ops.patch(model, gate=kind)
    ids, am = batch()
    with torch.no_grad():
        output("bert", model, ids, am)
    st = sparse_ops.stats(model)
    layers = model.encoder.layer
    with torch.no_grad():
        h_open = torch.stack([(l.sparse_gates.heads() != 0).float().mean() for l in layers]).mean().item()
        f_open = torch.stack([(l.sparse_gates.ffn() != 0).float().mean() for l in layers]).mean().item()
    if kind == "topk":
        assert (st["heads"], st["ffn"]) == (0.5, 0.5)
        assert keep_fractions(model) == {"heads": 0.5, "ffn": 0.5, "layers": None}
    else:
        assert st["heads"] == pytest.approx(h_open) and st["ffn"] == pytest.approx(f_open)


def test_hard_concrete_eval_keeps_the_expected_count_most_open():
    g = UnitGate("hard_concrete", 10).eval()
    with torch.no_grad():
        g.hc.log_alpha.copy_(torch.tensor([3., -3., 2., -2., 1., -1., 0.5, -0.5, 4., -4.]))
    expected = int(round(float(g.hc.l0_penalty().detach())))
    v = g()
    assert int((v != 0).sum()) == expected
    top = set(g.hc.log_alpha.topk(expected).indices.tolist())
    assert set(torch.nonzero(v).flatten().tolist()) == top
    assert torch.equal(g(), v)  # deterministic


@pytest.mark.parametrize("kind", ["hard_concrete", "threshold"])
def test_budget_loss_reaches_its_targets(kind):
    model = small("bert")
    sparse_ops.patch(model, gate={"heads": kind, "ffn": kind})
    budget_loss(model, heads=0.5, ffn=0.25)  # creates the multipliers
    gate_params = [p for n, p in model.named_parameters() if "sparse_gates" in n]
    with torch.no_grad():  # distinct units (a task loss would make them so): the budget alone cannot
        for p in gate_params:  # tell equal units apart
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    # As examples/train_gates.py: the gates by Adam, the multipliers by plain SGD (budget_loss's
    # docstring says why), the target warmed up over half the steps. With penalty=0 (CoFi's form
    # alone) this toy's FFN fraction swings 0.92 -> 0.31 -> 0.83 -> 0.17 -> 0.04 and ends at 0.33.
    opt = torch.optim.Adam(gate_params, lr=0.05)
    opt_budget = torch.optim.SGD(model.sparse_budget.parameters(), lr=0.05)
    after_warmup = []
    for i in range(400):
        opt.zero_grad()
        opt_budget.zero_grad()
        budget_loss(model, heads=0.5, ffn=0.25, step=i, warmup_steps=200).backward()
        opt.step()
        opt_budget.step()
        if i >= 250:
            after_warmup.append(keep_fractions(model))
    kf = keep_fractions(model)
    assert kf["heads"] == pytest.approx(0.5, abs=0.02) and kf["ffn"] == pytest.approx(0.25, abs=0.02)
    # Damped: L0 gates stay near the target once there, they do not swing through it. (Threshold
    # gates flip whole units on a sign, so their fraction still steps past the target and back.)
    assert kind != "hard_concrete" or all(abs(k["heads"] - 0.5) <= 0.03 and abs(k["ffn"] - 0.25) <= 0.03 for k in after_warmup)
    assert model.sparse_budget.heads_lambda[1] > 0  # lambda2's gradient is -(E - t)**2: it only ascends


def test_budget_loss_multipliers_ascend_and_the_warmup_target():
    model = small("bert")
    sparse_ops.patch(model, gate="threshold")
    e = keep_fractions(model)["ffn"]
    assert e == 1.0  # threshold gates start open
    loss = budget_loss(model, ffn=0.5, step=5, warmup_steps=10)  # target 0.75 at half the warm-up
    loss.backward()
    lam = model.sparse_budget.ffn_lambda
    assert lam.grad.tolist() == pytest.approx([-(e - 0.75), -(e - 0.75) ** 2])  # reversed: ascent
    assert budget_loss(model, ffn=0.5, step=20, warmup_steps=10, penalty=0.0).item() == 0.0  # multipliers still 0
    # The fixed quadratic weight: penalty * (E - t)**2 with the multipliers at 0.
    assert budget_loss(model, ffn=0.5, step=20, warmup_steps=10, penalty=3.0).item() == pytest.approx(3.0 * 0.25)


def test_layer_gates_scale_keep_fractions_and_skip_the_layer():
    model = small("bert").eval()
    sparse_ops.patch(model, gate="hard_concrete")
    with torch.no_grad():
        model.encoder.layer[1].sparse_gates.layer.hc.log_alpha.fill_(-10.0)  # expected keep ~0
    kf = keep_fractions(model)
    assert kf["layers"] == pytest.approx(2 / 3)  # what eval keeps: two layers open, one closed
    ids, am = batch()
    with torch.no_grad():
        output("bert", model, ids, am)
    st = sparse_ops.stats(model)
    assert st["layers"] == pytest.approx(2 / 3)
    assert st["heads"] <= 2 / 3 + 1e-6  # the skipped layer's heads count as not computed
    assert kf["heads"] == pytest.approx(st["heads"]) and kf["ffn"] == pytest.approx(st["ffn"])


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_hard_concrete_keep_fractions_count_what_eval_computes(family):
    """keep_fractions of L0 gates is the eval count (stats on a batch), with the expectation's
    gradient: a layer gate of expected keep 0.6-0.97 is open in eval and scales nothing down."""
    model = small(family).eval()
    sparse_ops.patch(model, gate="hard_concrete")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lg in (m for m in model.modules() if isinstance(m, LayerGates)):
            for kind in ("heads", "ffn"):
                a = lg.get(kind).hc.log_alpha
                a.copy_(torch.randn(a.shape, generator=gen) * 3)
            lg.get("layer").hc.log_alpha.fill_(1.0)  # E ~ 0.8: open in eval
    kf = keep_fractions(model)
    ids, am = batch()
    with torch.no_grad():
        output(family, model, ids, am)
    st = sparse_ops.stats(model)
    assert kf["layers"] == 1.0 == st["layers"]
    assert kf["heads"] == pytest.approx(st["heads"]) and kf["ffn"] == pytest.approx(st["ffn"])
    assert 0.1 < kf["ffn"] < 0.9  # the random gates closed some columns and kept others
    lg = next(m for m in model.modules() if isinstance(m, LayerGates))
    e = lg.get("ffn").expected()
    e.backward()
    hc = lg.get("ffn").hc
    assert torch.allclose(hc.log_alpha.grad, torch.autograd.grad(hc.l0_penalty() / hc.log_alpha.numel(),
                                                                 hc.log_alpha)[0])


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_nan_in_skipped_weights_stays_out_of_every_gradient(family):
    """A gate of exactly 0 costs nothing in backward either: the closed units' weights are never
    read (NaN there stays out of the output and of every gradient) and get exact zero gradients."""
    model = small(family).train()
    sparse_ops.patch(model, gate={"heads": ("topk", 0.5), "ffn": ("topk", 0.5)})
    layers, H = parts(family, model)
    closed = []
    with torch.no_grad():
        for layer, o_in, down in layers:
            hg, fg = layer.sparse_gates.heads(), layer.sparse_gates.ffn()
            hoff, foff = torch.nonzero(hg == 0).flatten(), torch.nonzero(fg == 0).flatten()
            D = o_in.weight.shape[1] // H if family != "gpt2" else None
            cols = (hoff[:, None] * D + torch.arange(D)).flatten()
            o_in.weight[:, cols] = float("nan")            # the closed heads' output-projection columns
            down.weight[:, foff] = float("nan")            # the closed columns of the down projection
            up = layer.intermediate.dense if family == "bert" else layer.mlp.gate_proj
            up.weight[foff] = float("nan")
            closed.append((o_in.weight, cols, down.weight, foff, up.weight))
    ids, am = batch()
    out = output(family, model, ids, am)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    for o_w, cols, d_w, foff, u_w in closed:
        assert not o_w.grad[:, cols].any() and not d_w.grad[:, foff].any() and not u_w.grad[foff].any()


def test_state_dict_has_the_gates_and_loads_back():
    a = small("bert")
    sparse_ops.patch(a, gate="threshold")
    with torch.no_grad():
        a.encoder.layer[0].sparse_gates.heads.score.copy_(torch.tensor([1., -1., 1., -1.]))
    sd = a.state_dict()
    assert "encoder.layer.0.sparse_gates.heads.score" in sd
    b = small("bert", seed=1)
    sparse_ops.patch(b, gate="threshold")
    b.load_state_dict(sd)
    assert torch.equal(b.encoder.layer[0].sparse_gates.heads(), torch.tensor([1., 0., 1., 0.]))
    sparse_ops.unpatch(b)
    assert not any("sparse_gates" in k for k in b.state_dict())
    assert isinstance(a.encoder.layer[2].sparse_gates, LayerGates)


def test_masks_still_apply_under_gates():
    model = small("bert").eval()
    sparse_ops.patch(model, gate="threshold")
    hm = torch.tensor([True, False, True, True])
    sparse_ops.set_masks(model, heads=[hm, None, None])
    ids, am = batch()
    with torch.no_grad():
        output("bert", model, ids, am)
    assert sparse_ops.stats(model)["heads"] == pytest.approx((3 + 4 + 4) / 12)


def test_gate_errors_name_the_problem():
    m = small("bert")
    with pytest.raises(ValueError, match="gate must be None"):
        sparse_ops.patch(m, gate="l0")
    with pytest.raises(ValueError, match="topk gate needs several units"):
        sparse_ops.patch(m, gate={"layers": "topk"})
    with pytest.raises(ValueError, match="only topk takes a keep"):
        sparse_ops.patch(m, gate={"ffn": ("threshold", 0.5)})
    with pytest.raises(ValueError, match="keep must be in"):
        sparse_ops.patch(m, gate={"ffn": ("topk", 1.5)})
    with pytest.raises(ValueError, match="heads=False"):
        sparse_ops.patch(m, heads=False, gate="threshold")
    with pytest.raises(ValueError, match="keys among"):
        sparse_ops.patch(m, gate={"head": "topk"})
    with pytest.raises(TypeError, match="a rank is for the per-token FFN router"):  # BERT: no gated MLP
        sparse_ops.patch(m, gate={"ffn": ("router", 0.5, 32)})
    assert getattr(m, "_sparse_patch", None) is None  # nothing converted by a failed call
    sparse_ops.patch(m)
    with pytest.raises(ValueError, match="already patched"):
        sparse_ops.patch(m, gate="topk")
    with pytest.raises(ValueError, match="no learned gates"):
        keep_fractions(m)
    sparse_ops.unpatch(m)
    sparse_ops.patch(m, gate="topk")
    with pytest.raises(ValueError, match="no layers gates"):
        budget_loss(m, layers=0.5)
    with pytest.raises(ValueError, match="keep fraction in"):
        budget_loss(m, heads=2.0)
    with pytest.raises(ValueError, match="at least one target"):
        budget_loss(m)
    for bad in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="penalty must be a finite number >= 0"):
            budget_loss(m, heads=0.5, penalty=bad)
    with pytest.raises(ValueError, match="step must be"):
        budget_loss(m, heads=0.5, warmup_steps=10)


def test_deepcopy_of_a_gated_model_is_independent():
    a = small("bert").eval()
    sparse_ops.patch(a, gate="hard_concrete")
    ids, am = batch()
    with torch.no_grad():
        ref = output("bert", a, ids, am)
    b = copy.deepcopy(a)
    with torch.no_grad():
        output("bert", b, ids, am)
        out = output("bert", b, ids, am)  # counts restart at each forward of the copy too
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert sparse_ops.stats(b) == sparse_ops.stats(a)
    assert b.encoder.layer[0]._sparse_state.gates is b.encoder.layer[0].sparse_gates
    sparse_ops.unpatch(b)
    assert type(a.encoder.layer[0]).__name__.startswith("Sparse") and not hasattr(b, "_sparse_patch")
    with torch.no_grad():
        torch.testing.assert_close(output("bert", a, ids, am), ref, rtol=0, atol=0)


_DDP_GATES = r"""
import os, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, sys.argv[4])
sys.path.insert(0, os.path.join(sys.argv[4], "tests"))
import sparse_ops
from sparse_ops.gates import budget_loss
from test_patch_gates import batch, parts, small
rank, world, family, routed = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[5] == "router"
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=rank, world_size=world)
model = small(family).train()
heads, lay = (("router", 0.5), "router") if routed else (("topk", 0.5), "threshold")
sparse_ops.patch(model, gate={"heads": heads, "ffn": "threshold", "layers": lay})
layers = [l for l, _, _ in parts(family, model)[0]]
with torch.no_grad():
    if routed:  # layer 1's router closes it for every sample
        layers[1].sparse_gates.layer.score.weight.zero_()
        layers[1].sparse_gates.layer.score.bias.fill_(-1.0)
    else:
        layers[1].sparse_gates.layer.score.fill_(-1.0)  # layer 1 closed for every sample
    layers[0].sparse_gates.ffn.score[::2] = -1.0     # half of layer 0's columns closed
budget_loss(model, ffn=0.5)  # the multipliers exist before DDP wraps the model
ddp = DDP(model)  # find_unused_parameters=False (the default)
opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
for step in range(3):
    ids, am = batch(B=2, seed=10 * rank + step)
    out = ddp(input_ids=ids, attention_mask=am)
    out = out.last_hidden_state + out.pooler_output[:, None] if family == "bert" else out.logits
    loss = out.square().mean() + budget_loss(model, ffn=0.5)  # the heads / layers multipliers: unused
    opt.zero_grad()
    loss.backward()
    opt.step()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
print("same", bool(torch.equal(gathered[0], gathered[1])), "layers", sparse_ops.stats(model)["layers"])
dist.destroy_process_group()
"""


@pytest.mark.parametrize("family,kind", [("bert", "static"), ("llama", "static"), ("bert", "router")])
def test_gate_training_under_ddp_without_find_unused_parameters(family, kind, tmp_path):
    """Two processes (gloo, fresh interpreters): a closed layer and closed units still give every
    parameter a gradient, so DistributedDataParallel needs no find_unused_parameters (it raises at
    the next step otherwise), and the replicas stay equal."""
    script = tmp_path / "ddp_gates.py"
    script.write_text(_DDP_GATES)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = 29700 + os.getpid() % 200 + len(family) + (20 if kind == "router" else 0)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", family, root, kind], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    fields = outs[0][0].split()
    assert fields[:2] == ["same", "True"] and float(fields[3]) == pytest.approx(2 / 3), outs[0][0]


@pytest.mark.parametrize("kind", ["threshold", "topk", "router"])
def test_gate_training_under_torch_compile_equals_eager(kind):
    """torch.compile(model) (aot_eager: the compiled forward and backward; value-dependent
    planning breaks the graph, it does not fail): two training steps of a gated model, the
    outputs, the gate and weight gradients, and the budget equal eager's."""
    def steps(compiled):
        torch._dynamo.reset()
        model = small("bert").train()
        sparse_ops.patch(model, gate=kind if kind != "router" else {"heads": ("router", 0.5), "layers": "router"})
        with torch.no_grad():
            if kind == "router":  # per-sample heads, and layer 1 skipped by some samples
                for i, layer in enumerate(model.encoder.layer):
                    layer.sparse_gates.heads.score.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(i))
                model.encoder.layer[1].sparse_gates.layer.score.weight.normal_(
                    0.0, 1.0, generator=torch.Generator().manual_seed(7))
                model.encoder.layer[1].sparse_gates.layer.score.bias.zero_()
            else:
                model.encoder.layer[0].sparse_gates.heads.score.copy_(torch.tensor([1.0, -1.0, 0.5, -0.5]))
        budget_loss(model, heads=0.5)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        outs = []
        for step in range(2):
            ids, am = batch(seed=step)
            out = run(input_ids=ids, attention_mask=am).last_hidden_state
            loss = (out * am[..., None]).square().mean() + budget_loss(model, heads=0.5)
            opt.zero_grad()
            loss.backward()
            outs.append(out.detach())
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            opt.step()
        return outs, grads, sparse_ops.stats(model)
    eo, eg, es = steps(False)
    co, cg, cs = steps(True)
    for a, b in zip(co, eo):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert cg.keys() == eg.keys() and any("sparse_gates" in n for n in cg)
    for n in eg:
        torch.testing.assert_close(cg[n], eg[n], rtol=1e-4, atol=1e-6, msg=n)
    assert cs == es
