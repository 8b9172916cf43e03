"""sparse_ops.pruning: prune_layers, merge_layers and compact (docs: the pruning API spec).

Every expected value is computed here from the spec with plain PyTorch on the unmodified models:
forward hooks on the layer modules give each layer's input / output hidden states (block
influence, angular distance), autograd gives theta * grad (taylor), hand-built copies with
ModuleList entries deleted or replaced give the expected pruned / merged models, and a
simulation of the top-down merge scan (with the spec's similarity) gives the expected merge
windows. Nothing here calls the package's internals. Two tiny random models run everything: a
4-layer BERT (BertModel) and a 4-layer grouped-query LLaMA (LlamaForCausalLM, 6 heads, 2 KV heads).
The calibration set is a LongTensor batch and a dict batch whose attention_mask pads the ends
of two rows, so every "mean over non-padding tokens" is checked against its padded variant.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as Fn

import sparse_ops

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

L = 4
FAMILIES = ["bert", "llama"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is much faster than several (and than contending with other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- models and data
def make_bert(seed=0):
    # initializer_range 0.1 (HF's default 0.02 leaves these post-LayerNorm layers so close to the identity that
    # 1 - cos is ~5e-5 and differences between layers or from padding are below float32 resolution)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, initializer_range=0.1)
    return transformers.BertModel(cfg).eval()


def make_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=40, num_hidden_layers=L,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def make(family, seed=0):
    return make_bert(seed) if family == "bert" else make_llama(seed)


def calib(seed=1, T=8):
    """[LongTensor [2, T], dict with input_ids [3, T] and an attention_mask padding the ends of rows 1, 2]."""
    g = torch.Generator().manual_seed(seed)
    b1 = torch.randint(5, 100, (2, T), generator=g)
    ids = torch.randint(5, 100, (3, T), generator=g)
    am = torch.ones(3, T, dtype=torch.long)
    am[1, T - 3:] = 0
    am[2, T - 5:] = 0
    return [b1, {"input_ids": ids, "attention_mask": am}]


def kw(batch):
    return dict(batch) if isinstance(batch, dict) else {"input_ids": batch}


def token_mask(batch):
    """float [B, T]: 1 on real tokens, 0 on padding."""
    if isinstance(batch, dict):
        am = batch.get("attention_mask")
        return torch.ones(batch["input_ids"].shape, dtype=torch.float64) if am is None else (am != 0).double()
    return torch.ones(batch.shape, dtype=torch.float64)


def layers_of(model):
    if hasattr(model, "encoder"):
        return model.encoder.layer
    if hasattr(model, "bert"):
        return model.bert.encoder.layer
    return model.model.layers


def base_of(model):
    """The base model (its last_hidden_state is the 'final hidden state')."""
    return model.model if hasattr(model, "lm_head") else getattr(model, "bert", model)


def is_llama(model):
    return hasattr(model, "lm_head")


def outputs(model, batch):
    with torch.no_grad():
        if is_llama(model):
            return model(**kw(batch), use_cache=False).logits
        return model(**kw(batch)).last_hidden_state


def assert_outputs_equal(a, b, cal, atol=1e-5):
    """Same outputs on every batch of cal (real tokens; padding rows' values are not part of any contract)."""
    for batch in cal:
        oa, ob = outputs(a, batch), outputs(b, batch)
        assert oa.shape == ob.shape
        m = token_mask(batch).bool()[..., None]
        torch.testing.assert_close(oa * m, ob * m, rtol=1e-5, atol=atol)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, sd, outs, cal):
    assert len(layers_of(model)) == L
    assert model.config.num_hidden_layers == L
    now = model.state_dict()
    assert list(now) == list(sd)
    for k, v in sd.items():
        assert torch.equal(now[k], v), k
    for batch, o in zip(cal, outs):
        torch.testing.assert_close(outputs(model, batch), o, rtol=0, atol=0)
    if is_llama(model):
        assert [layer.self_attn.layer_idx for layer in layers_of(model)] == list(range(L))


def with_layers(model, new_layers):
    """A deep copy of model whose layer ModuleList holds new_layers (config / layer_idx renumbered)."""
    m = copy.deepcopy(model)
    lst = layers_of(m)
    while len(lst):
        del lst[len(lst) - 1]
    for layer in new_layers:
        lst.append(layer)
    m.config.num_hidden_layers = len(lst)
    if is_llama(m):
        for j, layer in enumerate(lst):
            layer.self_attn.layer_idx = j
    return m


