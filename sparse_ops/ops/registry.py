"""Where every op is registered and dispatched: one schema, one fake, one autograd formula and one
backend -> launcher table per op, shared by the C++ kernels and their Triton twins.

- Schema: TORCH_LIBRARY in csrc/ops.cpp, the only place one is written. The Triton
  implementation of an op `name` is registered here as the twin op `name_triton` (backward ops:
  `<op>_triton_backward`) with the
  schema text read back from the compiled library, so both take the same arguments and return
  the same tensors (a build without the extension has no schemas, and so no Triton backend:
  every op then runs the reference, as `SPARSE_OPS_NO_EXT=1` documents).
- Fake kernel and autograd formula: given once per op by `define(...)` (beside the op's Python
  wrapper in sparse_ops/ops/<op>.py) and registered on the C++ op and on its Triton twin alike.
  An autograd formula is a factory `backward(lookup)`: `lookup(other)` returns the op `other`
  *of the same implementation*, so the C++ forward's gradient runs the C++ backward op and the
  Triton forward's runs the Triton one.
- Dispatch: `run(name, device, backend, *schema arguments)` picks the backend and returns the
  op's first output: cpp / cuda -> torch.ops.sparse_ops.<name>, triton -> the twin (registered
  on first use, which is when triton is first imported), torch -> the reference.

The Triton twins are `torch.library.custom_op`s whose bodies call plain launchers
(sparse_ops/triton_kernels/*: kernels only, no registration): on torch 2.11-2.14 a custom op with
a fake kernel passes every opcheck test and torch.compile treats it as one opaque node, while a
`triton_op` re-traces its body (the data-dependent parts of these launchers fail that) and,
before torch 2.14, ignores the `schema=` it is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import backend as _backend


@dataclass
class _Spec:
    name: str
    fake: Callable
    setup_context: Callable | None
    backward: Callable | None       # factory: backward(lookup) -> autograd backward function
    triton: Callable | None         # () -> the Triton launcher (plain function, schema arguments)
    reference: Callable | None      # the torch backend: schema arguments -> first output
    tuple_out: bool                 # the op returns a tuple (its first element is the user's output)


_SPECS: dict[str, _Spec] = {}
_TWINS: dict[str, object] = {}
_OPS: dict[tuple[str, str], Callable] = {}  # run's cache of _target


def define(name: str, *, fake: Callable, setup_context: Callable | None = None,
           backward: Callable | None = None, triton: Callable | None = None,
           reference: Callable | None = None, tuple_out: bool = True) -> None:
    """Declare op `name` (its schema is csrc/ops.cpp's) and register its fake and autograd formula
    on the C++ op when the extension is loaded. `triton` loads the Triton launcher lazily."""
    spec = _Spec(name, fake, setup_context, backward, triton, reference, tuple_out)
    _SPECS[name] = spec
    if _backend.has_ext():
        torch.library.register_fake(f"sparse_ops::{name}", fake)
        backward_fn, setup = _autograd(spec, _cpp_op)
        torch.library.register_autograd(f"sparse_ops::{name}", backward_fn, setup_context=setup)


def _autograd(spec: _Spec, lookup):
    """(backward, setup_context) of op `spec`. An op without a formula (the backward ops) refuses to
    be differentiated with an error naming it: without one, autograd would warn and treat its
    outputs as constants, and a second-order gradient would silently come out wrong."""
    if spec.backward is not None:
        return spec.backward(lookup), spec.setup_context

    def refuse(ctx, *grads):
        raise RuntimeError(f"sparse_ops::{spec.name}: second-order gradients (double backward) are not "
                           f"supported; differentiate the op once (create_graph=False)")

    return refuse, lambda ctx, inputs, output: None


def _cpp_op(name: str):
    return getattr(torch.ops.sparse_ops, name).default


def _schema(name: str) -> str:
    """The argument and return list of op `name` as csrc/ops.cpp declares it."""
    s = str(_cpp_op(name)._schema)
    return s[s.index("("):]


def twin_name(name: str) -> str:
    """The Triton twin's op name: gated_ffn -> gated_ffn_triton, gated_ffn_backward ->
    gated_ffn_triton_backward."""
    base, sep, _ = name.rpartition("_backward")
    return f"{base}_triton_backward" if sep and not _ else f"{name}_triton"


def triton_op(name: str):
    """The Triton twin of op `name` (torch.ops.sparse_ops.<twin_name(name)>), registered on first use."""
    op = _TWINS.get(name)
    if op is not None:
        return op
    if not _backend.has_ext():
        raise RuntimeError(f"{name}: the Triton backend takes its schemas from sparse_ops._C, which is not "
                           f"loaded ({_backend.EXT_ERROR})")
    spec = _SPECS[name]
    op = torch.library.custom_op(f"sparse_ops::{twin_name(name)}", spec.triton(), mutates_args=(),
                                 schema=_schema(name))
    op.register_fake(spec.fake)
    _TWINS[name] = op
    backward, setup = _autograd(spec, triton_op)
    op.register_autograd(backward, setup_context=setup)
    return op


def records_grad(args) -> bool:
    """Whether autograd records a call on args: grad mode on and a tensor argument requiring grad
    (an op's forward keeps what its backward needs only then: gated_ffn's `save`). Without it,
    run() calls the op below the autograd layer."""
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _target(name: str, backend: str) -> Callable:
    """What runs op `name` on `backend`: the reference (torch), or the registered op (its Triton
    twin for triton, the C++/CUDA op otherwise), which returns the schema's whole output."""
    spec = _SPECS[name]
    if backend == "torch":
        if spec.reference is None:
            raise RuntimeError(f"{name}: no reference implementation is registered")
        return spec.reference
    return triton_op(name) if backend == "triton" else _cpp_op(name)


def run(name: str, device: torch.device, backend: str | None, *args, grad: bool | None = None):
    """Pick the backend for `device` (sparse_ops.backend.choose) and run op `name` on it. `grad`:
    records_grad(args) when the caller has it already (gated_ffn: its `save`).

    Every public op reaches its kernel through here, so the path is short: a decode call follows
    large kernels, which leave the interpreter's code and data out of cache, and each Python step
    then costs 5-40 us instead of its 0.1-1 us in a hot loop (measured after a dense FFN call at
    d=768, F=3072)."""
    picked = _backend.choose(name, device, backend)
    if torch.compiler.is_compiling():
        # Traced: the op itself (autograd included), not the _OPS cache, whose first fill
        # would be traced as a dict insertion and recompile the next call.
        out = _target(name, picked)(*args)
        return out[0] if picked != "torch" and _SPECS[name].tuple_out else out
    if picked == "torch":
        return _target(name, picked)(*args)
    op = _OPS.get((name, picked))
    if op is None:
        op = _OPS[(name, picked)] = _target(name, picked)
    if grad is None:
        grad = records_grad(args)
    if grad:
        out = op(*args)
    else:
        # Nothing to differentiate: straight to the kernel, below the autograd layer (the
        # autograd wrapper was ~24 us of a ~80 us fixed cost per gated_ffn decode call).
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args)
    return out[0] if _SPECS[name].tuple_out else out
