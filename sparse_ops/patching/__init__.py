"""Model-level API: convert an existing model in place so that its masked heads, FFN columns and
layers are not computed.

  patch(model, *, heads=True, ffn=True, layers=True, gate=None) -> model   (in place)
  set_masks(model, *, heads=None, ffn=None, layers=None)
  clear_masks(model)
  unpatch(model) -> model            the original module classes, the same weights
  stats(model) -> {"heads": f, "ffn": f, "layers": f}
  calibrate_contextual_ffn(model, batches, *, sparsity=0.5, transposed_down=False) -> thresholds
  layer_dropout(model, p, *, scaling="uniform", per_sample=True, generator=None) -> [p per layer]
                                     LayerDrop in training (each sample really skips the layers it
                                     drops); p=None turns it off
  set_contextual_ffn(model, thresholds, *, transposed_down=False)
                                     contextual (CATS-style) FFN sparsity of LLaMA-family MLPs
                                     (patching/contextual.py); clear_masks turns it off
  fit_routers(model, batches, *, steps=300, ...) -> recall per layer
                                     fits the FFN routers of patch(model, gate="router") to the
                                     dense model's activations (patching/router.py)

Supported today: torch.nn.TransformerEncoder / TransformerEncoderLayer (patching/torch_encoder.py)
Hugging Face BERT-family encoders (patching/bert.py) and LLaMA-family decoders (patching/llama.py:
GQA, rotary, SwiGLU, a KV cache, contextual FFN sparsity) and GPT-2 (patching/gpt2.py: Conv1D
weights). Learned gates: patching/gating.py (static, and which router goes where), patching/router.py
(routed FFN columns) and state.begin_layer (per-sample head and layer routers).

How masks are read: set_masks stores them on each layer (a LayerState, patching/state.py); a
[B, ...] mask applies to batches of that size. stats counts, in the converted modules, the unit
pairs each forward computed: (sample, head) pairs whose projections and attention ran, (token,
column) pairs of the FFN hidden layer, (sample, layer) pairs; over the pairs a dense forward of
the same batch computes. Samples a layer skipped count as computing none of its heads or columns.
(A per-token or per-sample FFN mask on CUDA computes the union of its rows' columns; stats counts
the rows' own columns.)
"""
from __future__ import annotations

import math

import torch

from . import bert, contextual, gating, gpt2, llama, router, torch_encoder
from .state import ATTR, KINDS, LayerState

_FAMILIES = (("torch.nn.TransformerEncoder(Layer)", torch_encoder), ("Hugging Face BERT-family encoder", bert),
             ("Hugging Face LLaMA-family decoder", llama), ("Hugging Face GPT-2", gpt2))


def _states(model, who):
    st = getattr(model, "_sparse_patch", None)
    if st is None:
        raise TypeError(f"sparse_ops.{who}: this {type(model).__name__} is not patched; call sparse_ops.patch(model) "
                        f"first")
    return st


