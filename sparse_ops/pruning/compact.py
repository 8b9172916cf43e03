"""compact(model): a patched model's static masks (set_masks, learned gates in eval, SEVEN's unit
masks) made physical: a smaller dense model with the same outputs.

Per layer: the off heads' rows leave q, k, v and their columns leave o; the off FFN columns'
rows leave the input linears and their columns leave the down projection; off layers leave the
stack. A learned gate's value on a unit that stays is folded into the output projection's columns
(o(h * g) = (o * g) h), so outputs match the gated model too.

Shapes a plain Hugging Face config cannot say (different head and FFN counts per layer) go in
config.sparse_ops_shapes (one {"heads", "kv_heads", "ffn"} per layer); `save_pretrained` writes
it with the weights, and load_compact(path, cls) builds the model with those shapes and loads them.

A layer with every head (or every FFN column) off gets zero-width projections (the attention
then adds only o's bias). One case keeps units that are off, with zero output weights: in a GQA
layer every KV group that stays must have the same number of query heads (repeat_kv repeats each
group equally), so a group with fewer heads on keeps some of its off heads.
"""
from __future__ import annotations

import copy
import json
import os

import torch

from .. import patching
from ..gates import UnitGate
from ._arch import arch, renumber


def _static(name, m, n):
    """A static mask of n units as bool [n] (None: all on)."""
    if m is None:
        return None
    if m.dtype == torch.int64:
        return torch.zeros(n, dtype=torch.bool, device=m.device).index_fill_(0, m, True)
    if m.dim() != 1:
        raise ValueError(f"sparse_ops.pruning.compact: {name} is a per-sample or per-token mask (shape "
                         f"{tuple(m.shape)}); compact needs static masks (bool [units]) shared by every input")
    return m


def _gate_values(layer_gates, kind):
    g = None if layer_gates is None else layer_gates.get(kind)
    if g is None:
        return None
    was = g.training
    g.eval()
    try:
        with torch.no_grad():
            return g().detach().reshape(-1).float()
    finally:
        g.train(was)


def _plan(st):
    """{"heads": float [H], "ffn": float [F], "keep": bool} of one layer: 0 = removed, else the
    value the unit's output is multiplied by."""
    if st.ffn_threshold is not None:
        raise ValueError("sparse_ops.pruning.compact: contextual FFN sparsity is on (its columns depend on the input); "
                         "turn it off (set_contextual_ffn(model, None)) before compacting")
    if st.gates is not None and not isinstance(st.gates.get("ffn"), (type(None), UnitGate)):
        raise ValueError("sparse_ops.pruning.compact: the FFN columns are routed (gate='router': they depend on the "
                         "input); compact needs static masks or gates")
    out = {}
    for kind, n, gk in (("heads", st.num_heads, "heads"), ("ffn", st.ffn_size, "ffn")):
        m = _static(f"{kind}[{st.index}]", getattr(st, kind), n)
        v = torch.ones(n) if m is None else m.float().cpu()
        g = _gate_values(st.gates, gk)
        out[kind] = v if g is None else v * g.cpu()
    keep = st.keep
    if keep is not None and keep.dim() != 0:
        raise ValueError(f"sparse_ops.pruning.compact: the layers mask is per sample (layer {st.index}); compact "
                         f"needs a static layers mask (bool [L])")
    keep = True if keep is None else bool(keep)
    g = _gate_values(st.gates, "layer")
    if g is not None:
        v = float(g[0])
        if v not in (0.0, 1.0):
            raise ValueError(f"sparse_ops.pruning.compact: layer {st.index}'s learned layer gate is {v:.4g}; only a "
                             f"gate of exactly 0 or 1 can be compacted (x + g (layer(x) - x) is no layer otherwise)")
        keep = keep and v == 1.0
    out["keep"] = keep
    return out


