"""Layer pruning and sliding-window layer merging: each returns a shallower copy of the model.

prune_layers(model, n, calib, score=...) removes n layers:
  "block_influence"  ShortGPT (Men et al. 2024): BI_i = E_token[1 - cos(h_in_i, h_out_i)], the
                     average over real (non-padding) tokens; the n lowest go.
  "angular"          Gromov et al. 2024: the contiguous block [l, l+n) whose input and output are
                     closest, d_l = E_token[arccos(cos(h_l, h_{l+n})) / pi].
  "taylor"           first-order: S_i = |sum over layer i's parameters of theta * dL/dtheta| on the
                     calibration loss (causal LM: next-token loss; otherwise the batches' labels).
merge_layers(model, calib, threshold) merges runs of adjacent layers into one (sliding-window
  merging): from the top down a window grows while the cosine similarity between the merged
  model's final hidden states and the original's stays >= threshold; a window of layers
  low..high becomes one layer theta_low + sum_{i>low} (theta_i - theta_low), every difference taken
  against the original layers.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch

from ._arch import arch, calib_batches, keep_layers, layer_io, run_base, token_cos, token_weights, weighted_mean

SCORES = ("block_influence", "angular", "taylor")


def _block_influence(a, batches):
    num = None
    den = 0.0
    for kw in batches:
        io, _ = layer_io(a, kw)
        w = token_weights(kw)
        vals = torch.stack([((1.0 - token_cos(x, y)) * w).sum() for x, y in io]).double()
        num = vals if num is None else num + vals
        den += float(w.sum())
    return (num / den).tolist()


def _angular(a, batches, n):
    L = len(a.layers)
    num = torch.zeros(L - n + 1, dtype=torch.float64)
    den = 0.0
    for kw in batches:
        io, _ = layer_io(a, kw)
        hs = [x for x, _ in io] + [io[-1][1]]          # h_0 .. h_L: the input of each layer, the last output
        w = token_weights(kw)
        for l in range(L - n + 1):
            c = token_cos(hs[l], hs[l + n]).clamp(-1.0, 1.0).double()
            num[l] += float((torch.arccos(c) / math.pi * w).sum())
        den += float(w.sum())
    return (num / den).tolist()


def _loss(model, a, kw, who):
    kw = dict(kw)
    if "labels" not in kw:
        if a.family != "llama":
            raise ValueError(f"sparse_ops.pruning.{who}: score='taylor' needs a loss; this encoder has none without "
                             f"labels: give calib batches as dicts with 'labels'")
        labels = kw["input_ids"].clone()
        if kw.get("attention_mask") is not None:
            labels[kw["attention_mask"] == 0] = -100
        kw["labels"] = labels
    if a.family == "llama":
        kw.setdefault("use_cache", False)
    out = model(**kw)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(f"sparse_ops.pruning.{who}: score='taylor' needs a model that returns a loss with labels "
                         f"(e.g. LlamaForCausalLM, BertForSequenceClassification); {type(model).__name__} returned "
                         f"none")
    return loss


def _taylor(model, a, batches, who):
    params = [[p for p in layer.parameters() if p.requires_grad] for layer in a.layers]
    flat = [p for ps in params for p in ps]
    acc = [torch.zeros((), dtype=torch.float64) for _ in params]
    for kw in batches:
        loss = _loss(model, a, kw, who)
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
        it = iter(grads)
        for i, ps in enumerate(params):
            for p in ps:
                g = next(it)
                if g is not None:
                    acc[i] = acc[i] + (p.detach().double() * g.double()).sum()
    return [abs(float(s)) for s in acc]


@contextlib.contextmanager
def _calib_mode(model):
    """Calibration runs in eval mode (no dropout); restores the mode after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def prune_layers(model, n, calib, score="block_influence"):
    """A copy of `model` without the n layers `score` ranks least important (see the module doc).
    The copy's config.num_hidden_layers and every attention's layer_idx are updated (generation
    with a KV cache works); config.sparse_ops_removed_layers lists the original indices removed and
    small.sparse_ops_layer_scores the per-layer scores (angular: per block start)."""
    who = "prune_layers"
    a = arch(model, who)
    L = len(a.layers)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < L:
        raise ValueError(f"sparse_ops.pruning.prune_layers: n (the number of layers to remove) must be an int in "
                         f"[0, {L}); got {n!r}")
    if score not in SCORES:
        raise ValueError(f"sparse_ops.pruning.prune_layers: score must be one of {SCORES}; got {score!r}")
    batches = calib_batches(calib, who)
    with _calib_mode(model):
        if score == "block_influence":
            s = _block_influence(a, batches)
            removed = sorted(sorted(range(L), key=lambda i: (s[i], i))[:n])
        elif score == "angular":
            s = _angular(a, batches, n)
            start = min(range(len(s)), key=lambda l: (s[l], l))
            removed = list(range(start, start + n))
        else:
            s = _taylor(model, a, batches, who)
            removed = sorted(sorted(range(L), key=lambda i: (s[i], i))[:n])
    small = keep_layers(model, [i for i in range(L) if i not in removed], who,
                        ("sparse_ops_removed_layers", removed))
    small.sparse_ops_layer_scores = s
    return small