def patch(model, *, heads=True, ffn=True, layers=True, gate=None):
    """Convert `model` in place (weights shared, state_dict unchanged); returns the same object."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"sparse_ops.patch: model must be a torch.nn.Module; got {type(model).__name__}")
    parts = {"heads": bool(heads), "ffn": bool(ffn), "layers": bool(layers)}
    spec = gating.parse(gate, parts)  # errors before anything is converted
    if getattr(model, "_sparse_patch", None) is not None:
        if spec is not None:
            raise ValueError("sparse_ops.patch: the model is already patched; to add learned gates, unpatch it and "
                             "patch again with gate=...")
        return model
    for family, mod in _FAMILIES:
        found = mod.layers_of(model)
        if found and gating.ffn_router_rank(spec) is not None and mod is not llama:
            raise TypeError(f"sparse_ops.patch: gate['ffn'] = {spec['ffn']!r}: a rank is for the per-token FFN "
                            f"router of gated (SwiGLU) MLPs, as in LLaMA-family decoders; this "
                            f"{type(model).__name__} is a {family}, whose FFN router is per sample (one linear "
                            f"map): give ('router', keep)")
        if found:
            states = mod.convert(model, found, bool(heads), bool(ffn), bool(layers))
            # Counts restart at each forward of the module that runs the layers (the encoder or
            # decoder stack: also when it is called directly, e.g. model.model(...)).
            owner = next((m for m in model.modules() for c in m.children()
                          if isinstance(c, torch.nn.ModuleList) and len(c) and c[0] is found[0]), model)
            # The hook reads the states from its module (not a closure), so a copy.deepcopy of the
            # patched model resets its own states' counts.
            owner._sparse_states = states
            hook = owner.register_forward_pre_hook(_reset_counts)
            model._sparse_patch = {"family": family, "module": mod.__name__, "layers": found, "states": states,
                                   "hook": hook, "parts": parts, "owner": owner}
            if spec is not None:
                gating.attach(found, states, spec, token_ffn=mod is llama)
            return model
    names = sorted({type(m).__name__ for m in model.modules()})[:12]
    raise TypeError(f"sparse_ops.patch: could not convert {type(model).__name__}: no supported transformer layers "
                    f"found (supported: {', '.join(f for f, _ in _FAMILIES)}); its module classes include "
                    f"{', '.join(names)}")


def _reset_counts(module, args):  # a forward pre-hook; returns None: the arguments stay as they are
    for st in module._sparse_states:
        st.reset_counts()


def _family(p):
    """The patching module of a patched model's family (stored by name: a deepcopy of the model
    copies the record, and modules cannot be copied)."""
    return next(mod for _, mod in _FAMILIES if mod.__name__ == p["module"])


def _check_mask(name, t, allowed, dims_text):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"sparse_ops.set_masks: {name} must be a torch.Tensor or None; got {type(t).__name__}")
    if (t.dtype, t.dim()) not in allowed:
        raise ValueError(f"sparse_ops.set_masks: {name} must be {dims_text}; got {t.dtype} of shape {tuple(t.shape)}")


def set_masks(model, *, heads=None, ffn=None, layers=None):
    """Masks for the next forwards (True = computed). heads / ffn: one entry per layer (None = all on);
    layers: bool [L] or [B, L]. An argument left as None leaves that kind's masks as they are."""
    p = _states(model, "set_masks")
    states = p["states"]
    L = len(states)
    for kind, given in (("heads", heads), ("ffn", ffn), ("layers", layers)):
        if given is not None and not p["parts"][kind]:
            raise ValueError(f"sparse_ops.set_masks: the model was patched with {kind}=False; patch with {kind}=True "
                             f"to mask {kind}")
    dev = next((t.device for t in model.parameters()), torch.device("cpu"))
    if heads is not None:
        heads = list(heads)
        if len(heads) != L:
            raise ValueError(f"sparse_ops.set_masks: heads must have one entry per layer ({L}); got {len(heads)}")
        for st, m in zip(states, heads):
            if m is not None:
                _check_mask(f"heads[{st.index}]", m, {(torch.bool, 1), (torch.bool, 2)}, "bool [H] or [B, H]")
                if m.shape[-1] != st.num_heads or m.device != dev:
                    raise ValueError(f"sparse_ops.set_masks: heads[{st.index}] must have H = {st.num_heads} last and "
                                     f"be on {dev}; got shape {tuple(m.shape)} on {m.device}")
        for st, m in zip(states, heads):
            st.heads = m
    if ffn is not None:
        ffn = list(ffn)
        if len(ffn) != L:
            raise ValueError(f"sparse_ops.set_masks: ffn must have one entry per layer ({L}); got {len(ffn)}")
        if any(m is not None for m in ffn) and any(router.router_of(st) is not None for st in states):
            raise ValueError("sparse_ops.set_masks: the FFN columns are routed (patch(model, gate='router')): the "
                             "routers pick them per token; unpatch and patch without the router to set FFN masks")
        if any(m is not None for m in ffn) and any(st.ffn_threshold is not None for st in states):
            raise ValueError("sparse_ops.set_masks: contextual FFN sparsity is on (set_contextual_ffn); turn it off "
                             "first (set_contextual_ffn(model, None)): a layer takes either a mask or a threshold")
        for st, m in zip(states, ffn):
            if m is None:
                continue
            _check_mask(f"ffn[{st.index}]", m, {(torch.bool, 1), (torch.int64, 1), (torch.bool, 2), (torch.bool, 3)},
                        "bool [F], int64 [K], bool [B, F] or bool [B, T, F]")
            if m.device != dev:
                raise ValueError(f"sparse_ops.set_masks: ffn[{st.index}] must be on {dev}; got {m.device}")
            if m.dtype == torch.bool and m.shape[-1] != st.ffn_size:
                raise ValueError(f"sparse_ops.set_masks: ffn[{st.index}] must have F = {st.ffn_size} last; got shape "
                                 f"{tuple(m.shape)}")
            if m.dtype == torch.int64 and m.numel() and (int(m.min()) < 0 or int(m.max()) >= st.ffn_size
                                                         or m.unique().numel() != m.numel()):
                raise ValueError(f"sparse_ops.set_masks: ffn[{st.index}] indices must be distinct and in "
                                 f"[0, {st.ffn_size})")
        for st, m in zip(states, ffn):
            st.ffn = m
    if layers is not None:
        _check_mask("layers", layers, {(torch.bool, 1), (torch.bool, 2)}, "bool [L] or [B, L]")
        if layers.shape[-1] != L or layers.device != dev:
            raise ValueError(f"sparse_ops.set_masks: layers must have L = {L} last and be on {dev}; got shape "
                             f"{tuple(layers.shape)} on {layers.device}")
        for st in states:
            st.keep = layers[..., st.index]


