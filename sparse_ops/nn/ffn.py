"""GatedFFN: a drop-in FFN block whose inactive hidden columns are never computed."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..gates import HardConcrete, ste_threshold
from ..ops.ffn import gated_ffn

_GATES = ("none", "hard_concrete", "threshold")


class GatedFFN(nn.Module):
    """FFN (or GLU/SwiGLU with glu=True) over d_model -> d_ff -> d_model with sparse hidden columns.

    The down-projection is stored transposed, `w2_t` [d_ff, d_model], so an inactive column
    is a contiguous row that is never read (what makes decode fast).

    gate: 'none' (only `active`/`gate` passed to forward), 'hard_concrete' (learned L0 gates,
    one per column), or 'threshold' (learned scores with a straight-through threshold at 0).
    forward(x, active=None, gate=None): an external `gate` multiplies the learned one.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", glu: bool = False,
                 bias: bool = True, gate: str = "none", dense_grad: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if gate not in _GATES:
            raise ValueError(f"GatedFFN: gate must be one of {_GATES}; got {gate!r}")
        for name, n in (("d_model", d_model), ("d_ff", d_ff)):
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"GatedFFN: {name} must be a positive int; got {n!r}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_ff, self.activation, self.glu = d_model, d_ff, activation, glu
        self.dense_grad = dense_grad
        self.w1 = nn.Parameter(torch.empty(d_ff, d_model, **fk))
        self.w3 = nn.Parameter(torch.empty(d_ff, d_model, **fk)) if glu else None
        self.w2_t = nn.Parameter(torch.empty(d_ff, d_model, **fk))
        self.b1 = nn.Parameter(torch.empty(d_ff, **fk)) if bias else None
        self.b2 = nn.Parameter(torch.empty(d_model, **fk)) if bias else None
        self.gate_kind = gate
        if gate == "hard_concrete":
            self.gate = HardConcrete(d_ff)
        elif gate == "threshold":
            self.gate_scores = nn.Parameter(torch.ones(d_ff, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation for fc1 [d_ff, d_model] and fc2 [d_model, d_ff].
        for w in (self.w1, self.w3):
            if w is not None:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        bound2 = 1 / math.sqrt(self.d_ff)
        nn.init.uniform_(self.w2_t, -bound2, bound2)
        if self.b1 is not None:
            nn.init.uniform_(self.b1, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
            nn.init.uniform_(self.b2, -bound2, bound2)

    @classmethod
    def from_linears(cls, fc1: nn.Linear, fc2: nn.Linear, fc3: nn.Linear | None = None,
                     activation: str = "gelu", gate: str = "none") -> "GatedFFN":
        """Build from nn.Linear layers: fc1 (up, [d_ff, d_model]), fc2 (down), fc3 (GLU up, optional)."""
        d_ff, d_model = fc1.weight.shape
        if tuple(fc2.weight.shape) != (d_model, d_ff):
            raise ValueError(f"GatedFFN.from_linears: fc2 must map d_ff={d_ff} -> d_model={d_model}; "
                             f"got weight {tuple(fc2.weight.shape)}")
        if fc3 is not None and tuple(fc3.weight.shape) != (d_ff, d_model):
            raise ValueError(f"GatedFFN.from_linears: fc3 must be [d_ff, d_model] = {(d_ff, d_model)}; "
                             f"got {tuple(fc3.weight.shape)}")
        bias = fc1.bias is not None
        if (fc2.bias is not None) != bias:
            raise ValueError("GatedFFN.from_linears: fc1 and fc2 must both have a bias or both not")
        m = cls(d_model, d_ff, activation=activation, glu=fc3 is not None, bias=bias, gate=gate,
                device=fc1.weight.device, dtype=fc1.weight.dtype)
        with torch.no_grad():
            m.w1.copy_(fc1.weight)
            m.w2_t.copy_(fc2.weight.t())
            if fc3 is not None:
                m.w3.copy_(fc3.weight)
            if bias:
                m.b1.copy_(fc1.bias)
                m.b2.copy_(fc2.bias)
        return m

    def learned_gate(self) -> torch.Tensor | None:
        if self.gate_kind == "hard_concrete":
            return self.gate()
        if self.gate_kind == "threshold":
            return ste_threshold(self.gate_scores)
        return None

    def forward(self, x: torch.Tensor, active: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        g = self.learned_gate()
        if gate is not None:
            g = gate if g is None else g * gate
        if g is not None and g.dtype != x.dtype:
            g = g.to(x.dtype)
        return gated_ffn(x, self.w1, self.w2_t, active, b1=self.b1, b2=self.b2, w3=self.w3, gate=g,
                         activation=self.activation, w2_transposed=True, dense_grad=self.dense_grad)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}, "
                f"glu={self.glu}, bias={self.b1 is not None}, gate={self.gate_kind!r}")
