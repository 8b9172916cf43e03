"""Which implementation runs: cpp (csrc/cpu), cuda (csrc/cuda), triton, or torch (reference.py).

`set_backend(name)` sets the process-wide choice; every op also takes `backend=` per call.
"auto" picks, for the tensors' device, the fastest implementation that is built and usable:
CPU -> cpp; CUDA -> cuda, then triton. The torch reference runs only when nothing else
applies, and says why once (a warning per op and reason).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "cpp", "cuda", "triton", "torch")

try:
    # Loads the TORCH_LIBRARY schemas and kernels. By name, not `from . import _C`: import-linter
    # reads that as an import of the whole sparse_ops package (it sees no module in a .so).
    _C = importlib.import_module(f"{__package__}._C")
    EXT_ERROR = None
except ImportError as e:  # SPARSE_OPS_NO_EXT=1 build, or a build that failed to load
    _C = None
    EXT_ERROR = f"sparse_ops._C could not be imported ({e})"

try:
    from ._build_info import BUILD
except ImportError:
    BUILD = {"ext": False, "cuda": False, "why": "sparse_ops was not built with setup.py"}

_current = os.environ.get("SPARSE_OPS_BACKEND", "auto")
_warned: set = set()
# choose()'s answers for (op, device type, requested name): what is built and usable does not
# change within a process, and the lookup is a visible share of a decode call's ~40 us fixed
# cost. Cleared by set_backend.
_chosen: dict = {}


def set_backend(name: str) -> None:
    """Set the process-wide backend: one of 'auto', 'cpp', 'cuda', 'triton', 'torch'."""
    global _current
    if name not in BACKENDS:
        raise ValueError(f"set_backend: name must be one of {BACKENDS}; got {name!r}")
    _current = name
    _chosen.clear()
    _prefill()


def get_backend() -> str:
    return _current


def has_ext() -> bool:
    return _C is not None


# Answers are cached in plain dicts, filled on first use (eagerly at import for the
# registered ops): torch.compile traces a dict lookup, but not the dispatcher query.
_kernel_cache: dict = {}
_triton_cache: dict = {}
_REGISTERED_OPS = ("gated_ffn", "gather_rows", "scatter_rows", "masked_head_attention")


def has_kernel(op: str, key: str) -> bool:
    """True when torch.ops.sparse_ops.<op> has a kernel for dispatch key `key` ('CPU', 'CUDA')."""
    if _C is None:
        return False
    hit = _kernel_cache.get((op, key))
    if hit is None:
        try:
            hit = torch._C._dispatch_has_kernel_for_dispatch_key(f"sparse_ops::{op}", key)
        except RuntimeError:  # no such op
            hit = False
        _kernel_cache[(op, key)] = hit
    return hit


def triton_status(device_type: str) -> tuple[bool, str]:
    """(usable, why) for the Triton kernels on a device type."""
    hit = _triton_cache.get(device_type)
    if hit is None:
        hit = _triton_cache[device_type] = _triton_status(device_type)
    return hit


def _triton_status(device_type: str) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, "usable on CUDA"
    if device_type == "cpu":
        if interpret:
            return True, "usable on CPU through the interpreter (TRITON_INTERPRET=1; slow, for tests)"
        return False, "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
    return False, f"no Triton support for device type {device_type!r}"


def _available(name: str, op: str, device_type: str) -> tuple[bool, str]:
    if name == "torch":
        return True, "reference"
    if name == "triton":
        if _C is None:  # the Triton twins take their schemas from the compiled library
            return False, (EXT_ERROR or "the extension was not built") + "; the Triton ops need its schemas"
        return triton_status(device_type)
    key = {"cpp": "CPU", "cuda": "CUDA"}[name]
    if {"cpp": "cpu", "cuda": "cuda"}[name] != device_type:
        return False, f"backend {name!r} runs on {key} tensors; these are on {device_type}"
    if _C is None:
        return False, EXT_ERROR or "the extension was not built"
    if not has_kernel(op, key):
        why = BUILD.get("why_cuda", "") if name == "cuda" else ""
        return False, f"sparse_ops._C has no {key} kernel for {op}" + (f" ({why})" if why else "")
    return True, "built"


def usable(name: str, op: str, device_type: str) -> tuple[bool, str]:
    """Whether backend `name` can run `op` on `device_type` tensors here, and why (not)."""
    return _available(name, op, device_type)


def is_auto(backend: str | None) -> bool:
    """Whether a call with this `backend=` leaves the pick to auto (the process-wide default)."""
    return (backend if backend not in (None, "auto") else _current) == "auto"


def choose(op: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that runs `op` on `device`: the explicit one, or auto's pick."""
    name = backend if backend not in (None, "auto") else _current
    hit = _chosen.get((op, device.type, name))
    if hit is not None:
        return hit
    picked = _choose(op, device.type, name)
    _chosen[(op, device.type, name)] = picked
    return picked


def _auto_pick(op: str, dt: str):
    """(auto's compiled pick for op on device type dt, or None; why each candidate was not usable)."""
    reasons = []
    for cand in {"cpu": ("cpp",), "cuda": ("cuda", "triton")}.get(dt, ()):
        ok, why = _available(cand, op, dt)
        if ok:
            return cand, reasons
        reasons.append(f"{cand}: {why}")
    return None, reasons


def _choose(op: str, dt: str, name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}; got {name!r}")
    if name != "auto":
        ok, why = _available(name, op, dt)
        if not ok:
            raise RuntimeError(f"{op}: backend {name!r} is not usable here: {why}")
        return name
    picked, reasons = _auto_pick(op, dt)
    if picked is not None:
        return picked
    key = (op, dt)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"sparse_ops.{op}: running the plain-PyTorch reference on {dt} "
                      f"(no skipping, no speedup) because " + ("; ".join(reasons) or
                                                               f"no kernel exists for {dt}"),
                      RuntimeWarning, stacklevel=4)
    return "torch"


def _prefill() -> None:
    """Fill _chosen for the registered ops on this machine's device types, for the current
    default and every explicit backend that is usable. Under torch.compile a miss would be traced
    as a dict insertion and guarded as `key not in _chosen`, which the next call fails: one
    recompile per op at the first compiled call. Picks that would warn (auto falling back to
    the reference) are left to the first call, so the warning comes from the call, not the import;
    so is an explicit 'triton' on CPU (it would import triton at `import sparse_ops`)."""
    types = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for op in _REGISTERED_OPS:
        for dt in types:
            for name in BACKENDS:
                if name == "auto":
                    if _current != "auto":
                        continue
                    picked = _auto_pick(op, dt)[0]
                elif name == "triton" and dt == "cpu":
                    continue
                else:
                    picked = name if _available(name, op, dt)[0] else None
                if picked is not None:
                    _chosen[(op, dt, name)] = picked


for _op in _REGISTERED_OPS:
    for _key in ("CPU", "CUDA"):
        has_kernel(_op, _key)
_prefill()
