"""sparse_ops.skip_layer: run a layer only on the kept samples (or tokens) of a batch.

Kept rows are compacted with `gather_rows`, the layer runs once on the compact batch, and
`scatter_rows` writes its output back (blending with a gate); skipped rows are never fed
to the layer and pass through unchanged. The row ops run on the chosen backend
(sparse_ops/ops/registry.py: cpp / cuda -> csrc, triton -> sparse_ops/triton_kernels/rows.py,
torch -> sparse_ops.reference); their fakes and autograd formulas are defined here.
"""
from __future__ import annotations

import torch

from .. import reference as _reference
from . import registry as _registry
from .plans import kept_positions, kept_positions_per_row, token_plan


# ----------------------------------------------------------------- row ops
def gather_rows(x: torch.Tensor, idx: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """out[k] = x[idx[k]], zeros where idx[k] == -1 (padding). idx must not repeat a row."""
    return _registry.run("gather_rows", x.device, backend, x, idx)


def scatter_rows(x: torch.Tensor, idx: torch.Tensor, src: torch.Tensor, gate: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """y = x with y[idx[k]] = src[k] (or x + gate[k] * (src[k] - x) with a gate); -1 rows skipped."""
    return _registry.run("scatter_rows", x.device, backend, x, idx, src, gate)


def _gather_fake(x, idx):
    return x.new_empty((idx.shape[0], *x.shape[1:]))


def _scatter_fake(x, idx, src, gate):
    return torch.empty_like(x)


def _scatter_backward_fake(grad, x, idx, src, gate, need):
    e = x.new_empty((0,))
    return (torch.empty_like(x) if need[0] else e, torch.empty_like(src) if need[1] else e,
            torch.empty_like(gate) if (need[2] and gate is not None) else e)


def _gather_setup(ctx, inputs, output):
    x, idx = inputs
    ctx.save_for_backward(idx)
    ctx.x_shape = x.shape


def _gather_backward(lookup):
    """gather's backward: the gradient rows scattered into zeros by the same backend's scatter."""
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return lookup("scatter_rows")(grad.new_zeros(ctx.x_shape), idx, grad, None), None
    return backward


def _scatter_setup(ctx, inputs, output):
    x, idx, src, gate = inputs
    ctx.save_for_backward(x, idx, src, gate)


def _scatter_backward(lookup):
    def backward(ctx, grad):
        x, idx, src, gate = ctx.saved_tensors
        nig = ctx.needs_input_grad
        need = [bool(nig[0]), bool(nig[2]), bool(nig[3]) and gate is not None]
        dx, dsrc, dgate = lookup("scatter_rows_backward")(grad, x, idx, src, gate, need)
        return (dx if need[0] else None, None, dsrc if need[1] else None, dgate if need[2] else None)
    return backward


def _triton(name):
    def load():
        from ..triton_kernels import rows as k
        return getattr(k, name)
    return load


_registry.define("gather_rows", fake=_gather_fake, setup_context=_gather_setup, backward=_gather_backward,
                 triton=_triton("gather"), reference=_reference.gather_rows, tuple_out=False)
_registry.define("scatter_rows", fake=_scatter_fake, setup_context=_scatter_setup, backward=_scatter_backward,
                 triton=_triton("scatter"), reference=_reference.scatter_rows, tuple_out=False)
_registry.define("scatter_rows_backward", fake=_scatter_backward_fake, triton=_triton("scatter_backward"))


# ----------------------------------------------------------------- skip_layer
def _first(out):
    """The hidden state of a layer's output (HF layers return tuples)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _rest(out):
    """The other elements of a layer's tuple output (none for a tensor)."""
    return tuple(out[1:]) if isinstance(out, (tuple, list)) else ()


def _hidden(layer, out, like):
    """The hidden state of the layer's output, checked against the rows it was given: y[b]
    replaces x[b], so it must be a tensor shaped and typed like them (errors name the layer)."""
    h = _first(out)
    name = type(layer).__name__
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"skip_layer: the layer ({name}) returned {type(out).__name__}; it must return a tensor "
                        f"shaped like its input, or a tuple whose first element is one (as Hugging Face layers do)")
    if h.shape != like.shape:
        raise ValueError(f"skip_layer: the layer ({name}) turned its input {list(like.shape)} into {list(h.shape)}; "
                         f"a skipped layer must keep the batch, the length and the width (y[b] replaces x[b])")
    if h.dtype != like.dtype:
        raise TypeError(f"skip_layer: the layer ({name}) returned {h.dtype} for a {like.dtype} input; y[b] "
                        f"replaces x[b], so the dtype must stay")
    return h


def _params_needing_grad(layer):
    # A module, or a module's bound method (e.g. the forward of a layer's parent class).
    mod = layer if isinstance(layer, torch.nn.Module) else getattr(layer, "__self__", None)
    if isinstance(mod, torch.nn.Module) and torch.is_grad_enabled():
        return [p for p in mod.parameters() if p.requires_grad]
    return []


def zero_grads_for(x, module):
    """x unchanged, with `module`'s parameters in its graph so that they get zero gradients (not
    None) from a backward through it: for a layer that no sample ran (DistributedDataParallel
    without find_unused_parameters expects every parameter to get a gradient)."""
    params = _params_needing_grad(module)
    return _ZeroGrads.apply(x, *params) if params else x


class _ZeroGrads(torch.autograd.Function):
    """Identity on x that gives `params` zero gradients (not None), so a layer that every
    sample skipped still has .grad for DistributedDataParallel without find_unused_parameters."""

    @staticmethod
    def forward(ctx, x, *params):
        ctx.shapes = [(p.shape, p.dtype, p.device) for p in params]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros(s, dtype=dt, device=dev) for s, dt, dev in ctx.shapes])