def delete_layers(model, removed):
    orig = layers_of(model)
    return with_layers(model, [copy.deepcopy(orig[i]) for i in range(len(orig)) if i not in set(removed)])


def layer_io(model, batch):
    """[(h_in, h_out)] of every layer for one batch, captured with forward hooks (float64)."""
    ins, outs, hooks = {}, {}, []
    for i, layer in enumerate(layers_of(model)):
        def pre(mod, args, kwargs, i=i):
            ins[i] = (args[0] if args else kwargs["hidden_states"]).detach().double().clone()

        def post(mod, args, out, i=i):
            outs[i] = (out if torch.is_tensor(out) else out[0]).detach().double().clone()
        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.register_forward_hook(post))
    try:
        outputs(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return [(ins[i], outs[i]) for i in range(len(ins))]


# ----------------------------------------------------------------------------- oracles
def bi_oracle(model, cal, exclude_pad=True):
    n = len(layers_of(model))
    s, cnt = torch.zeros(n, dtype=torch.float64), 0.0
    for batch in cal:
        m = token_mask(batch) if exclude_pad else torch.ones_like(token_mask(batch))
        for i, (hi, ho) in enumerate(layer_io(model, batch)):
            s[i] += ((1 - Fn.cosine_similarity(hi, ho, dim=-1)) * m).sum()
        cnt += float(m.sum())
    return (s / cnt).tolist()


def angular_oracle(model, cal, n, exclude_pad=True):
    nl = len(layers_of(model))
    s, cnt = torch.zeros(nl - n + 1, dtype=torch.float64), 0.0
    for batch in cal:
        m = token_mask(batch) if exclude_pad else torch.ones_like(token_mask(batch))
        io = layer_io(model, batch)
        hs = [hi for hi, _ in io] + [io[-1][1]]  # h_L = output of the last layer (before a final norm)
        for l in range(nl - n + 1):
            c = Fn.cosine_similarity(hs[l], hs[l + n], dim=-1).clamp(-1, 1)
            s[l] += (torch.arccos(c) / math.pi * m).sum()
        cnt += float(m.sum())
    return (s / cnt).tolist()


def lm_labels(batch):
    ids = kw(batch)["input_ids"]
    labels = ids.clone()
    labels[token_mask(batch) == 0] = -100
    return labels


def taylor_oracle(model, cal, weights):
    """|sum over layer i's params of theta * dL/dtheta| with L = sum_b weights[b] * loss_b."""
    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    for batch, w in zip(cal, weights):
        args = kw(batch)
        if "labels" not in args:
            args["labels"] = lm_labels(batch)
        (m(**args).loss * w).backward()
    scores = []
    for layer in layers_of(m):
        tot = torch.zeros((), dtype=torch.float64)
        for p in layer.parameters():
            if p.grad is not None:
                tot += (p.detach().double() * p.grad.double()).sum()
        scores.append(abs(float(tot)))
    return scores


def merged_layer(orig_layers, low, high):
    """theta_low + sum_{i=low+1..high} (theta_i - theta_low), every theta from the original layers."""
    new = copy.deepcopy(orig_layers[low])
    params = [dict(orig_layers[i].named_parameters()) for i in range(low, high + 1)]
    with torch.no_grad():
        for name, p in new.named_parameters():
            base = params[0][name].detach()
            p.copy_(base + sum((params[j][name].detach() - base for j in range(1, len(params))),
                               torch.zeros_like(base)))
    return new


def merged_model(model, windows):
    """The original model with every window [low, ..., high] (original indices) replaced by its merged layer."""
    orig = layers_of(model)
    starts = {w[0]: w for w in windows}
    inside = {i for w in windows for i in w}
    new = []
    for i in range(len(orig)):
        if i in starts:
            new.append(merged_layer(orig, starts[i][0], starts[i][-1]))
        elif i not in inside:
            new.append(copy.deepcopy(orig[i]))
    return with_layers(model, new)


def final_hidden(model, batch):
    with torch.no_grad():
        args = kw(batch)
        if is_llama(model):
            args["use_cache"] = False
        return base_of(model)(**args).last_hidden_state.double()


class MergeSim:
    """The spec's top-down sliding-window scan, with the candidate similarities memoised."""

    def __init__(self, model, cal):
        self.model, self.cal = model, cal
        self.ref = [final_hidden(model, b) for b in cal]
        self.memo = {}

    def sim(self, committed, low, high):
        key = (tuple(map(tuple, committed)), low, high)
        if key not in self.memo:
            cand = merged_model(self.model, committed + [list(range(low, high + 1))])
            s, cnt = 0.0, 0.0
            for batch, ref in zip(self.cal, self.ref):
                m = token_mask(batch)
                s += float((Fn.cosine_similarity(final_hidden(cand, batch), ref, dim=-1) * m).sum())
                cnt += float(m.sum())
            self.memo[key] = s / cnt
        return self.memo[key]

    def run(self, threshold):
        """(committed windows, similarities seen on the way)."""
        n = len(layers_of(self.model))
        committed, seen = [], []
        high, low = n - 1, n - 2
        while True:
            if low < 0:  # reached the bottom: the last accepted window is committed too
                if high - low >= 2:
                    committed.append(list(range(low + 1, high + 1)))
                break
            s = self.sim(committed, low, high)
            seen.append(s)
            if s >= threshold:
                low -= 1
            else:
                if high - low >= 2:
                    committed.append(list(range(low + 1, high + 1)))
                high, low = low, low - 1
        return committed, seen

    def breakpoints(self):
        """Every similarity the scan can meet (explored from thresholds on both sides of each one found)."""
        todo, done = [-1.0, 1.01], set()
        while todo:
            t = todo.pop()
            if t in done:
                continue
            done.add(t)
            _, seen = self.run(t)
            for s in seen:
                for u in (s, s + 1e-9, s - 1e-9):
                    if u not in done:
                        todo.append(u)
        return sorted(set(self.memo.values()))


def n_layers_after(windows, n=L):
    return n - sum(len(w) - 1 for w in windows)


def canon(windows):
    return sorted([list(map(int, w)) for w in windows])


def greedy_no_cache(model, ids, steps):
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


def check_generate(small):
    small.generation_config.eos_token_id = None  # five new tokens every time: comparable token for token
    small.generation_config.pad_token_id = 0
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = small.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(got, greedy_no_cache(small, ids, 5))


@pytest.fixture
def pruning():
    import sparse_ops.pruning as p
    return p


# ----------------------------------------------------------------------------- prune_layers
@pytest.mark.parametrize("family", FAMILIES)
def test_block_influence_scores_and_choice(pruning, family):
    model, cal = make(family), calib()
    sd, outs = snapshot(model), [outputs(model, b) for b in cal]
    oracle = bi_oracle(model, cal)
    order = sorted(range(L), key=lambda i: oracle[i])
    assert oracle[order[2]] - oracle[order[1]] > 1e-4  # the choice of 2 is well separated
    small = pruning.prune_layers(model, 2, cal, score="block_influence")
    assert len(small.sparse_ops_layer_scores) == L
    assert small.sparse_ops_layer_scores == pytest.approx(oracle, abs=1e-5, rel=0)
    assert small.config.sparse_ops_removed_layers == sorted(order[:2])
    assert_untouched(model, sd, outs, cal)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_influence_excludes_padding(pruning, family):
    model, cal = make(family), calib()
    excl, incl = bi_oracle(model, cal, True), bi_oracle(model, cal, False)
    assert max(abs(a - b) for a, b in zip(excl, incl)) > 1e-4  # padding changes these scores
    got = pruning.prune_layers(model, 1, cal, score="block_influence").sparse_ops_layer_scores
    assert got == pytest.approx(excl, abs=1e-5, rel=0)
    assert got != pytest.approx(incl, abs=1e-5, rel=0)
    # an all-padding tail on the same tokens adds nothing: the padded rows cut to their real tokens
    ids, am = cal[1]["input_ids"], cal[1]["attention_mask"]
    if family == "llama":  # causal: a row's real prefix does not see its padding
        rows = [ids[r, : int(am[r].sum())][None] for r in range(ids.shape[0])]
        got2 = pruning.prune_layers(model, 1, [cal[0]] + rows, score="block_influence").sparse_ops_layer_scores
        assert got2 == pytest.approx(excl, abs=1e-5, rel=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_layers_equals_hand_deleted_copy(pruning, family):
    model, cal = make(family), calib()
    sd, outs = snapshot(model), [outputs(model, b) for b in cal]
    small = pruning.prune_layers(model, 2, cal, score="block_influence")
    removed = small.config.sparse_ops_removed_layers
    assert len(removed) == 2 and removed == sorted(set(removed))
    assert len(layers_of(small)) == L - 2
    assert small.config.num_hidden_layers == L - 2
    if family == "llama":
        assert [layer.self_attn.layer_idx for layer in layers_of(small)] == [0, 1]
    ref = delete_layers(model, removed)
    assert_outputs_equal(small, ref, cal, atol=1e-6)
    sd_small, sd_ref = small.state_dict(), ref.state_dict()
    assert list(sd_small) == list(sd_ref)
    for k in sd_ref:
        assert torch.equal(sd_small[k], sd_ref[k]), k
    # a deep copy: no storage shared with the original
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in ptrs for p in small.parameters())
    assert_untouched(model, sd, outs, cal)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_layers_zero(pruning, family):
    model, cal = make(family), calib()
    small = pruning.prune_layers(model, 0, cal, score="block_influence")
    assert small is not model
    assert small.config.sparse_ops_removed_layers == []
    assert small.config.num_hidden_layers == L and len(layers_of(small)) == L
    assert_outputs_equal(small, model, cal, atol=0)


def test_llama_generate_after_prune(pruning):
    model, cal = make_llama(), calib()
    small = pruning.prune_layers(model, 2, cal, score="block_influence")
    removed = small.config.sparse_ops_removed_layers
    assert removed != [2, 3], "this seed must remove a layer below the top for layer_idx to matter"
    check_generate(small)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [1, 2])