def clear_masks(model):
    """Every unit on again (the masks set with set_masks are dropped, contextual FFN sparsity is off)."""
    for st in _states(model, "clear_masks")["states"]:
        st.heads = st.ffn = st.keep = None
        st.ffn_threshold = st.ffn_down_t = None


def _contextual_model(model, who):
    p = _states(model, who)
    if _family(p) is not llama:
        raise TypeError(f"sparse_ops.{who}: contextual FFN sparsity needs a gated (SwiGLU) MLP, as in LLaMA-family "
                        f"decoders; this model was patched as {p['family']}")
    if not p["parts"]["ffn"]:
        raise ValueError(f"sparse_ops.{who}: the model was patched with ffn=False")
    if any(router.router_of(st) is not None for st in p["states"]):
        raise ValueError(f"sparse_ops.{who}: the FFN columns are routed (patch(model, gate='router')); a layer takes "
                         f"either a router or a contextual threshold")
    if any(st.ffn is not None for st in p["states"]):
        raise ValueError(f"sparse_ops.{who}: FFN masks are set (set_masks(ffn=...)); clear them first: a layer takes "
                         f"either a mask or a contextual threshold")
    return p


def calibrate_contextual_ffn(model, batches, *, sparsity=0.5, transposed_down=False):
    """Contextual FFN sparsity, CATS-style: run `batches` (input_ids tensors, or dicts of model
    arguments) through the dense model, set each layer's threshold on |act(x W_gate)| to the
    `sparsity` quantile of its values, and turn it on. Returns the thresholds (one per layer).
    transposed_down: read the down projection from a [F, d] copy (see patching/contextual.py)."""
    p = _contextual_model(model, "calibrate_contextual_ffn")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparse_ops.calibrate_contextual_ffn: sparsity must be a number in [0, 1); got {sparsity!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("sparse_ops.calibrate_contextual_ffn: batches is empty; give a few batches of text")
    set_contextual_ffn(model, None)
    th = contextual.calibrate(model, p["states"], batches, float(sparsity))
    set_contextual_ffn(model, th, transposed_down=transposed_down)
    return th


def set_contextual_ffn(model, thresholds, *, transposed_down=False):
    """Per-layer thresholds on |act(x W_gate)| (a list with one number or None per layer), or None: off."""
    p = _contextual_model(model, "set_contextual_ffn")
    L = len(p["states"])
    if thresholds is None:
        thresholds = [None] * L
    thresholds = list(thresholds)
    if len(thresholds) != L:
        raise ValueError(f"sparse_ops.set_contextual_ffn: thresholds must have one entry per layer ({L}); "
                         f"got {len(thresholds)}")
    for i, t in enumerate(thresholds):
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0.0):
            raise ValueError(f"sparse_ops.set_contextual_ffn: thresholds[{i}] must be a number >= 0 or None; got {t!r}")
    contextual.set_thresholds(p["states"], [layer.mlp for layer in p["layers"]], thresholds, transposed_down)


