"""Learned gates in a patched model: patch(model, gate=...) gives each layer a
sparse_ops.gates.LayerGates (child module `sparse_gates`) whose values its LayerState combines
with the masks at each forward (state.begin_layer).

gate= forms:
  "hard_concrete" | "threshold"   that kind for heads, FFN columns and the layer itself
  "topk"                          exactly half of the heads and of the FFN columns of each layer
                                  (a layer has one flag, so topk gives it no gate)
  {"heads": g, "ffn": g, "layers": g}   per kind; g a kind, (kind, keep) for topk's fraction,
                                  or None (no gate for that kind); kinds left out get none
Only the parts patched (patch's heads= / ffn= / layers=) get gates.
"""
from __future__ import annotations

import numbers

import torch

from ..gates import GATE_KINDS, LayerGates, UnitGate

_KIND_KEYS = {"heads": "heads", "ffn": "ffn", "layers": "layer"}
NAME = "sparse_gates"


def _one(key, g):
    if g is None:
        return None
    if isinstance(g, str):
        g = (g, None)
    if (not isinstance(g, tuple) or len(g) != 2 or g[0] not in GATE_KINDS
            or (g[1] is not None and (isinstance(g[1], bool) or not isinstance(g[1], numbers.Real)))):
        raise ValueError(f"sparse_ops.patch: gate[{key!r}] must be one of {GATE_KINDS}, (\"topk\", keep) or None; "
                         f"got {g!r}")
    if g[0] == "topk" and key == "layers":
        raise ValueError("sparse_ops.patch: a topk gate needs several units; a layer has one flag, so give "
                         "gate['layers'] 'hard_concrete', 'threshold' or None")
    if g[1] is not None and g[0] != "topk":
        raise ValueError(f"sparse_ops.patch: gate[{key!r}] = {g!r}: only topk takes a keep fraction (the others "
                         f"learn theirs: sparse_ops.gates.budget_loss)")
    if g[1] is not None and not 0.0 <= g[1] <= 1.0:
        raise ValueError(f"sparse_ops.patch: gate[{key!r}]'s keep must be in [0, 1]; got {g[1]!r}")
    return g


def parse(gate, parts):
    """{kind key: (gate kind, keep)} for the patched parts, or None for gate=None; clear errors."""
    if gate is None:
        return None
    if gate == "router":
        raise NotImplementedError("sparse_ops.patch: gate='router' (input-dependent gates) is not available yet; "
                                  "use 'hard_concrete', 'threshold' or 'topk', or a module's own router (e.g. "
                                  "sparse_ops.nn.GatedFFN(gate=...))")
    if isinstance(gate, str):
        if gate not in GATE_KINDS:
            raise ValueError(f"sparse_ops.patch: gate must be None, one of {GATE_KINDS} or a dict by kind; "
                             f"got {gate!r}")
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


def attach(layers, states, spec):
    """A LayerGates on each layer (on the device and dtype of the layer's parameters)."""
    for layer, st in zip(layers, states):
        sizes = {"heads": st.num_heads, "ffn": st.ffn_size, "layers": 1}
        gates = LayerGates({_KIND_KEYS[k]: UnitGate(kind, sizes[k], keep) for k, (kind, keep) in spec.items()})
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
        st.gates = st.now = None