def test_angular_removes_argmin_block(pruning, family, n):
    model, cal = make(family), calib()
    sd, outs = snapshot(model), [outputs(model, b) for b in cal]
    d = angular_oracle(model, cal, n)
    ranked = sorted(d)
    assert ranked[1] - ranked[0] > 1e-5
    lstar = d.index(ranked[0])
    small = pruning.prune_layers(model, n, cal, score="angular")
    assert len(small.sparse_ops_layer_scores) == L - n + 1
    assert small.sparse_ops_layer_scores == pytest.approx(d, abs=1e-5, rel=0)
    assert small.config.sparse_ops_removed_layers == list(range(lstar, lstar + n))
    assert small.config.num_hidden_layers == L - n
    assert_outputs_equal(small, delete_layers(model, range(lstar, lstar + n)), cal, atol=1e-6)
    if family == "llama":
        assert [layer.self_attn.layer_idx for layer in layers_of(small)] == list(range(L - n))
    assert_untouched(model, sd, outs, cal)
    # padding is excluded from the mean here too
    incl = angular_oracle(model, cal, n, exclude_pad=False)
    if max(abs(a - b) for a, b in zip(d, incl)) > 1e-4:
        assert small.sparse_ops_layer_scores != pytest.approx(incl, abs=1e-5, rel=0)


