"""Contextual FFN sparsity for decoding (CATS-style) in gated (SwiGLU) MLPs.

Per token, the hidden columns whose gate activation |act(x W_gate)| is at most the layer's
threshold are skipped: h = where(|a| > t, a, 0) * (x W_up), a = act(x W_gate), out = h W_down.
The gate projection runs dense (it decides); up and down run only on the kept columns, and
the activation already computed is reused: gated_ffn with w1 = W_up, activation "identity" and
the masked activation as its per-row gate (so act(x W_gate) is not computed twice).

The thresholds come from calibration: the layer's |a| over a few batches of text, and its
`sparsity` quantile (one threshold per layer, CATS's rule). With the masks in place, a call
whose rows' union of kept columns exceeds DENSE_ABOVE of the columns (prefill: many tokens, their
union covers nearly everything) runs dense with the same mask applied, so the result is the
same whichever path runs and the sparse path is taken only where it reads fewer weight bytes.

Down-projection layout: read in place ([d, F], nn.Linear's) or, with transposed_down=True, from
a [F, d] copy made when the thresholds are set (a kept column is then one contiguous row;
costs d*F elements per layer, 106 MB for SmolLM2-135M in float32; it is a copy, so it does not
follow later changes of the weights: set the thresholds again after training them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import activations
from ..ops import gated_ffn
from .state import LayerState

# Union fraction of kept columns above which the call runs dense (mask applied). Measured in
# bench/models.py's contextual rows (SmolLM2, d=576, F=1536): see README.
DENSE_ABOVE = 0.8
_SAMPLES = 1 << 16  # |a| values kept per layer and calibration call


def forward(st: LayerState, mlp, x: torch.Tensor, act: str) -> torch.Tensor:
    """The MLP `mlp` (gate_proj, up_proj, down_proj) on x [..., d] under the layer's threshold."""
    g, u, dn = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    a = activations.forward(act)(F.linear(x, g.weight, g.bias))
    Fn = a.shape[-1]
    N = a.numel() // Fn if Fn else 0
    if st.ffn_calib is not None:  # calibrating: the dense MLP, and a sample of |a|
        flat = a.detach().abs().reshape(-1)
        if flat.numel() > _SAMPLES:
            flat = flat[torch.randint(flat.numel(), (_SAMPLES,), device=flat.device)]
        st.ffn_calib.append(flat.float().cpu())
        st.add("ffn", N * Fn, 0)
        return dn(a * u(x))
    keep = a.abs() > st.ffn_threshold
    h_gate = torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))
    union = torch.nonzero(keep.reshape(N, Fn).any(0)).flatten()
    if union.numel() > DENSE_ABOVE * Fn:
        st.add("ffn", N * Fn, 0)
        return dn(h_gate * u(x))
    st.add("ffn", N * union.numel(), 0)
    w2, t = (st.ffn_down_t, True) if st.ffn_down_t is not None else (dn.weight, False)
    return gated_ffn(x, u.weight, w2, union, b1=u.bias, b2=dn.bias, gate=h_gate, activation="identity",
                     w2_transposed=t)


def set_thresholds(states, mlps, thresholds, transposed_down: bool) -> None:
    for st, mlp, t in zip(states, mlps, thresholds):
        st.ffn_threshold = None if t is None else float(t)
        st.ffn_down_t = None
        if t is not None and transposed_down:
            st.ffn_down_t = mlp.down_proj.weight.detach().t().contiguous()


def calibrate(model, states, batches, sparsity: float):
    """Run `batches` through `model` (dense MLPs) and return each layer's `sparsity` quantile of |a|."""
    for st in states:
        st.ffn_calib = []
    try:
        with torch.no_grad():
            for b in batches:
                if isinstance(b, dict):
                    model(**b)
                else:
                    model(b)
        out = []
        for st in states:
            if not st.ffn_calib:
                raise ValueError(f"sparse_ops.calibrate_contextual_ffn: layer {st.index}'s MLP did not run on the "
                                 f"calibration batches")
            v = torch.cat(st.ffn_calib)
            out.append(float(torch.quantile(v, sparsity)))
        return out
    finally:
        for st in states:
            st.ffn_calib = None
