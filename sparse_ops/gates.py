"""Straight-through gates: hard 0/1 (or exactly-zero) values forward, a surrogate gradient backward.

Their outputs can be passed straight to the ops as `gate=`: a unit whose gate is exactly 0
is skipped (never computed), and the gradient reaching the gate flows back to the scores
through the surrogate.

- ste_threshold(scores, threshold=0.): 1 where score > threshold, else 0; backward: sigmoid'.
- ste_topk(scores, k, dim=-1): 1 for the k largest scores along dim, else 0; backward: softmax'.
- HardConcrete(shape): L0 gates (Louizos et al. 2018; used by CoFi): stretched, clamped
  concrete samples in training, deterministic in eval; exact zeros are common, so the
  skipped units are real; `l0_penalty()` is the expected number of open gates.
- gumbel_gate(logits, tau): a hard Gumbel-sigmoid sample with straight-through gradient.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn


def _positive(fn: str, name: str, value) -> None:
    """value must be a finite number > 0 (NaN and inf fail: `value <= 0` alone lets NaN through)."""
    # 0 < value < inf rather than math.isfinite, which torch.compile cannot trace.
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < math.inf
    if not ok:
        raise ValueError(f"{fn}: {name} must be a finite number > 0; got {value!r}")


def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    # Forward value: hard (exact 0/1). Gradient: that of soft.
    return hard.detach() + (soft - soft.detach())


def ste_threshold(scores: torch.Tensor, threshold: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
    """Hard gate 1[scores > threshold] with the gradient of sigmoid((scores - threshold) / temperature)."""
    _positive("ste_threshold", "temperature", temperature)
    soft = torch.sigmoid((scores - threshold) / temperature)
    hard = (scores > threshold).to(scores.dtype)
    return _straight_through(hard, soft)


def ste_topk(scores: torch.Tensor, k: int, dim: int = -1, temperature: float = 1.0) -> torch.Tensor:
    """Hard gate: 1 for the k largest scores along `dim`, else 0; gradient of softmax(scores / T) * k."""
    n = scores.shape[dim]
    if not 0 <= k <= n:
        raise ValueError(f"ste_topk: k must be in [0, {n}] (size of dim {dim}); got {k}")
    _positive("ste_topk", "temperature", temperature)
    hard = torch.zeros_like(scores)
    if k > 0:
        hard.scatter_(dim, scores.topk(k, dim=dim).indices, 1.0)
    soft = torch.softmax(scores / temperature, dim=dim) * k
    return _straight_through(hard, soft)


def gumbel_gate(logits: torch.Tensor, tau: float = 1.0, hard: bool = True) -> torch.Tensor:
    """Gumbel-sigmoid sample; hard=True gives exact 0/1 forward with the soft sample's gradient."""
    _positive("gumbel_gate", "tau", tau)
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    if not hard:
        return soft
    return _straight_through((soft > 0.5).to(logits.dtype), soft)


class HardConcrete(nn.Module):
    """L0 gates over `shape` units (Louizos et al., 2018).

    Training: u ~ U(0,1), s = sigmoid((log u - log(1-u) + log_alpha) / beta), stretched to
    (gamma, zeta) and clamped to [0, 1]: many samples are exactly 0 (skipped) or 1.
    Eval: the deterministic gate clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1).
    """

    def __init__(self, shape, init_open: float = 0.9, beta: float = 2.0 / 3.0,
                 gamma: float = -0.1, zeta: float = 1.1):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not 0 < init_open < 1:
            raise ValueError(f"HardConcrete: init_open must be in (0, 1); got {init_open}")
        _positive("HardConcrete", "beta (the temperature)", beta)
        if not (math.isfinite(gamma) and math.isfinite(zeta) and gamma < 0 and zeta > 1):
            raise ValueError(f"HardConcrete: the stretch must have gamma < 0 < 1 < zeta (finite), so that gates "
                             f"reach exactly 0 and 1; got gamma={gamma}, zeta={zeta}")
        if any(not isinstance(n, int) or n <= 0 for n in shape):
            raise ValueError(f"HardConcrete: shape must hold positive ints; got {shape}")
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        self.log_alpha = nn.Parameter(torch.full(shape, math.log(init_open / (1 - init_open))))

    def forward(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp_(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def l0_penalty(self) -> torch.Tensor:
        """Expected number of non-zero gates (differentiable in log_alpha)."""
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return torch.sigmoid(self.log_alpha - shift).sum()


__all__ = ["ste_threshold", "ste_topk", "gumbel_gate", "HardConcrete"]