def test_taylor_scores_single_batch(pruning):
    model = make_llama()
    cal = [calib()[1]]  # one dict batch with padding: labels = input_ids, -100 on padding
    sd, outs = snapshot(model), [outputs(model, b) for b in cal]
    oracle = taylor_oracle(model, cal, [1.0])
    # the padding labels matter: with them counted the scores differ
    unpadded = taylor_oracle(model, [{"input_ids": cal[0]["input_ids"], "attention_mask": cal[0]["attention_mask"],
                                      "labels": cal[0]["input_ids"]}], [1.0])
    assert max(abs(a - b) for a, b in zip(oracle, unpadded)) > 1e-3 * max(oracle)
    small = pruning.prune_layers(model, 2, cal, score="taylor")
    got = small.sparse_ops_layer_scores
    assert len(got) == L
    assert got == pytest.approx(oracle, rel=1e-4, abs=1e-6 * max(oracle))
    order = sorted(range(L), key=lambda i: oracle[i])
    assert oracle[order[2]] - oracle[order[1]] > 1e-3 * max(oracle)
    assert small.config.sparse_ops_removed_layers == sorted(order[:2])
    assert_outputs_equal(small, delete_layers(model, sorted(order[:2])), cal, atol=1e-6)
    assert_untouched(model, sd, outs, cal)


def test_taylor_scores_two_batches(pruning):
    """L over several batches: the spec says 'the model's loss on calib', which may be read as the sum of the
    per-batch losses, their mean or the token-weighted mean over all batches; the test accepts any of the three
    (the first two differ by a scale only) but requires one."""
    model, cal = make_llama(), calib()
    got = pruning.prune_layers(model, 1, cal, score="taylor").sparse_ops_layer_scores
    ntok = [float((lm_labels(b)[:, 1:] != -100).sum()) for b in cal]
    variants = {"sum": [1.0, 1.0], "mean": [0.5, 0.5], "token-weighted": [t / sum(ntok) for t in ntok]}
    matches = []
    for name, w in variants.items():
        o = taylor_oracle(model, cal, w)
        if got == pytest.approx(o, rel=1e-4, abs=1e-6 * max(o)):
            matches.append(name)
    assert matches, f"taylor scores {got} match none of {list(variants)}"
    print("taylor over two batches matches:", matches)


