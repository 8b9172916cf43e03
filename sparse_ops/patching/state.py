"""What a patched layer knows: its masks, the rows that reach it, and what ran in the last forward.

One `LayerState` per transformer layer of a patched model, kept on the layer module as the
attribute `_sparse_state` (not a parameter or buffer: nothing of it is in state_dict). The
converted attention, FFN and layer modules of that layer read their masks from it and add what
they computed to its counters; `sparse_ops.stats` sums the counters over the layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..gates import FFNRouter, SampleRouter
from ..nn.attention_paths import forward_sparse

ATTR = "_sparse_state"
KINDS = ("heads", "ffn", "layers")


@dataclass
class LayerState:
    index: int                       # the layer's position in the model
    num_heads: int
    ffn_size: int
    width: int = 0                       # the layer's input width (d; a SampleRouter's input)
    heads: torch.Tensor | None = None    # None | bool [H] | bool [B, H]
    ffn: torch.Tensor | None = None      # None | bool [F] | int64 [K] | bool [B, F] | bool [B, T, F]
    keep: torch.Tensor | None = None     # this layer's column of the layers mask: None | bool [] | bool [B]
    # Set by the layer's forward for the modules inside it: the full batch size of this call and,
    # when only some samples run the layer, their indices (the modules then receive those rows only
    # and select the same rows of their [B, ...] masks).
    batch: int = 0
    rows: torch.Tensor | None = None
    # Contextual FFN sparsity (patching/contextual.py): the layer's threshold on |act(x W_gate)|,
    # the |activation| samples a calibration collects, the transposed down-projection copy.
    ffn_threshold: float | None = None
    ffn_calib: list | None = None
    ffn_down_t: torch.Tensor | None = None
    # Row count N -> calls of N rows left to run dense without counting their union (contextual.py's
    # RECHECK; the routed FFN of router.py uses it too).
    ffn_dense_left: dict = field(default_factory=dict)
    # Learned gates (patch(model, gate=...)): the layer's sparse_ops.gates.LayerGates, and what this
    # forward runs (begin_layer): {"heads", "ffn", "keep"} -> the mask set above combined with the
    # gate's values (float, exact zeros skipped), or the mask alone where that kind has no gate.
    gates: object | None = None
    now: dict | None = None
    # A routed FFN (patching/router.py, gates["ffn"] an FFNRouter): the MLP inputs fit_routers
    # records, and the transposed down-projection copy (set_router_down).
    router_record: list | None = None
    router_down_t: torch.Tensor | None = None
    # LayerDrop (patching.layer_dropout): in training, each sample (or the whole batch) skips this
    # layer with probability drop_p, drawn from drop_gen (None: torch's default generator).
    drop_p: float = 0.0
    drop_per_sample: bool = True
    drop_gen: object | None = None
    # (computed, total) unit pairs of the last forward: (sample, head), (token, column), (sample, layer).
    counts: dict = field(default_factory=lambda: {k: [0, 0] for k in KINDS})

    def reset_counts(self):
        for k in KINDS:
            self.counts[k] = [0, 0]

    def add(self, kind: str, computed: int, total: int):
        c = self.counts[kind]
        c[0] += int(computed)
        c[1] += int(total)

    def rows_of(self, mask: torch.Tensor, n: int) -> torch.Tensor:
        """The rows of a per-sample mask ([B, ...]) that belong to the n samples this call received."""
        if mask.shape[0] == n:
            return mask
        if self.rows is not None and mask.shape[0] == self.batch and self.rows.numel() == n:
            return mask.index_select(0, self.rows)
        raise ValueError(f"sparse_ops: layer {self.index}: a per-sample mask of batch {mask.shape[0]} was set, "
                         f"but this forward has batch {self.batch or n}; set_masks again for this batch size")


# ----------------------------------------------------------------- shared by the model families
_CLASSES: dict = {}


def converted(cls, mixin):
    """The Sparse<Name> subclass of a model's module class (one per (class, mixin))."""
    key = (cls, mixin)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Sparse{cls.__name__}", (mixin, cls), {"_sparse_original": cls})
    return _CLASSES[key]


def convert_module(mod, mixin, st: LayerState, attr: str = "_sparse_layer_state"):
    setattr(mod, attr, st)
    mod.__class__ = converted(type(mod), mixin)


def restore_modules(mods, names=(ATTR, "_sparse_layer_state", "_sparse_act")):
    """The original classes back, and the attributes conversion added gone."""
    for mod in mods:
        orig = getattr(type(mod), "_sparse_original", None)
        if orig is not None:
            mod.__class__ = orig
        for nm in names:
            if nm in mod.__dict__:
                delattr(mod, nm)