# ----------------------------------------------------------------- sliding-window merging
def merged_layer(layers: list, low: int, high: int):
    """One layer: theta_low + sum_{i=low+1..high} (theta_i - theta_low), from the given (original)
    layers; every parameter of the layer (norms included) is merged; buffers are the base layer's."""
    out = copy.deepcopy(layers[low])
    base = dict(layers[low].named_parameters())
    others = [dict(layers[i].named_parameters()) for i in range(low + 1, high + 1)]
    with torch.no_grad():
        for name, p in out.named_parameters():
            acc = base[name].detach().clone()
            for ps in others:
                acc += ps[name].detach() - base[name].detach()
            p.copy_(acc)
    return out


def _similarity(a, work_layers, batches, refs):
    a.holder._modules[a.attr] = torch.nn.ModuleList(work_layers)
    vals, ws = [], []
    with torch.no_grad():
        for kw, ref in zip(batches, refs):
            last = run_base(a, kw).last_hidden_state.float()
            vals.append(token_cos(last, ref).double())
            ws.append(token_weights(kw).double())
    return weighted_mean(vals, ws)


def _scan(model, batches, threshold):
    """The windows (lists of original indices, top down) the sliding scan merges."""
    work = copy.deepcopy(model)
    a = arch(work, "merge_layers")
    orig = list(a.layers)
    L = len(orig)
    with torch.no_grad():
        refs = [run_base(a, kw).last_hidden_state.float() for kw in batches]
    committed = {}                        # low -> merged module of the window low..high

    def layers_with(low=None, high=None, cand=None):
        out, i = [], 0
        while i < L:
            if cand is not None and i == low:
                out.append(cand)
                i = high + 1
            elif i in committed:
                top, merged = committed[i]
                out.append(merged)
                i = top + 1
            else:
                out.append(orig[i])
                i += 1
        return out

    windows = []
    high = L - 1
    low = high - 1
    while low >= 0:
        cand = merged_layer(orig, low, high)
        sim = _similarity(a, layers_with(low, high, cand), batches, refs)
        if sim >= threshold:
            low -= 1
            continue
        if low + 1 < high:
            committed[low + 1] = (high, merged_layer(orig, low + 1, high))
            windows.append(list(range(low + 1, high + 1)))
        high = low
        low = high - 1
    if high > low + 1:                    # the scan reached the bottom inside an accepted window
        committed[low + 1] = (high, merged_layer(orig, low + 1, high))
        windows.append(list(range(low + 1, high + 1)))
    return windows


def _apply_windows(model, windows):
    a = arch(model, "merge_layers")
    orig = list(a.layers)
    starts = {w[0]: w for w in windows}
    inside = {i for w in windows for i in w[1:]}
    keep = [i for i in range(len(orig)) if i not in inside]
    replace = {lo: merged_layer(orig, lo, w[-1]) for lo, w in starts.items()}
    return keep_layers(model, keep, "merge_layers", ("sparse_ops_merged_layers", sorted(windows)), replace)


def merge_layers(model, calib, threshold=None, *, num_layers=None):
    """A copy of `model` with runs of adjacent layers merged (see the module doc). Give either
    threshold (the least cosine similarity of the final hidden states to the original's, per real
    token, averaged) or num_layers (the highest threshold, found by bisection, whose result has at
    most that many layers). config.sparse_ops_merged_layers lists the merged windows (original
    indices); config.num_hidden_layers and layer_idx are updated."""
    who = "merge_layers"
    a = arch(model, who)
    L = len(a.layers)
    if (threshold is None) == (num_layers is None):
        raise ValueError("sparse_ops.pruning.merge_layers: give exactly one of threshold (a cosine similarity) and "
                         "num_layers")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or math.isnan(threshold)):
        raise ValueError(f"sparse_ops.pruning.merge_layers: threshold must be a number (a cosine similarity, "
                         f"e.g. 0.9); got {threshold!r}")
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                   or not 1 <= num_layers <= L):
        raise ValueError(f"sparse_ops.pruning.merge_layers: num_layers must be an int in [1, {L}]; got "
                         f"{num_layers!r}")
    batches = calib_batches(calib, who)
    with _calib_mode(model):
        if threshold is not None:
            return _apply_windows(model, _scan(model, batches, float(threshold)))
        lo, hi = -1.0, 1.0                # merging everything is accepted at -1; nothing at > 1
        best = _scan(model, batches, lo)
        for _ in range(8):
            mid = 0.5 * (lo + hi)
            w = _scan(model, batches, mid)
            if L - sum(len(x) - 1 for x in w) <= num_layers:
                lo, best = mid, w
            else:
                hi = mid
        small = _apply_windows(model, best)
        small.config.sparse_ops_merge_threshold = lo
        return small