def fit_routers(model, batches, *, steps=300, lr=3e-3, batch_rows=512, max_rows=16384, transposed_down=False,
                seed=0):
    """Fit the FFN routers of a model patched with gate='router' to its own dense activations
    (patching/router.py): the MLP inputs of `batches` (input ids, or dicts of model kwargs) are
    recorded with the routers off, every row is labelled with its k columns of largest
    |act(x W_gate) * (x W_up)|, and each router takes `steps` Adam steps (lr) of binary
    cross-entropy on `batch_rows` random rows of at most `max_rows` recorded ones.
    transposed_down: read the down projection from a [F, d] copy (as set_contextual_ffn's).
    Returns each layer's recall on the recorded rows (share of the labelled columns picked)."""
    p = _states(model, "fit_routers")
    states = p["states"]
    if not all(router.router_of(st) is not None for st in states):
        raise ValueError("sparse_ops.fit_routers: the model has no FFN routers; patch it with "
                         "sparse_ops.patch(model, gate='router')")
    for name, v in (("steps", steps), ("batch_rows", batch_rows), ("max_rows", max_rows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
            raise ValueError(f"sparse_ops.fit_routers: {name} must be an int >= {0 if name == 'steps' else 1}; "
                             f"got {v!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 < lr < math.inf:
        raise ValueError(f"sparse_ops.fit_routers: lr must be a finite number > 0; got {lr!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("sparse_ops.fit_routers: batches is empty; give a few batches of text")
    mlps = [layer.mlp for layer in p["layers"]]
    act = mlps[0]._sparse_act
    recalls = router.fit(model, states, mlps, act, batches, steps, float(lr), batch_rows, max_rows, int(seed))
    router.set_down_copies(states, mlps, bool(transposed_down))
    return recalls


LAYER_DROP_SCALINGS = ("uniform", "linear", "exp", "log", "sin")


def _drop_scale(kind: str, i: int, L: int) -> float:
    """The share of the largest probability layer i (of L) gets: uniform 1; the others grow from 0
    at the first layer to 1 at the last (as torchtune's layer-dropout scalings)."""
    if kind == "uniform" or L == 1:
        return 1.0
    x = i / (L - 1)
    return {"linear": x, "exp": 2.0 ** x - 1.0, "log": math.log(i + 1) / math.log(L),
            "sin": math.sin(0.5 * math.pi * x)}[kind]


def layer_dropout(model, p, *, scaling="uniform", per_sample=True, generator=None):
    """LayerDrop on a patched model: in training, layer i is skipped with probability
    p * scale(i) (scaling: "uniform" | "linear" | "exp" | "log" | "sin", growing with depth), drawn
    per sample (per_sample=True: a dropped sample is not computed by that layer, the others run
    through skip_layer) or once for the batch (fairseq's LayerDrop). p = 1 is allowed. generator: a
    torch.Generator (CPU) for reproducible drops. In eval nothing is dropped; to prune layers at
    inference (e.g. every other one) set a layers mask: set_masks(model, layers=...). p=None or 0
    turns it off. Returns the per-layer probabilities."""
    states = _states(model, "layer_dropout")["states"]
    if not _states(model, "layer_dropout")["parts"]["layers"]:
        raise ValueError("sparse_ops.layer_dropout: the model was patched with layers=False")
    if p is None:
        p = 0.0
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"sparse_ops.layer_dropout: p must be a probability in [0, 1] or None; got {p!r}")
    if scaling not in LAYER_DROP_SCALINGS:
        raise ValueError(f"sparse_ops.layer_dropout: scaling must be one of {LAYER_DROP_SCALINGS}; got {scaling!r}")
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
        raise ValueError(f"sparse_ops.layer_dropout: generator must be a CPU torch.Generator or None; got {generator!r}")
    L = len(states)
    probs = [float(p) * _drop_scale(scaling, st.index, L) for st in states]
    for st, q in zip(states, probs):
        st.drop_p, st.drop_per_sample, st.drop_gen = q, bool(per_sample), generator
    return probs


def unpatch(model):
    """The original module classes back; the weights were never copied, so they are the same."""
    p = _states(model, "unpatch")
    gating.detach(p["layers"], p["states"])
    _family(p).restore(p["layers"], model)
    p["hook"].remove()
    p["owner"].__dict__.pop("_sparse_states", None)
    del model._sparse_patch
    return model


def stats(model):
    """Fractions of unit pairs computed in the last forward: {"heads", "ffn", "layers"} (None: none counted)."""
    out = {}
    for k in KINDS:
        done = sum(st.counts[k][0] for st in _states(model, "stats")["states"])
        total = sum(st.counts[k][1] for st in model._sparse_patch["states"])
        out[k] = done / total if total else None
    return out


__all__ = ["patch", "set_masks", "clear_masks", "unpatch", "stats", "calibrate_contextual_ffn", "set_contextual_ffn",
           "fit_routers",
           "layer_dropout",
           "LayerState", "ATTR"]