def test_taylor_leaves_no_grads_on_the_original(pruning):
    model, cal = make_llama(), calib()
    sd, outs = snapshot(model), [outputs(model, b) for b in cal]
    pruning.prune_layers(model, 1, cal, score="taylor")
    assert all(p.grad is None for p in model.parameters())
    assert_untouched(model, sd, outs, cal)


def test_taylor_encoder_with_labels(pruning):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, initializer_range=0.1, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    b = calib()[1]
    cal = [dict(b, labels=torch.tensor([0, 2, 1]))]
    oracle = taylor_oracle(model, cal, [1.0])
    small = pruning.prune_layers(model, 1, cal, score="taylor")
    assert small.sparse_ops_layer_scores == pytest.approx(oracle, rel=1e-4, abs=1e-6 * max(oracle))
    assert small.config.sparse_ops_removed_layers == [min(range(L), key=lambda i: oracle[i])]
    assert len(small.bert.encoder.layer) == L - 1


@pytest.mark.parametrize("cal", [calib(), [calib()[1]], [calib()[0]]], ids=["mixed", "dict", "tensor"])
def test_taylor_encoder_without_labels_raises(pruning, cal):
    with pytest.raises(ValueError):
        pruning.prune_layers(make_bert(), 1, cal, score="taylor")


def test_prune_layers_bad_arguments(pruning):
    model, cal = make_bert(), calib()
    for n in (-1, L):
        with pytest.raises((ValueError, TypeError)):
            pruning.prune_layers(model, n, cal)
    with pytest.raises(TypeError, match="Linear"):
        pruning.prune_layers(torch.nn.Linear(3, 3), 1, cal)


# ----------------------------------------------------------------------------- merge_layers
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_always_accept_one_layer_against_original_base(pruning, family):
    """threshold -1: every candidate is accepted; the window reaching layer 0 is committed at the bottom and the
    merged layer is theta_0 + sum_i (theta_i - theta_0) over the original layers (not the running copy, which
    would end up equal to the top layer)."""
    model, cal = make(family), calib()
    sd, outs = snapshot(model), [outputs(model, b) for b in cal]
    small = pruning.merge_layers(model, cal, -1.0)
    assert canon(small.config.sparse_ops_merged_layers) == [[0, 1, 2, 3]]
    assert len(layers_of(small)) == 1 and small.config.num_hidden_layers == 1
    if family == "llama":
        assert layers_of(small)[0].self_attn.layer_idx == 0
    orig = layers_of(model)
    got = dict(layers_of(small)[0].named_parameters())
    top = dict(orig[L - 1].named_parameters())
    expected = dict(merged_layer(orig, 0, L - 1).named_parameters())
    assert set(got) == set(expected)
    for name, p in expected.items():
        torch.testing.assert_close(got[name], p, rtol=0, atol=1e-6, msg=name)
    # the running-copy variant differs from this one
    assert any((expected[n] - top[n]).abs().max() > 1e-3 for n in expected)
    assert_outputs_equal(small, merged_model(model, [[0, 1, 2, 3]]), cal, atol=1e-6)
    assert_untouched(model, sd, outs, cal)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_never_accept_keeps_all(pruning, family):
    model, cal = make(family), calib()
    small = pruning.merge_layers(model, cal, 1.01)
    assert small is not model
    assert small.config.sparse_ops_merged_layers == []
    assert len(layers_of(small)) == L and small.config.num_hidden_layers == L
    assert_outputs_equal(small, model, cal, atol=0)