def _check_keep(x, keep, gate):
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"skip_layer: keep must be a bool tensor [B] or [B, T]; got "
                        f"{keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__}")
    if keep.dim() not in (1, 2) or x.dim() < keep.dim() or tuple(x.shape[:keep.dim()]) != tuple(keep.shape):
        raise ValueError(f"skip_layer: keep must be [B] (per sample) or [B, T] (per token) matching x's "
                         f"leading dims {tuple(x.shape[:2])}; got {tuple(keep.shape)}")
    if keep.device != x.device:
        raise ValueError(f"skip_layer: keep must be on x's device ({x.device}); got {keep.device}")
    if gate is not None:
        if not isinstance(gate, torch.Tensor) or not gate.is_floating_point():
            raise TypeError("skip_layer: gate must be a floating tensor shaped like keep")
        if tuple(gate.shape) != tuple(keep.shape):
            raise ValueError(f"skip_layer: gate must be shaped like keep {tuple(keep.shape)}; got {tuple(gate.shape)}")
        if gate.device != x.device:
            raise ValueError(f"skip_layer: gate must be on x's device ({x.device}); got {gate.device}")


def _roles(x, keep, args, kwargs, travel, stay):
    """For each tensor argument, whether it travels with x (is compacted with the kept rows).

    Named ones (travel / stay: kwarg names or positions in args) as named; the others by shape:
    per sample, a tensor travels when its first dimension is B; per token, when its first two
    are [B, T]. Where B == T a square leading block ([B, B, ...]: a [T, T] attention mask or a
    [B, T] padding mask) cannot be told apart, and an error asks to name it."""
    travel, stay = set(travel or ()), set(stay or ())
    both = travel & stay
    if both:
        raise ValueError(f"skip_layer: {sorted(map(str, both))} named in both travel= and stay=")
    known = set(range(len(args))) | set(kwargs)
    unknown = (travel | stay) - known
    if unknown:
        raise ValueError(f"skip_layer: travel= / stay= name {sorted(map(str, unknown))}, which are not arguments "
                         f"of this call (positions 0..{len(args) - 1} of *args, or keyword names {sorted(kwargs)})")
    B = x.shape[0]
    per_token = keep.dim() == 2
    T = x.shape[1] if x.dim() >= 2 else None
    roles = {}
    for key, t in list(enumerate(args)) + list(kwargs.items()):
        if not isinstance(t, torch.Tensor):
            continue
        if key in travel or key in stay:
            roles[key] = key in travel
            continue
        lead = tuple(t.shape[:2]) == tuple(keep.shape) if per_token else (t.dim() >= 1 and t.shape[0] == B)
        if lead and B == T and t.dim() >= 2 and t.shape[0] == t.shape[1]:
            name = f"args[{key}]" if isinstance(key, int) else key
            raise ValueError(f"skip_layer: {name} {list(t.shape)} is ambiguous: its first dimension is the batch "
                             f"B = {B} and its first two could be [T, T] = [{T}, {T}] (an attention mask). Name it: "
                             f"travel=[{key!r}] (per sample, compacted with x) or stay=[{key!r}] (shared)")
        roles[key] = lead
    return roles


