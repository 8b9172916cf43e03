"""Where a model's transformer layers, their attention projections and FFN linears are, for the
pruning methods (BERT-family encoders and LLaMA-family decoders, the families whose layers
patch() already recognises), and the calibration loop they share.

A `Unit` view of one layer:  q, k, v, o (nn.Linear, q/k/v [heads*dh, d], o [d, heads*dh]),
ffn_in (the FFN input linears, [F, d] each: BERT intermediate.dense; LLaMA gate_proj, up_proj),
ffn_out ([d, F]: output.dense / down_proj).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..patching import bert as _bert
from ..patching import llama as _llama


@dataclass
class Arch:
    family: str                  # "bert" | "llama"
    base: torch.nn.Module        # the module whose output has last_hidden_state (BertModel / LlamaModel)
    holder: torch.nn.Module      # the module holding the layers' ModuleList ...
    attr: str                    # ... under this name
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def layers(self) -> torch.nn.ModuleList:
        return getattr(self.holder, self.attr)


def arch(model, who: str) -> Arch:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sparse_ops.pruning.{who}: model must be a torch.nn.Module; got {type(model).__name__}")
    if getattr(model, "_sparse_patch", None) is not None and who in ("prune_layers", "merge_layers"):
        raise ValueError(f"sparse_ops.pruning.{who}: the model is patched; give the plain model (sparse_ops.unpatch "
                         f"it, or prune a copy before patching)")
    for m in model.modules():
        enc = getattr(m, "encoder", None)
        lst = getattr(enc, "layer", None)
        if isinstance(lst, torch.nn.ModuleList) and len(lst) and all(_bert.is_layer(x) for x in lst):
            a = lst[0].attention.self
            return Arch("bert", m, enc, "layer", a.num_attention_heads, a.num_attention_heads,
                        a.attention_head_size)
        lst = getattr(m, "layers", None)
        if isinstance(lst, torch.nn.ModuleList) and len(lst) and all(_llama.is_layer(x) for x in lst) \
                and hasattr(m, "norm"):
            a, cfg = lst[0].self_attn, m.config
            return Arch("llama", m, m, "layers", cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim)
    raise TypeError(f"sparse_ops.pruning.{who}: no supported transformer layers in {type(model).__name__} "
                    f"(supported: Hugging Face BERT-family encoders and LLaMA-family decoders)")


def parts(a: Arch, layer) -> dict:
    """{"q", "k", "v", "o": nn.Linear, "ffn_in": [nn.Linear], "ffn_out": nn.Linear} of one layer."""
    if a.family == "bert":
        s = layer.attention.self
        return {"q": s.query, "k": s.key, "v": s.value, "o": layer.attention.output.dense,
                "ffn_in": [layer.intermediate.dense], "ffn_out": layer.output.dense}
    s, f = layer.self_attn, layer.mlp
    return {"q": s.q_proj, "k": s.k_proj, "v": s.v_proj, "o": s.o_proj, "ffn_in": [f.gate_proj, f.up_proj],
            "ffn_out": f.down_proj}


# ----------------------------------------------------------------- calibration data
def batch_kwargs(batch, who: str) -> dict:
    if isinstance(batch, torch.Tensor):
        if batch.dtype != torch.int64 or batch.dim() != 2:
            raise ValueError(f"sparse_ops.pruning.{who}: a calib batch must be int64 input_ids [B, T] or a dict of "
                             f"model arguments; got {batch.dtype} of shape {tuple(batch.shape)}")
        return {"input_ids": batch}
    if isinstance(batch, dict) and "input_ids" in batch:
        return dict(batch)
    raise ValueError(f"sparse_ops.pruning.{who}: a calib batch must be int64 input_ids [B, T] or a dict with "
                     f"input_ids; got {type(batch).__name__}")


def calib_batches(calib, who: str) -> list:
    if isinstance(calib, (torch.Tensor, dict)):
        calib = [calib]
    try:
        out = [batch_kwargs(b, who) for b in calib]
    except TypeError:
        raise ValueError(f"sparse_ops.pruning.{who}: calib must be a list of batches; got {type(calib).__name__}") \
            from None
    if not out:
        raise ValueError(f"sparse_ops.pruning.{who}: calib is empty; give a few batches of real text")
    return out


def token_weights(kw: dict) -> torch.Tensor:
    """float [B, T]: 1 for real tokens, 0 for padding."""
    am = kw.get("attention_mask")
    ids = kw["input_ids"]
    return torch.ones(ids.shape, dtype=torch.float32) if am is None else (am != 0).to(torch.float32)


def run_base(a: Arch, kw: dict):
    kw = dict(kw)
    kw.pop("labels", None)
    if a.family == "llama":
        kw.setdefault("use_cache", False)
    return a.base(**kw)


def layer_io(a: Arch, kw: dict):
    """Run the base model once; [(input, output) hidden states [B, T, d] of each layer] and the final
    hidden state."""
    seen = []

    def hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        y = out[0] if isinstance(out, tuple) else out
        seen.append((x.detach().float(), y.detach().float()))
    hs = [layer.register_forward_hook(hook, with_kwargs=True) for layer in a.layers]
    try:
        with torch.no_grad():
            last = run_base(a, kw).last_hidden_state.float()
    finally:
        for h in hs:
            h.remove()
    return seen, last


def token_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(x, y, dim=-1)


def weighted_mean(vals: list, weights: list) -> float:
    num = sum(float((v * w).sum()) for v, w in zip(vals, weights))
    den = sum(float(w.sum()) for w in weights)
    return num / den


# ----------------------------------------------------------------- a shallower model
def renumber(a: Arch, model, keep: list, record: tuple | None = None, replace: dict | None = None):
    """Keep only the layers of a.layers (in `model`, already a copy) at indices `keep`, in order
    (replace: {index: module} puts a new layer at that index), and update the config
    (num_hidden_layers, layer_types, `record` = (name, value)) and each attention's layer_idx, so
    that generation with a KV cache indexes the cache by the new positions."""
    layers = list(a.layers)
    new = [(replace or {}).get(i, layers[i]) for i in keep]
    setattr(a.holder, a.attr, torch.nn.ModuleList(new))
    for i, layer in enumerate(new):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    cfgs = {id(c): c for c in (getattr(model, "config", None), getattr(a.base, "config", None)) if c is not None}
    for cfg in cfgs.values():
        cfg.num_hidden_layers = len(new)
        lt = getattr(cfg, "layer_types", None)
        if isinstance(lt, list) and len(lt) == len(layers):
            cfg.layer_types = [lt[i] for i in keep]
        if record is not None:
            setattr(cfg, record[0], record[1])
    return model


def keep_layers(model, keep: list, who: str, record: tuple | None = None, replace: dict | None = None):
    """A deep copy of `model` with only the layers at indices `keep` (see renumber)."""
    small = copy.deepcopy(model)
    return renumber(arch(small, who), small, keep, record, replace)