def pick_threshold(sim, pred):
    """A threshold midway between two adjacent breakpoints (margin > 1e-4 from each) whose simulated result
    satisfies pred."""
    bps = sim.breakpoints()
    for a, b in zip(bps, bps[1:]):
        if b - a > 2e-4:
            t = (a + b) / 2
            w, _ = sim.run(t)
            if pred(w):
                return t, w
    return None, None


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_mid_threshold_equals_simulation(pruning, family):
    model, cal = make(family), calib()
    sd, outs = snapshot(model), [outputs(model, b) for b in cal]
    sim = MergeSim(model, cal)
    # a threshold where some window is merged and some layers stay apart
    t, w = pick_threshold(sim, lambda w: len(w) >= 1 and n_layers_after(w) >= 2)
    assert t is not None, f"no mid threshold found; breakpoints {sim.breakpoints()}"
    small = pruning.merge_layers(model, cal, t)
    assert canon(small.config.sparse_ops_merged_layers) == canon(w), f"threshold {t}"
    n = n_layers_after(w)
    assert len(layers_of(small)) == n and small.config.num_hidden_layers == n
    if family == "llama":
        assert [layer.self_attn.layer_idx for layer in layers_of(small)] == list(range(n))
    assert_outputs_equal(small, merged_model(model, w), cal, atol=1e-5)
    assert_untouched(model, sd, outs, cal)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_window_reaching_bottom_is_committed(pruning, family):
    """A threshold where the scan's last accepted window reaches layer 0 and is not the whole stack (so it is
    committed only by the bottom rule)."""
    model, cal = make(family), calib()
    sim = MergeSim(model, cal)
    t, w = pick_threshold(sim, lambda w: any(x[0] == 0 and len(x) >= 2 for x in w) and n_layers_after(w) >= 2)
    if t is None:
        pytest.skip(f"no threshold whose bottom window is partial; breakpoints {sim.breakpoints()}")
    small = pruning.merge_layers(model, cal, t)
    assert canon(small.config.sparse_ops_merged_layers) == canon(w), f"threshold {t}"
    assert_outputs_equal(small, merged_model(model, w), cal, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_merge_num_layers(pruning, family, k):
    model, cal = make(family), calib()
    small = pruning.merge_layers(model, cal, None, num_layers=k)
    w = small.config.sparse_ops_merged_layers
    n = len(layers_of(small))
    assert n <= k
    assert small.config.num_hidden_layers == n == n_layers_after(w)
    if family == "llama":
        assert [layer.self_attn.layer_idx for layer in layers_of(small)] == list(range(n))
    assert_outputs_equal(small, merged_model(model, canon(w)), cal, atol=1e-5)
    # the highest threshold with <= k layers: when the layer count is monotone in the threshold, the result is
    # the scan's at the largest breakpoint s* with <= k layers (or at a breakpoint within 1e-3 below it)
    sim = MergeSim(model, cal)
    bps = sim.breakpoints()
    counts = [n_layers_after(sim.run(s)[0]) for s in bps]
    if all(a <= b for a, b in zip(counts, counts[1:])):
        ok = [s for s, c in zip(bps, counts) if c <= k]
        assert ok
        s_star = max(ok)
        accepted = [canon(sim.run(s)[0]) for s in bps if s_star - 1e-3 <= s <= s_star]
        accepted.append(canon(sim.run(s_star - 1e-3)[0]))
        assert canon(w) in accepted, (w, s_star, bps, counts)


def test_llama_generate_after_merge(pruning):
    model, cal = make_llama(), calib()
    small = pruning.merge_layers(model, cal, None, num_layers=2)
    assert len(layers_of(small)) <= 2
    check_generate(small)


# ----------------------------------------------------------------------------- compact
def bert_masks(case):
    H, F = 4, 48
    g = torch.Generator().manual_seed(3)
    if case == "edge":
        heads = [torch.zeros(H, dtype=torch.bool),                       # all heads off
                 torch.tensor([False, False, True, False]),              # a single head
                 torch.rand(H, generator=g) < 0.5,                       # (layer off)
                 torch.tensor([True, False, True, True])]
        ffn = [torch.rand(F, generator=g) < 0.5,
               torch.zeros(F, dtype=torch.bool),                         # all columns off
               torch.rand(F, generator=g) < 0.5,
               torch.tensor([40, 3, 17, 0, 29, 8, 46, 11])]              # int64 indices, unsorted
        layers = torch.tensor([True, True, False, True])
    else:
        heads = [None] + [torch.rand(H, generator=g) < 0.5 for _ in range(L - 1)]
        ffn = [torch.rand(F, generator=g) < 0.5 for _ in range(L - 1)] + [None]
        layers = None
    return heads, ffn, layers


def llama_masks(case):
    H, F = 6, 40   # KV groups: heads 0-2 -> KV head 0, heads 3-5 -> KV head 1
    g = torch.Generator().manual_seed(4)
    if case == "edge":
        heads = [torch.tensor([False, False, False, False, True, False]),  # single head; group 0 all off
                 torch.tensor([True, False, False, False, True, True]),    # uneven groups (1, 2)
                 torch.rand(H, generator=g) < 0.5,                         # (layer off)
                 torch.zeros(H, dtype=torch.bool)]                         # all heads off
        ffn = [torch.rand(F, generator=g) < 0.5,
               torch.zeros(F, dtype=torch.bool),                           # all columns off
               torch.rand(F, generator=g) < 0.5,
               torch.tensor([33, 2, 19, 7, 38, 0])]                        # int64 indices, unsorted
        layers = torch.tensor([True, True, False, True])
    else:
        heads = [torch.tensor([True, True, False, True, True, True]), None,
                 torch.tensor([False, True, False, False, False, False]), torch.rand(H, generator=g) < 0.5]
        ffn = [None] + [torch.rand(F, generator=g) < 0.5 for _ in range(L - 1)]
        layers = None
    return heads, ffn, layers


def n_on(mask, size):
    if mask is None:
        return size
    if mask.dtype == torch.int64:
        return mask.numel()
    return int(mask.sum())


def patched_masked(family, case):
    model = make(family)
    heads, ffn, layers = (bert_masks if family == "bert" else llama_masks)(case)
    m = copy.deepcopy(model)
    sparse_ops.patch(m)
    sparse_ops.set_masks(m, heads=heads, ffn=ffn, layers=layers)
    return model, m, heads, ffn, layers


def expected_shapes_and_count(model, heads, ffn, layers):
    """Per kept layer {attr path: (weight shape, edge)} and the expected parameter count, every off unit removed.
    edge marks the shapes of an all-off heads layer or an all-off FFN layer (zero rows / columns: stock
    Hugging Face BERT and LLaMA layers run with 0 heads and 0 FFN columns). LLaMA: the KV groups with a head on
    stay (k/v rows), and since stock LlamaAttention repeats each KV head for the same number of query heads,
    every group that stays has max-over-groups(heads on) query heads (the fewest a stock class allows)."""
    cfg = model.config
    E, H, F = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
    d = E // H
    llama = is_llama(model)
    kv = cfg.num_key_value_heads if llama else H
    per = H // kv
    orig = layers_of(model)
    total = sum(p.numel() for p in model.parameters())
    shapes = []
    for i in range(len(orig)):
        if layers is not None and not bool(layers[i]):
            total -= sum(p.numel() for p in orig[i].parameters())
            continue
        hm = heads[i] if heads[i] is not None else torch.ones(H, dtype=torch.bool)
        kf = n_on(ffn[i], F)
        eh, ef = not bool(hm.any()), kf == 0
        if llama:
            counts = hm.view(kv, per).sum(1)
            groups = int((counts > 0).sum())
            qh = groups * int(counts.max())
            s = {"self_attn.q_proj": ((qh * d, E), eh), "self_attn.k_proj": ((groups * d, E), eh),
                 "self_attn.v_proj": ((groups * d, E), eh), "self_attn.o_proj": ((E, qh * d), eh),
                 "mlp.gate_proj": ((kf, E), ef), "mlp.up_proj": ((kf, E), ef), "mlp.down_proj": ((E, kf), ef)}
            total -= (H - qh) * d * E * 2 + (kv - groups) * d * E * 2 + (F - kf) * E * 3
        else:
            kh = int(hm.sum())
            s = {"attention.self.query": ((kh * d, E), eh), "attention.self.key": ((kh * d, E), eh),
                 "attention.self.value": ((kh * d, E), eh), "attention.output.dense": ((E, kh * d), eh),
                 "intermediate.dense": ((kf, E), ef), "output.dense": ((E, kf), ef)}
            # q, k, v rows (+ biases), o columns; intermediate rows (+ bias), output columns
            total -= (H - kh) * d * (E + 1) * 3 + (H - kh) * d * E + (F - kf) * (E + 1) + (F - kf) * E
        shapes.append(s)
    return shapes, total


def get(mod, path):
    for a in path.split("."):
        mod = getattr(mod, a)
    return mod


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["edge", "random"])
def test_compact_equals_masked_model(pruning, family, case):
    model, m, heads, ffn, layers = patched_masked(family, case)
    cal = calib()
    ref = [outputs(m, b) for b in cal]
    small = pruning.compact(m)
    assert small is not m
    assert getattr(small, "_sparse_patch", None) is None
    assert not any(hasattr(mod, "_sparse_layer_state") for mod in small.modules())
    for batch, r in zip(cal, ref):
        o = outputs(small, batch)
        mask = token_mask(batch).bool()[..., None]
        torch.testing.assert_close(o * mask, r * mask, rtol=1e-5, atol=1e-5)
    shapes, _ = expected_shapes_and_count(model, heads, ffn, layers)
    n_kept = len(shapes)
    assert len(layers_of(small)) == n_kept
    if is_llama(small):
        assert [layer.self_attn.layer_idx for layer in layers_of(small)] == list(range(n_kept))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    # removed heads / columns are gone (the all-off layers' shapes: test_compact_all_off_units_removed)
    for j, s in enumerate(shapes):
        for path, (shape, edge) in s.items():
            if not edge:
                w = get(layers_of(small)[j], path).weight
                assert tuple(w.shape) == shape, (j, path, tuple(w.shape), shape)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["heads", "ffn", "layers"])
