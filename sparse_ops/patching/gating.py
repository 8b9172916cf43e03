"""Learned gates in a patched model: patch(model, gate=...) gives each layer a
sparse_ops.gates.LayerGates (child module `sparse_gates`) whose values its LayerState combines
with the masks at each forward (state.begin_layer).

gate= forms:
  "hard_concrete" | "threshold"   that kind for heads, FFN columns and the layer itself
  "topk"                          exactly half of the heads and of the FFN columns of each layer
                                  (a layer has one flag, so topk gives it no gate)
  "router"                        an input-dependent router for the FFN columns of each layer, the
                                  same as {"ffn": ("router", 0.5)}: LLaMA-family (gated) MLPs get
                                  an FFNRouter, per token (keep 0.5, rank 64; ("router", keep, rank)
                                  too; patching/router.py), every other family a SampleRouter, per
                                  sample (one linear map, no rank)
  {"heads": g, "ffn": g, "layers": g}   per kind; g a kind, (kind, keep) for topk's or a router's
                                  fraction, or None (no gate for that kind); kinds left out get
                                  none. Routers by kind: "ffn" per token, before the projections
                                  (FFNRouter, LLaMA family) or per sample (SampleRouter, the other
                                  families); "heads" per sample, ("router", keep) of the heads
                                  (SampleRouter, every family); "layers" per sample, "router" (a
                                  SampleRouter whose keep fraction is learned).
Only the parts patched (patch's heads= / ffn= / layers=) get gates.
"""
from __future__ import annotations

import numbers

import torch

from ..gates import GATE_KINDS, FFNRouter, LayerGates, SampleRouter, UnitGate

_KIND_KEYS = {"heads": "heads", "ffn": "ffn", "layers": "layer"}
NAME = "sparse_gates"


ROUTER = "router"
ROUTER_RANK = 64


def _one(key, g):
    if g is None:
        return None
    if isinstance(g, str):
        g = (g, None)
    if isinstance(g, tuple) and len(g) in (1, 2, 3) and g[0] == ROUTER:
        return _router(key, g)
    if (not isinstance(g, tuple) or len(g) != 2 or g[0] not in GATE_KINDS
            or (g[1] is not None and (isinstance(g[1], bool) or not isinstance(g[1], numbers.Real)))):
        raise ValueError(f"sparse_ops.patch: gate[{key!r}] must be one of {GATE_KINDS + (ROUTER,)}, (\"topk\", keep), "
                         f"(\"router\", keep), or None; got {g!r}")
    if g[0] == "topk" and key == "layers":
        raise ValueError("sparse_ops.patch: a topk gate needs several units; a layer has one flag, so give "
                         "gate['layers'] 'hard_concrete', 'threshold' or None")
    if g[1] is not None and g[0] != "topk":
        raise ValueError(f"sparse_ops.patch: gate[{key!r}] = {g!r}: only topk takes a keep fraction (the others "
                         f"learn theirs: sparse_ops.gates.budget_loss)")
    if g[1] is not None and not 0.0 <= g[1] <= 1.0:
        raise ValueError(f"sparse_ops.patch: gate[{key!r}]'s keep must be in [0, 1]; got {g[1]!r}")
    return g


def _router(key, g):
    """(ROUTER, keep, rank) for an "ffn" router, (ROUTER, keep, None) for "heads", (ROUTER, None,
    None) for "layers" (a layer router learns its fraction), or a clear error."""
    keep = g[1] if len(g) > 1 else None
    if len(g) == 3 and key != "ffn":
        raise ValueError(f"sparse_ops.patch: gate[{key!r}] = {g!r}: only an FFN router takes a rank; a {key} router "
                         f"is one linear map per layer: ('router', keep)" + ("" if key == "heads" else " without keep"))
    if key == "layers":
        if keep is not None:
            raise ValueError(f"sparse_ops.patch: gate['layers'] = {g!r}: a layer router learns which samples run the "
                             f"layer (its keep fraction: sparse_ops.gates.budget_loss(layers=...)); give 'router'")
        return (ROUTER, None, None)
    keep = 0.5 if keep is None else keep
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0.0 <= keep <= 1.0:
        raise ValueError(f"sparse_ops.patch: gate[{key!r}]'s router keep must be in [0, 1]; got {g[1]!r}")
    if key == "heads":
        return (ROUTER, float(keep), None)
    rank = g[2] if len(g) == 3 else None  # None: ROUTER_RANK for a per-token router, none per sample
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"sparse_ops.patch: gate['ffn']'s router rank must be a positive int; got {rank!r}")
    return (ROUTER, float(keep), rank)


def parse(gate, parts):
    """{kind key: (gate kind, keep)} for the patched parts, or None for gate=None; clear errors."""
    if gate is None:
        return None
    if gate == ROUTER:
        gate = {"ffn": ROUTER}
    if isinstance(gate, str):
        if gate not in GATE_KINDS:
            raise ValueError(f"sparse_ops.patch: gate must be None, one of {GATE_KINDS + (ROUTER,)} or a dict by "
                             f"kind; got {gate!r}")
        gate = {"heads": gate, "ffn": gate, "layers": None if gate == "topk" else gate}
    if not isinstance(gate, dict) or not set(gate) <= set(_KIND_KEYS):
        raise ValueError(f"sparse_ops.patch: gate must be None, one of {GATE_KINDS} or a dict with keys among "
                         f"{tuple(_KIND_KEYS)}; got {gate!r}")
    spec = {}
    for key, g in gate.items():
        g = _one(key, g)
        if g is not None and not parts[key]:
            raise ValueError(f"sparse_ops.patch: a {key} gate was asked for, but {key}=False")
        if g is not None:
            spec[key] = g
    return spec or None


def has_ffn_router(spec) -> bool:
    return spec is not None and spec.get("ffn", (None,))[0] == ROUTER


def ffn_router_rank(spec):
    """The rank asked for an FFN router (None: not given, or no FFN router)."""
    return spec["ffn"][2] if has_ffn_router(spec) else None


def router_inputs(layer) -> int:
    """The width of a LLaMA-family layer's MLP input (its gate projection's in_features)."""
    return layer.mlp.gate_proj.in_features


def _gate(layer, st, key, g, token_ffn):
    n = {"heads": st.num_heads, "ffn": st.ffn_size, "layers": 1}[key]
    if g[0] != ROUTER:
        return UnitGate(g[0], n, g[1])
    if key == "ffn" and token_ffn:
        return FFNRouter(router_inputs(layer), n, g[1], g[2] or ROUTER_RANK)
    return SampleRouter(st.width, n, g[1])


def attach(layers, states, spec, token_ffn=False):
    """A LayerGates on each layer (on the device and dtype of the layer's parameters). token_ffn:
    an FFN router is per token (FFNRouter: LLaMA-family gated MLPs), else per sample."""
    for layer, st in zip(layers, states):
        gates = LayerGates({_KIND_KEYS[k]: _gate(layer, st, k, g, token_ffn) for k, g in spec.items()})
        p = next(layer.parameters(), None)
        if p is not None:
            gates.to(device=p.device, dtype=p.dtype if p.is_floating_point() else torch.float32)
        gates.train(layer.training)  # a model patched in eval mode has its gates in eval mode too
        layer.add_module(NAME, gates)
        st.gates = gates


def detach(layers, states):
    for layer, st in zip(layers, states):
        if NAME in layer._modules:
            del layer._modules[NAME]
        st.gates = st.now = st.router_down_t = None