def _rows(lin, idx):
    new = torch.nn.Linear(lin.in_features, len(idx), bias=lin.bias is not None, device=lin.weight.device,
                          dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight[idx])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[idx])
    return new


def _cols(lin, idx, scale):
    new = torch.nn.Linear(len(idx), lin.out_features, bias=lin.bias is not None, device=lin.weight.device,
                          dtype=lin.weight.dtype)
    with torch.no_grad():
        s = scale.to(lin.weight.device, lin.weight.dtype)
        w = lin.weight[:, idx]
        # A unit kept with value 1 is copied as it is (bit-exact); others are scaled (0: a placeholder).
        new.weight.copy_(torch.where(s == 1, w, w * s))
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new


def _units(vals, n):
    return [i for i in range(n) if float(vals[i]) != 0.0]


def _ffn(a, layer, vals):
    F = vals.numel()
    kept = _units(vals, F)
    idx = torch.tensor(kept, dtype=torch.long)
    scale = vals[idx]
    if a.family == "bert":
        layer.intermediate.dense = _rows(layer.intermediate.dense, idx)
        layer.output.dense = _cols(layer.output.dense, idx, scale)
    else:
        f = layer.mlp
        f.gate_proj, f.up_proj = _rows(f.gate_proj, idx), _rows(f.up_proj, idx)
        f.down_proj = _cols(f.down_proj, idx, scale)
        if hasattr(f, "intermediate_size"):
            f.intermediate_size = len(kept)
    return len(kept)


def _head_rows(heads, dh):
    return torch.tensor([h * dh + i for h in heads for i in range(dh)], dtype=torch.long)


def _heads_bert(a, layer, vals):
    s, dh = layer.attention.self, a.head_dim
    heads = _units(vals, a.num_heads)
    rows = _head_rows(heads, dh)
    s.query, s.key, s.value = _rows(s.query, rows), _rows(s.key, rows), _rows(s.value, rows)
    layer.attention.output.dense = _cols(layer.attention.output.dense, rows,
                                          vals[torch.tensor(heads, dtype=torch.long)].repeat_interleave(dh))
    s.num_attention_heads, s.all_head_size = len(heads), len(heads) * dh
    return {"heads": len(heads), "kv_heads": len(heads)}