def token_mask(mask, B: int, T: int):
    """The real tokens (bool [B, T]) of a layer's T queries from its attention mask, or None (all
    real, or a mask form this does not read). mask: [B or 1, 1 or H, T, Tk] (bool, True = attend, or
    additive float, its minimum = masked: a key is real when some query attends to it; with a
    cache, the last T keys are the queries' own), or a [B, T] key-padding form already turned into
    True = real by the family."""
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2 and mask.dtype == torch.bool and tuple(mask.shape) == (B, T):
        return mask
    if mask.dim() != 4 or mask.shape[-1] < T:
        return None
    att = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    real = att.any(2).any(1)[:, -T:]  # [B or 1, T]
    return real.expand(B, T) if real.shape[0] in (1, B) else None


def begin_layer(st: LayerState, B: int, T: int, training: bool = False, device=None, x=None, mask=None):
    """A layer's forward starts: the batch its modules see, what a dense forward would compute, and
    what this forward runs: the masks that are set, with (in training) this forward's LayerDrop
    draw and (with learned gates) the gates' values combined in (st.now). x: the layer's input
    [B, T, d], mask its attention mask (token_mask's forms) — what a SampleRouter reads."""
    st.batch, st.rows = B, None
    st.add("heads", 0, B * st.num_heads)
    st.add("ffn", 0, B * T * st.ffn_size)
    keep = st.keep
    dropping = training and st.drop_p > 0.0
    if dropping:
        n = B if st.drop_per_sample else 1
        drawn = torch.rand(n, generator=st.drop_gen) >= st.drop_p  # on the CPU: the generator's device
        drawn = drawn.to(device).expand(B)
        keep = drawn if keep is None else keep & drawn
    if st.gates is not None:
        fg = st.gates.get("ffn")
        pooled = _pooled(st, x, mask)
        st.now = {"heads": _gated(st.heads, st.gates.get("heads"), st.num_heads, pooled),
                  # an FFNRouter needs the MLP's input: the MLP applies it (patching/router.py)
                  "ffn": st.ffn if isinstance(fg, FFNRouter) else _gated(st.ffn, fg, st.ffn_size, pooled),
                  "keep": _gated(keep, st.gates.get("layer"), None, pooled)}
    else:
        st.now = {"heads": st.heads, "ffn": st.ffn, "keep": keep} if dropping else None


def _pooled(st: LayerState, x, mask):
    """(router input [B, d], learn) for the layer's SampleRouters, or None when it has none.
    learn: the routers' straight-through float gates (grad enabled and their parameters learn), else
    their bool masks (inference: nothing multiplies)."""
    routers = [g for g in (st.gates.get(k) for k in ("heads", "ffn", "layer")) if isinstance(g, SampleRouter)]
    if not routers:
        return None
    if x is None:
        raise RuntimeError(f"sparse_ops: layer {st.index} has an input-dependent gate but its forward gave "
                           f"begin_layer no input")
    learn = torch.is_grad_enabled() and any(p.requires_grad for r in routers for p in r.parameters())
    return routers[0].pool(x, token_mask(mask, x.shape[0], x.shape[1]) if x.dim() == 3 else None), learn


def _gated(mask, gate, n, pooled=None):
    """The mask (bool, or int64 indices when n is given) times the gate's values of this forward
    (a SampleRouter's: per sample, [B, n] or [B] for the layer; bool when not learning)."""
    if gate is None:
        return mask
    if isinstance(gate, SampleRouter):
        p, learn = pooled
        g = gate.gate(p) if learn else gate.mask(p)
    else:
        g = gate()
        if n is None:  # the layer gate: one value, [] ; a [B] keep mask selects per sample
            g = g.reshape(())
    if mask is None:
        return g
    if mask.dtype == torch.int64:
        mask = torch.zeros(n, dtype=torch.bool, device=mask.device).index_fill_(0, mask, True)
    if mask.dim() == 3 and g.dim() == 2:  # a per-token FFN mask [B, T, F] and a per-sample router's [B, F]
        g = g[:, None, :]
    if g.dtype == torch.bool:
        return mask & g
    return torch.where(mask, g, g.new_zeros(()))


def active(st: LayerState, kind: str):
    """What this forward runs of kind ("heads", "ffn", "keep"): None (everything), a bool mask, or
    float gate values (with learned gates: exact zeros are skipped, the others multiply)."""
    return st.now[kind] if st.now is not None else getattr(st, kind)