def test_compact_per_sample_masks_raise(pruning, family, kind):
    model = make(family)
    m = sparse_ops.patch(copy.deepcopy(model))
    B, H, F = 3, model.config.num_attention_heads, model.config.intermediate_size
    if kind == "heads":
        mask = torch.ones(B, H, dtype=torch.bool)
        mask[1, 0] = False
        sparse_ops.set_masks(m, heads=[mask] + [None] * (L - 1))
    elif kind == "ffn":
        mask = torch.ones(B, F, dtype=torch.bool)
        mask[0, 5] = False
        sparse_ops.set_masks(m, ffn=[None, mask] + [None] * (L - 2))
    else:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[2, 1] = False
        sparse_ops.set_masks(m, layers=mask)
    with pytest.raises(ValueError):
        pruning.compact(m)


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_save_and_load(pruning, family, tmp_path):
    model, m, *_ = patched_masked(family, "edge")
    small = pruning.compact(m)
    path = tmp_path / "compact"
    small.save_pretrained(path)
    cls = transformers.BertModel if family == "bert" else transformers.LlamaForCausalLM
    back = pruning.load_compact(path, cls)
    assert isinstance(back, cls)
    a, b = small.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    cal = calib()
    assert_outputs_equal(back.eval(), small, cal, atol=0)


