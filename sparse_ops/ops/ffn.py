"""sparse_ops.gated_ffn: an FFN whose inactive hidden columns are never computed.

The wrapper flattens x to [N, d], brings `active` and `gate` to the forms the registered op
takes ([F] shared or [N, F] per row) and runs `sparse_ops::gated_ffn` on the chosen backend
(sparse_ops/ops/registry.py: cpp / cuda -> csrc, triton -> sparse_ops/triton_kernels/ffn.py,
torch -> sparse_ops.reference). The op's fake kernel and autograd formula are defined here,
once, for every backend.
"""
from __future__ import annotations

import math

import torch

from .. import activations as _acts
from .. import backend as _backend
from .. import reference as _reference
from . import registry as _registry


def _check_tensor(t, name: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"gated_ffn: {name} must be a torch.Tensor; got {type(t).__name__}")


def _check_devices(x, w1, w2, b1, b2, w3, active, gate):
    """Every tensor on x's device. Run where a mixed call lands without reaching a kernel that
    checks (csrc's do): the fake kernel (a meta w1 sends a CPU x there, which then returned
    uninitialised memory) and the reference; not in the wrapper, whose every step is paid on
    each decode call."""
    dev = x.device
    for name, t in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2), ("w3", w3), ("active", active),
                    ("gate", gate)):
        if t is None and name not in ("w1", "w2"):
            continue
        _check_tensor(t, name)
        if t.device != dev:
            raise ValueError(f"gated_ffn: {name} must be on x's device ({dev}); got {t.device}")


def _broadcasts_to(shape, target) -> bool:
    # What torch.broadcast_shapes(shape, target) == target checks, without its cost
    # (~40% of this wrapper's time at decode sizes, where the whole call is ~0.1 ms).
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def _normal_already(x, w1, w2, active, gate) -> bool:
    """Whether _normalize would change nothing: x is [N, d], w1 and w2 are tensors, no gate, and
    active is None, int64 indices, a bool [F] or a bool [N, F] (the op checks the rest with the
    same messages). It spares a decode call the views of x, the mask and the output."""
    T = torch.Tensor
    if gate is not None or not (isinstance(x, T) and isinstance(w1, T) and isinstance(w2, T)) or x.dim() != 2:
        return False
    if active is None:
        return True
    if not isinstance(active, T):
        return False
    if active.dtype == torch.int64:
        return active.dim() == 1
    return active.dtype == torch.bool and (active.dim() == 1 or active.shape == (x.shape[0], w1.shape[0]))


def _normalize(x, w1, active, gate):
    """x -> [N, d]; active -> None / int64 [K] / bool [F] / bool [N, F]; gate -> None / [F] / [N, F]."""
    _check_tensor(x, "x")
    _check_tensor(w1, "w1")
    if x.dim() < 1:
        raise ValueError("gated_ffn: x must be [..., d]; got a 0-d tensor")
    if w1.dim() != 2:
        raise ValueError(f"gated_ffn: w1 must be 2-D [F, d]; got shape {tuple(w1.shape)}")
    lead = tuple(x.shape[:-1])
    d = x.shape[-1]
    N = math.prod(lead)
    F_ = w1.shape[0]
    x2 = x.reshape(N, d)
    hidden = lead + (F_,)
    if active is not None:
        _check_tensor(active, "active")
        if active.dtype == torch.bool and active.dim() > 1:
            if not _broadcasts_to(active.shape, hidden) or active.shape[-1] != F_:
                raise ValueError(f"gated_ffn: a per-row active mask must be bool [..., F] broadcastable to "
                                 f"{hidden}; got {tuple(active.shape)}")
            if all(s == 1 for s in active.shape[:-1]):
                active = active.reshape(F_)
            else:
                active = active.expand(hidden).reshape(N, F_)
        elif active.dtype not in (torch.bool, torch.int64):
            raise TypeError(f"gated_ffn: active must be int64 indices [K] or a bool mask; got dtype {active.dtype}")
    if gate is not None:
        _check_tensor(gate, "gate")
        if not gate.is_floating_point():
            raise TypeError(f"gated_ffn: gate must be a floating tensor; got dtype {gate.dtype}")
        if not _broadcasts_to(gate.shape, hidden):
            raise ValueError(f"gated_ffn: gate must be broadcastable to the hidden shape {hidden}; "
                             f"got {tuple(gate.shape)}")
        if all(s == 1 for s in gate.shape[:-1]) and gate.shape[-1:] == (F_,):
            gate = gate.reshape(F_)
        elif gate.dim() == 0 or all(s == 1 for s in gate.shape):
            gate = gate.reshape(1).expand(F_)
        else:
            gate = gate.expand(hidden).reshape(N, F_)
    return x2, lead, active, gate


