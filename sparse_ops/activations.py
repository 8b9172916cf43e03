"""The FFN activations, in one place: names, their torch forms and derivatives, kernel codes.

`NAMES` order is the code every kernel switches on: the Triton FFN kernel's `ACT` constexpr
(sparse_ops/triton_kernels/ffn.py) and csrc's `ffn::Act` enum (csrc/ffn_plan.cpp parses the
same names in the same order; C++ cannot import this table, so a test checks they agree).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# "identity" (h = pre): with a precomputed activation passed as the gate, the op is CATS's
# sparse step, act(x W_gate) * (x W_up) on the kept columns only (patching/llama.py).
NAMES = ("gelu", "gelu_tanh", "relu", "silu", "identity")
CODE = {name: i for i, name in enumerate(NAMES)}

_FORWARD = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "identity": lambda t: t,
}


def check(name, op: str = "gated_ffn") -> None:
    """A clear error naming the argument when `name` is not an activation."""
    if name not in CODE:
        raise ValueError(f"{op}: activation must be one of {NAMES}; got {name!r}")


def forward(name: str):
    """The activation as a torch function (differentiable)."""
    check(name)
    return _FORWARD[name]


def backward(grad: torch.Tensor, pre: torch.Tensor, name: str) -> torch.Tensor:
    """grad * act'(pre), by ATen's own backward kernels (what autograd of `forward(name)` runs)."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, pre, 0)
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, pre)
    if name == "identity":
        return grad
    check(name)
    raise AssertionError("unreachable")