def skip_layer(layer, x, keep, *args, gate=None, dense_grad=False, pad_mask_kwarg=None,
               backend="auto", travel=None, stay=None, full_output=False, **kwargs):
    """Run `layer` only on kept samples (keep [B]) or kept tokens (keep [B, T]); skipped rows pass through.

    Per sample: y[b] = layer(x)[b] where kept, x[b] where skipped. Tensor args/kwargs whose first
    dimension is B are compacted alongside x (they travel with it); the others are passed as they
    are. travel= / stay= (kwarg names, or positions in *args) say it where the shape cannot: a
    [B, B, ...] tensor when B == T (a [T, T] attention mask and a [B, T] padding mask look alike)
    is an error until named.
    Per token (Mixture-of-Depths): each sample's kept tokens, in order, form a [B, k, ...] batch
    (uneven counts are padded with zero tokens; the layer is told which are real through the kwarg
    named by `pad_mask_kwarg`, which receives a bool [B, k] mask, True = real token). Tensor
    args/kwargs shaped [B, T, ...] are gathered the same way. Skipped tokens are unchanged.
    gate (float, shaped like keep): y = x + gate * (layer(...) - x); a gate of exactly 0 skips the
    row. Straight-through gradient: exact for rows that ran; for skipped rows 0, or exact with
    dense_grad=True (the layer then runs on those rows in backward only).
    Layers returning tuples (HF) are supported: the first element is the hidden state, and the
    result is y alone. full_output=True returns (y, *others): the layer's other elements as it
    returned them for the rows it ran, so a per-sample element (attention weights, a cache
    entry) holds the kept rows only, in the order of keep.nonzero() (per token: [B, k, ...] as
    the layer saw them); skipped rows have no entry. When nothing runs, the layer is still called
    on zero rows to give the other elements their structure. (All rows kept, no gate: the
    layer's own output, whole.)
    Under torch.compile (fullgraph=True, dynamic batch) the kept count is a symbol of the graph:
    one graph for every mask, no recompile when it changes. The layer is traced on a batch of
    unknown size (possibly 0), which torch.nn layers accept per sample; per token the unknown
    size is the sequence length, on which torch's own attention guards (torch 2.13: Eq(1, k) in
    F.multi_head_attention_forward), so an attention layer per token does not trace with
    fullgraph. dense_grad=True refuses to compile (the rows it re-runs depend on gate values).
    On CUDA the kept rows cost one host synchronisation (their count depends on keep's values);
    the row ops themselves (gather_rows / scatter_rows with int64 idx) synchronise never: their
    index checks run on the device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"skip_layer: x must be a torch.Tensor; got {type(x).__name__}")
    _check_keep(x, keep, gate)
    if gate is not None and gate.dtype != x.dtype:
        raise TypeError(f"skip_layer: gate must have x's dtype ({x.dtype}); got {gate.dtype}")
    if x.device.type == "meta":
        # Shapes only (no values to compact by): the output is shaped like x whatever runs.
        return _hidden(layer, layer(x, *args, **kwargs), x)
    roles = _roles(x, keep, args, kwargs, travel, stay)
    run = keep if gate is None else keep & (gate != 0)
    per_token = keep.dim() == 2
    B = x.shape[0]
    R = B * x.shape[1] if per_token else B
    xr = x.reshape(R, *x.shape[2:]) if per_token else x
    run_flat = run.reshape(-1)
    gate_flat = gate.reshape(-1) if gate is not None else None

    compiling = torch.compiler.is_compiling()
    if per_token:
        if compiling:
            idx, valid = kept_positions_per_row(run)
            kmax, n_run = valid.shape[1], None
        else:
            idx, valid, kmax, n_run = token_plan(run)
    else:
        idx = kept_positions(run_flat) if compiling else torch.nonzero(run_flat).reshape(-1)
        n_run = None if compiling else idx.numel()

    def compact(t):
        if per_token:
            if tuple(t.shape[:2]) != tuple(keep.shape):
                raise ValueError(f"skip_layer: an argument named in travel= must be [B, T, ...] = "
                                 f"{list(keep.shape)} + ...; got {list(t.shape)}")
            return gather_rows(t.reshape(R, *t.shape[2:]), idx, backend).reshape(B, kmax, *t.shape[2:])
        if t.dim() == 0 or t.shape[0] != B:
            raise ValueError(f"skip_layer: an argument named in travel= must have the batch B = {B} first; "
                             f"got {list(t.shape)}")
        return gather_rows(t, idx, backend)

    # Traced (n_run None): one path for every mask, the kept count a graph symbol; a layer no
    # row runs sees an empty batch (its parameters still get zero gradients).
    # With full_output, a mask that runs nothing still calls the layer (on zero rows) for the
    # structure of its other outputs.
    rest = ()
    if n_run == 0 and not full_output:
        y = x
        params = _params_needing_grad(layer)
        if params:
            y = _ZeroGrads.apply(x, *params)
    elif not per_token and n_run == B and gate is None:
        out = layer(x, *args, **kwargs)  # nothing skipped: no copies
        h = _hidden(layer, out, x)
        return (h, *_rest(out)) if full_output else h
    else:
        xc = compact(x)
        args_c = [compact(a) if roles.get(i) else a for i, a in enumerate(args)]
        kwargs_c = {k: compact(v) if roles.get(k) else v for k, v in kwargs.items()}
        if per_token and pad_mask_kwarg is not None:
            kwargs_c[pad_mask_kwarg] = valid
        full = layer(xc, *args_c, **kwargs_c)
        rest = _rest(full)
        out = _hidden(layer, full, xc)
        if per_token:
            out = out.reshape(B * kmax, *out.shape[2:])
        g = None
        if gate_flat is not None:
            g = gather_rows(gate_flat, idx, backend)
        y = scatter_rows(xr, idx, out, g, backend)
        if per_token:
            y = y.reshape(x.shape)

    if dense_grad and gate is not None and gate.requires_grad and torch.is_grad_enabled():
        if compiling:
            raise NotImplementedError("skip_layer: dense_grad=True does not compile (the rows it re-runs in "
                                      "backward are chosen by the gate's values); call it outside "
                                      "torch.compile or use dense_grad=False")
        skipped = torch.nonzero((keep & (gate == 0)).reshape(-1)).reshape(-1)
        if skipped.numel() > 0:
            y = _dense_gate_grad(layer, x, keep, y, gate, skipped, args, kwargs, per_token,
                                 pad_mask_kwarg, backend, travel, stay)
    return (y, *rest) if full_output else y


def _dense_gate_grad(layer, x, keep, y, gate, skipped, args, kwargs, per_token, pad_mask_kwarg, backend,
                     travel, stay):
    """Attach the exact gate gradient of rows a zero gate skipped (computed in backward only)."""
    def run_skipped():
        # The layer's output on the skipped rows as if they had been kept (gate 1).
        full = skip_layer(layer, x.detach(), keep & (gate == 0), *args, gate=None,
                          pad_mask_kwarg=pad_mask_kwarg, backend=backend, travel=travel, stay=stay, **kwargs)
        rows = full.reshape(-1, *full.shape[(2 if per_token else 1):])[skipped]
        xs = x.detach().reshape(-1, *x.shape[(2 if per_token else 1):])[skipped]
        return rows, xs

    return _GateGradAdder.apply(y, gate, run_skipped, skipped)


class _GateGradAdder(torch.autograd.Function):
    """Identity on y; its backward gives the gate of each row a zero gate skipped its exact
    gradient, sum((layer(x) - x) * dy), running the layer on those rows in backward only."""

    @staticmethod
    def forward(ctx, y, gate, run_skipped, skipped):
        ctx.run_skipped, ctx.skipped = run_skipped, skipped
        ctx.gate_shape = gate.shape
        return y.view_as(y)

    @staticmethod
    def backward(ctx, gy):
        with torch.no_grad():
            out_s, x_s = ctx.run_skipped()
            gy_s = gy.reshape(-1, *out_s.shape[1:])[ctx.skipped]
            dgate = torch.zeros(ctx.gate_shape, dtype=gy.dtype, device=gy.device).reshape(-1)
            dgate[ctx.skipped] = ((out_s - x_s) * gy_s).reshape(out_s.shape[0], -1).sum(1)
        return gy, dgate.reshape(ctx.gate_shape), None, None