def gated_ffn(x, w1, w2, active=None, *, b1=None, b2=None, w3=None, gate=None,
              activation="gelu", w2_transposed=False, dense_grad=False, backend="auto"):
    """act(x w1^T + b1) [* (x w3^T)] * mask * gate, then w2 and b2; inactive columns never run.

    x [..., d]; w1, w3 [F, d]; w2 [d, F] (nn.Linear layout) or [F, d] with w2_transposed=True.
    active: None (all), int64 indices [K] (distinct, in [0, F)) or bool [F] shared by all rows, or
    bool [..., F] per row. A bool mask or a gate costs one host synchronisation on CUDA (the count of
    columns that run); int64 indices without a gate cost none (they are checked on the device).
    gate: float, broadcastable to [..., F]; a gate of exactly 0 skips its unit (straight-through
    gradient: exact for units that ran; for skipped units 0, or exact with dense_grad=True).
    activation: 'gelu' | 'gelu_tanh' | 'relu' | 'silu'. Returns a tensor shaped like x.
    """
    # The fast path (2-D x, plain mask, no gate: every decode call) runs as few Python steps as it
    # can: after a large kernel each one is paid with the interpreter's data out of cache (5-40
    # us a step, against 0.1-1 us in a hot loop; see registry.run).
    if activation not in _acts.CODE:
        _acts.check(activation)
    flat = _normal_already(x, w1, w2, active, gate)
    if not flat:
        x2, lead, active, gate = _normalize(x, w1, active, gate)
        _check_tensor(w2, "w2")
    else:
        x2 = x
    save = torch.is_grad_enabled() and _registry.records_grad((x, w1, w2, b1, b2, w3, gate))
    out = _registry.run("gated_ffn", x.device, _pick(backend, x2) if x2.is_cuda else backend, x2, w1, w2, b1, b2, w3, active, gate,
                        activation, w2_transposed, dense_grad, save, grad=save)
    return out if flat else out.reshape(*lead, out.shape[-1])


# What auto picks for decode on CUDA, and why (sparse_ops.info() reports it).
AUTO_CUDA_DECODE = (
    f"gated_ffn with 1..{_reference.FFN_DECODE_MAX_ROWS} rows on CUDA: triton, then cuda. By design "
    "estimate, not yet measured on a GPU: the Triton split-K GEMV (triton_kernels/ffn.py decode_gemv) "
    "keeps ~8-17 MB of weight loads in flight on an H200 (~3.4 MB saturate its 4.8 TB/s), the CUDA "
    "warp-per-column kernel ~0.5 MB.")


def _pick(backend, x2):
    """The backend for this call: auto's pick, except decode on CUDA (AUTO_CUDA_DECODE)."""
    if x2.is_cuda and 0 < x2.shape[0] <= _reference.FFN_DECODE_MAX_ROWS and _backend.is_auto(backend) \
            and _backend.usable("triton", "gated_ffn", "cuda")[0]:
        return "triton"
    return backend


# ----------------------------------------------------------------- registration
def _fake(x, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed, dense_grad, save=True):
    _check_devices(x, w1, w2, b1, b2, w3, active, gate)
    N, d = x.shape
    F_ = w1.shape[0]
    if active is None and gate is None:
        K = F_
    elif active is not None and active.dtype == torch.int64 and gate is None:
        K = active.shape[0]  # distinct indices (the op refuses repeats): K is static
    else:
        # K (columns that run) depends on the mask's values; bounded by F when F is static.
        ctx = torch.library.get_ctx()
        K = ctx.new_dynamic_size(min=0, max=F_) if isinstance(F_, int) else ctx.new_dynamic_size()
    pre = x.new_empty((N, K)) if save else x.new_empty((0,))
    up = x.new_empty((N, K)) if (w3 is not None and save) else x.new_empty((0,))
    # The row plan: bool [N, K] / int64 [N] for per-row masks, else empty (shapes by input shapes).
    per_row = _reference.ffn_per_row(active, gate)
    row_mask = x.new_empty((N, K) if per_row else (0,), dtype=torch.bool)
    row_group = x.new_empty((N,) if per_row else (0,), dtype=torch.int64)
    return (x.new_empty((N, d)), x.new_empty((K,), dtype=torch.int64), pre, up, row_mask, row_group)


