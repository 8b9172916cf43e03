"""Launch helpers shared by the Triton kernel modules (each module imports these, never another
kernel module)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, as Triton reads it when @triton.jit decorates: kernels then run on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_device(t: torch.Tensor, op: str) -> None:
    """A clear error when the kernels cannot run on t's device."""
    if not (t.is_cuda or INTERPRET):
        raise RuntimeError(f"{op} (triton): needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")


def blocks(n, lo=16, hi=64):
    """A power-of-two tile size for a dimension of n, in [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def upcast(t: torch.Tensor) -> bool:
    """Whether half types must be upcast before arithmetic: the interpreter has no bf16 arithmetic
    (on the GPU they multiply in their own type and accumulate in fp32)."""
    return INTERPRET and t.dtype in (torch.float16, torch.bfloat16)


def acc(t: torch.Tensor):
    """The accumulator type for t's dtype: fp64 for fp64, else fp32."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def precision(t: torch.Tensor) -> str:
    """tl.dot's input_precision for t's dtype: fp32 exact ("ieee": no TF32, which sm_80+ would
    otherwise take and which the interpreter, computing exact fp32, could never show), ignored
    for the half types."""
    return "ieee" if t.dtype in (torch.float32, torch.float64) else "tf32"


def launch(kernel, grid, *args, **kw):
    kernel[grid](*args, **kw)