def _heads_llama(a, layer, vals):
    s, dh = layer.self_attn, a.head_dim
    H, Hkv = a.num_heads, a.num_kv_heads
    per = H // Hkv
    on = [[h for h in range(j * per, (j + 1) * per) if float(vals[h]) != 0.0] for j in range(Hkv)]
    c = max(len(x) for x in on)
    groups = [j for j in range(Hkv) if on[j]]
    q_heads = []
    for j in groups:                          # pad a group to c heads with its off heads (value 0)
        pad = [h for h in range(j * per, (j + 1) * per) if h not in on[j]][: c - len(on[j])]
        q_heads += sorted(on[j] + pad)
    scale = torch.tensor([float(vals[h]) if h in on[h // per] else 0.0 for h in q_heads])
    rows = _head_rows(q_heads, dh)
    kv_rows = _head_rows(groups, dh)
    s.q_proj = _rows(s.q_proj, rows)
    s.k_proj, s.v_proj = _rows(s.k_proj, kv_rows), _rows(s.v_proj, kv_rows)
    s.o_proj = _cols(s.o_proj, rows, scale.repeat_interleave(dh))
    s.num_key_value_groups = max(c, 1)
    return {"heads": len(q_heads), "kv_heads": len(groups)}


def compact(model):
    """A physically smaller, unpatched copy of a patched model whose masks (and learned gates, in
    eval) are static; its outputs equal the masked model's. See the module doc."""
    p = getattr(model, "_sparse_patch", None)
    if p is None:
        raise TypeError(f"sparse_ops.pruning.compact: model must be patched (sparse_ops.patch) with its masks set "
                        f"(sparse_ops.set_masks); this {type(model).__name__} is not patched")
    plans = [_plan(st) for st in p["states"]]
    small = copy.deepcopy(model)
    patching.unpatch(small)
    a = arch(small, "compact")
    layers = list(a.layers)
    if len(layers) != len(plans):
        raise ValueError("sparse_ops.pruning.compact: the model's layers do not match its patch record")
    shapes, keep = [], []
    for i, (layer, plan) in enumerate(zip(layers, plans)):
        if not plan["keep"]:
            continue
        hs = (_heads_bert if a.family == "bert" else _heads_llama)(a, layer, plan["heads"])
        hs["ffn"] = _ffn(a, layer, plan["ffn"])
        shapes.append(hs)
        keep.append(i)
    renumber(a, small, keep, ("sparse_ops_shapes", shapes))
    return small


# ----------------------------------------------------------------- loading a compacted model
def _resize(a, layer, shape):
    """Give one layer of a freshly built (dense-shaped) model the compacted shapes."""
    dh = a.head_dim
    nq, nkv, F = shape["heads"], shape["kv_heads"], shape["ffn"]
    if a.family == "bert":
        s = layer.attention.self
        idx = torch.arange(nq * dh)
        s.query, s.key, s.value = _rows(s.query, idx), _rows(s.key, idx), _rows(s.value, idx)
        layer.attention.output.dense = _cols(layer.attention.output.dense, idx, torch.ones(nq * dh))
        s.num_attention_heads, s.all_head_size = nq, nq * dh
        fi = torch.arange(F)
        layer.intermediate.dense = _rows(layer.intermediate.dense, fi)
        layer.output.dense = _cols(layer.output.dense, fi, torch.ones(F))
        return
    s, f = layer.self_attn, layer.mlp
    q, kv, fi = torch.arange(nq * dh), torch.arange(nkv * dh), torch.arange(F)
    s.q_proj, s.k_proj, s.v_proj = _rows(s.q_proj, q), _rows(s.k_proj, kv), _rows(s.v_proj, kv)
    s.o_proj = _cols(s.o_proj, q, torch.ones(nq * dh))
    s.num_key_value_groups = nq // nkv if nkv else 1
    f.gate_proj, f.up_proj = _rows(f.gate_proj, fi), _rows(f.up_proj, fi)
    f.down_proj = _cols(f.down_proj, fi, torch.ones(F))
    if hasattr(f, "intermediate_size"):
        f.intermediate_size = F


def _state_dict_files(path):
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"sparse_ops.pruning.load_compact: no model.safetensors (or its index) in {path}")
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(path, f)))
    return sd


def load_compact(path, cls, **config_kwargs):
    """Load a model saved with small.save_pretrained(path) after compact(): cls is its Hugging Face
    class (e.g. transformers.BertModel, LlamaForCausalLM). Builds cls from the saved config, gives
    each layer its saved shapes (config.sparse_ops_shapes) and loads the saved weights."""
    config = cls.config_class.from_pretrained(path, **config_kwargs)
    shapes = getattr(config, "sparse_ops_shapes", None)
    if not isinstance(shapes, list):
        raise ValueError(f"sparse_ops.pruning.load_compact: {path}'s config has no sparse_ops_shapes; it was not saved "
                         f"from sparse_ops.pruning.compact (load it with {cls.__name__}.from_pretrained)")
    model = cls(config)
    a = arch(model, "load_compact")
    if len(a.layers) != len(shapes):
        raise ValueError(f"sparse_ops.pruning.load_compact: the config has {len(a.layers)} layers but "
                         f"{len(shapes)} shapes")
    for layer, shape in zip(a.layers, shapes):
        _resize(a, layer, shape)
    sd = _state_dict_files(path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        tied = {n for n in missing if n.endswith("lm_head.weight")}
    left = [n for n in missing if n not in tied]
    if left or unexpected:
        raise ValueError(f"sparse_ops.pruning.load_compact: the saved weights do not fit: missing {left[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    model.eval()
    return model