def layer_plan(st: LayerState, B: int):
    """(keep, gate) for the layer's rows: keep None | bool [] | bool [B] as the families take it;
    gate None, or float [B] (a learned layer gate: the layer then runs through skip_layer with it,
    y = x + gate * (layer(x) - x), so the gate gets its gradient)."""
    k = active(st, "keep")
    if k is None or not k.is_floating_point():
        return k, None
    g = k.expand(B) if k.dim() == 0 else k
    return g != 0, g


def runs_whole(keep) -> bool | None:
    """For a layer's keep flag(s): True (every sample runs), False (none does), None (some)."""
    if keep is None:
        return True
    if keep.dim() == 0:
        return bool(keep)
    if bool(keep.all()):
        return True
    return False if not bool(keep.any()) else None


def ffn_active(st: LayerState, n: int, T: int):
    """The FFN mask of this call as gated_ffn takes it (per-sample [B, F] masks expanded over the
    T tokens of each of the n samples), and the (token, column) pairs it runs."""
    a = active(st, "ffn")
    F_ = st.ffn_size
    if a.is_floating_point():  # gate values: [F], [B, F] or [B, T, F] (a per-token mask times a gate)
        if a.dim() >= 2:
            a = st.rows_of(a, n)
            if a.dim() == 2:
                return a[:, None, :], T * int((a != 0).sum())
            return a, int((a != 0).sum())
        return a, n * T * int((a != 0).sum())
    if a.dtype == torch.bool and a.dim() >= 2:
        a = st.rows_of(a, n)
        if a.dim() == 2:  # per sample: the same columns for each of its tokens
            return a[:, None, :].expand(n, T, F_), T * int(a.sum())
        return a, int(a.sum())
    return a, n * T * (int(a.sum()) if a.dtype == torch.bool else a.numel())


def ffn_call(st: LayerState, n: int, T: int):
    """(active, gate) of this call for gated_ffn (a mask, or gate values with active None), or None
    when nothing is masked or gated (the module's own dense FFN runs); either way the (token,
    column) pairs it runs are counted."""
    if active(st, "ffn") is None:
        st.add("ffn", n * T * st.ffn_size, 0)
        return None
    a, computed = ffn_active(st, n, T)
    st.add("ffn", computed, 0)
    return (None, a) if a.is_floating_point() else (a, None)


def find_layers(model, attr: str, is_layer):
    """The entries of the first ModuleList named `attr` whose entries all pass is_layer, or None."""
    for mod in model.modules():
        lst = getattr(mod, attr, None)
        if isinstance(lst, torch.nn.ModuleList) and len(lst) > 0 and all(is_layer(m) for m in lst):
            return list(lst)
    return None


def attend_heads(st: LayerState, w, x, mask4, causal: bool, dropout_p: float):
    """Self-attention of x [n, T, E] over this call's running heads (nn.attention_paths.forward_sparse:
    shared heads in one pass, per-sample masks in groups), out-projection included; counts the
    (sample, head) pairs it runs."""
    n = x.shape[0]
    h = active(st, "heads")
    m = h if h.dim() == 1 else st.rows_of(h, n)
    on = m != 0 if m.is_floating_point() else m
    st.add("heads", n * int(on.sum()) if on.dim() == 1 else int(on.sum()), 0)
    return forward_sparse(w, x, x, x, m, on, mask4, causal, dropout_p, "auto")


def heads_of(st: LayerState, n: int):
    """(m, heads): this call's head mask ([H], or [n, H] for its samples; bool, or float gate values)
    and the sorted heads that run for at least one of them; counts the (sample, head) pairs that
    run (a per-sample mask's off pairs are skipped inside masked_head_attention)."""
    h = active(st, "heads")
    m = h if h.dim() == 1 else st.rows_of(h, n)
    on = m != 0 if m.is_floating_point() else m
    st.add("heads", n * int(on.sum()) if on.dim() == 1 else int(on.sum()), 0)
    union = on if on.dim() == 1 else on.any(0)
    return m, torch.nonzero(union).flatten()


def activation_name(table: dict, act, who: str) -> str:
    """gated_ffn's name for a model's activation (table: the model's names -> ours), or a clear error."""
    name = table.get(act) if isinstance(act, str) else None
    if name is None:
        raise TypeError(f"sparse_ops.patch: {who}'s activation {act!r} is not one gated_ffn runs "
                        f"({sorted(k for k, v in table.items() if v)}); patch with ffn=False")
    return name


def convert_layer(layer, st: LayerState, parts):
    """Give `layer` its state and Sparse<Name> class; parts: [(module inside it, mixin)] converted
    with the same state (read as `_sparse_layer_state`)."""
    setattr(layer, ATTR, st)
    for mod, mixin in parts:
        convert_module(mod, mixin, st)