def test_compact_llama_generate_with_cache(pruning):
    """Not spelled out in the spec beyond 'outputs equal': the compact LLaMA keeps working with a KV cache."""
    _, m, *_ = patched_masked("llama", "edge")
    check_generate(pruning.compact(m))


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_all_off_units_removed(pruning, family):
    """Spec: 'heads removed from q/k/v/o ..., FFN columns removed': also in a layer with every head off (0 q/k/v
    rows, 0 o columns; LLaMA: its KV groups gone too) or every FFN column off (0 rows / columns); the parameter
    count is the dense one less every removed unit."""
    model, m, heads, ffn, layers = patched_masked(family, "edge")
    small = pruning.compact(m)
    shapes, count = expected_shapes_and_count(model, heads, ffn, layers)
    bad = []
    for j, s in enumerate(shapes):
        for path, (shape, edge) in s.items():
            w = get(layers_of(small)[j], path).weight
            if tuple(w.shape) != shape:
                bad.append((j, path, tuple(w.shape), shape))
    assert not bad, f"(layer, linear, got, expected): {bad}"
    assert sum(p.numel() for p in small.parameters()) == count


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gate", ["hard_concrete", "threshold", "topk"])
def test_compact_folds_learned_gates(pruning, family, gate):
    """A model patched with learned gates, in eval: compact keeps the open units and folds each
    open unit's gate value into the output projection, so its outputs equal the gated model's."""
    model = make(family)
    m = sparse_ops.patch(copy.deepcopy(model), gate={"heads": gate, "ffn": gate})
    torch.manual_seed(3)
    with torch.no_grad():                 # spread the gates: some closed, open ones at values != 1
        for name, p in m.named_parameters():
            if "sparse_gates" in name:
                p.copy_(torch.randn_like(p) * 2.0)
    m.eval()
    cal = calib()
    ref = [outputs(m, b) for b in cal]
    small = pruning.compact(m)
    for batch, r in zip(cal, ref):
        mask = token_mask(batch).bool()[..., None]
        torch.testing.assert_close(outputs(small, batch) * mask, r * mask, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert not any("sparse_gates" in n for n, _ in small.named_parameters())


def test_compact_rejects_a_fractional_layer_gate(pruning):
    m = sparse_ops.patch(make("bert"), gate={"layers": "hard_concrete"})
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "sparse_gates" in name:
                p.fill_(0.3)                  # an open hard-concrete layer gate < 1 in eval
    m.eval()
    with pytest.raises(ValueError, match="layer gate"):
        pruning.compact(m)