def _backward_fake(grad_out, x, w1, w2, b1, w3, active, gate, idx, pre, up, row_mask, row_group, activation,
                   w2_transposed, dense_grad, need):
    e = x.new_empty((0,))
    nx, nw, ng = need
    # new_empty, not empty_like: the gradients are contiguous whatever the inputs' strides.
    return (x.new_empty(x.shape) if nx else e,
            x.new_empty(w1.shape) if nw else e,
            x.new_empty(w2.shape) if nw else e,
            x.new_empty(w3.shape) if (nw and w3 is not None) else e,
            x.new_empty(b1.shape) if (nw and b1 is not None) else e,
            x.new_empty((x.shape[1],)) if nw else e,
            x.new_empty(gate.shape) if (ng and gate is not None) else e)


def _setup_context(ctx, inputs, output):
    x, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed, dense_grad = inputs[:11]
    if len(inputs) > 11 and not inputs[11]:
        raise RuntimeError("sparse_ops::gated_ffn: called with save=False, which keeps nothing for the backward, "
                           "on inputs that require grad; call it with save=True")
    _, idx, pre, up, row_mask, row_group = output
    ctx.save_for_backward(x, w1, w2, b1, w3, active, gate, idx, pre, up, row_mask, row_group)
    ctx.args = (activation, w2_transposed, dense_grad)
    ctx.has = (b1 is not None, b2 is not None, w3 is not None, gate is not None)


def _backward(lookup):
    def backward(ctx, grad_out, _g_idx, _g_pre, _g_up, _g_row_mask, _g_row_group):
        x, w1, w2, b1, w3, active, gate, idx, pre, up, row_mask, row_group = ctx.saved_tensors
        nig = ctx.needs_input_grad
        need = [bool(nig[0]), any(bool(nig[i]) for i in (1, 2, 3, 4, 5)), bool(nig[7])]
        if grad_out is None:
            grad_out = torch.zeros((x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
        dx, dw1, dw2, dw3, db1, db2, dgate = lookup("gated_ffn_backward")(
            grad_out, x, w1, w2, b1, w3, active, gate, idx, pre, up, row_mask, row_group, *ctx.args, need)
        has_b1, has_b2, has_w3, has_gate = ctx.has
        return (dx if nig[0] else None,
                dw1 if nig[1] else None,
                dw2 if nig[2] else None,
                db1 if (nig[3] and has_b1) else None,
                db2 if (nig[4] and has_b2) else None,
                dw3 if (nig[5] and has_w3) else None,
                None,
                dgate if (nig[7] and has_gate) else None,
                None, None, None, None)
    return backward


def _triton_forward():
    from ..triton_kernels import ffn as k
    return k.forward


def _triton_backward():
    from ..triton_kernels import ffn as k
    return k.backward


def _reference_forward(x, w1, w2, b1, b2, w3, active, gate, activation, w2_transposed, dense_grad, save=True):
    _check_devices(x, w1, w2, b1, b2, w3, active, gate)
    _reference.check_ffn_indices(active, w1.shape[0])  # the kernels' rule (the reference alone treats them as a set)
    return _reference.gated_ffn(x, w1, w2, active, b1=b1, b2=b2, w3=w3, gate=gate, activation=activation,
                                w2_transposed=w2_transposed, dense_grad=dense_grad)


_registry.define("gated_ffn", fake=_fake, setup_context=_setup_context, backward=_backward,
                 triton=_triton_forward, reference=_reference_forward)
_registry.define("gated_ffn_backward", fake=_backward_fake, triton=_triton_backward)
