"""`sparse_ops.info()` -> dict, and `python -m sparse_ops.info`: what is built and usable, and why not.

This module is itself callable (sparse_ops.info() works whether `sparse_ops.info` is
reached as the module or its function), so importing it never shadows the function.
"""
from __future__ import annotations

import json
import sys
import types

import torch


def info() -> dict:
    from . import backend as b
    import sparse_ops

    out = {"version": sparse_ops.__version__, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "build": dict(b.BUILD), "backend": b.get_backend(), "backends": {}}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    ops = ("gated_ffn", "gather_rows", "scatter_rows", "masked_head_attention")
    for name, key, dev in (("cpp", "CPU", "cpu"), ("cuda", "CUDA", "cuda")):
        if not b.has_ext():
            out["backends"][name] = {"built": False, "usable": False, "why": b.EXT_ERROR}
            continue
        built = {op: b.has_kernel(op, key) for op in ops}
        usable = all(built.values()) and (dev == "cpu" or torch.cuda.is_available())
        why = "built" if all(built.values()) else b.BUILD.get("why_cuda", "not built")
        if all(built.values()) and not usable:
            why = "built, but no CUDA device is visible"
        out["backends"][name] = {"built": all(built.values()), "usable": usable, "why": why, "ops": built}
    for dev in ("cuda", "cpu"):
        ok, why = b.triton_status(dev)
        out["backends"][f"triton ({dev})"] = {"usable": ok, "why": why}
    out["backends"]["torch"] = {"usable": True, "why": "reference.py, always available (computes everything)"}
    from .ops.ffn import AUTO_CUDA_DECODE
    out["auto"] = {"cpu": "cpp", "cuda": "cuda, then triton", "cuda decode": AUTO_CUDA_DECODE}
    return out


def main() -> None:
    print(json.dumps(info(), indent=2, default=str))


class _CallableModule(types.ModuleType):
    def __call__(self) -> dict:
        return info()


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
