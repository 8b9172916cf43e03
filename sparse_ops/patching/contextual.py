"""Contextual FFN sparsity for decoding (CATS-style) in gated (SwiGLU) MLPs.

Per token, the hidden columns whose gate activation |act(x W_gate)| is at most the layer's
threshold are skipped: h = where(|a| > t, a, 0) * (x W_up), a = act(x W_gate), out = h W_down.
The gate projection runs dense (it decides); up and down run only on the kept columns, and
the activation already computed is reused: gated_ffn with w1 = W_up, activation "identity" and
the masked activation as its per-row gate (so act(x W_gate) is not computed twice).

The thresholds come from calibration: the layer's |a| over a few batches of text, and its
`sparsity` quantile (one threshold per layer, CATS's rule). Each call takes the sparse path only
where it was measured faster (`sparse_pays`: decode-sized calls whose rows' union of kept
columns is not nearly everything); otherwise (prefill: many tokens, their union covers nearly
every column) it runs dense with the same mask applied, so the result is the same either way.

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


def sparse_pays(N: int, union: int, F_: int) -> bool:
    """Whether the sparse path (gated_ffn on the union of the rows' kept columns) is faster than
    the dense MLP with the mask applied, for N rows whose kept columns' union has `union` of F_.

    Measured per MLP (SmolLM2's d=576, F=1536, float32, 30 layers' weights in turn so that none
    stays in cache, 2 threads; dense = torch's three F.linear, sparse = torch's gate projection +
    gated_ffn reading a [F, d] down copy; ms per layer, dense / sparse):
      N=1  union 0.50: 1.42 / 1.13      N=4  union 0.94: 2.39 / 2.00, 0.76: 2.18 / 1.76
      N=8  union 0.57: 2.13 / 1.89, 0.84: 2.01 / 1.97, 1.0: 1.94 / 2.77
      N=16 union 0.54: 2.30 / 1.97, 0.81: 2.94 / 2.46, 1.0: 2.88 / 4.23
      N=32 union 0.61: 3.03 / 3.97      N=64 union 0.46: 4.36 / 4.35
    Above 16 rows the op leaves its decode kernel for the GEMM path, where a per-row gate costs
    more than it saves: dense. Up to 16 rows, sparse while the union is at most 80% of the columns.
    (In isolation the sparse MLP still won at 4 rows with 94%: torch's GEMV for a few rows reads
    ~5.7 GB/s here, the op's decode kernel ~8. Inside SmolLM2's decode step, batch 4, union 0.91,
    the whole step measured 0.95x and 1.07x of dense in two runs, within this machine's noise of
    its 1.03x bytes bound, so that case runs dense.)"""
    return N <= MAX_ROWS and union <= 0.8 * F_


MAX_ROWS = 16  # above this many rows the sparse path never pays (sparse_pays)
# After a call of N > 1 rows finds its union too wide for the sparse path, the layer's next
# RECHECK - 1 calls of N rows run dense (the mask still applied) without counting their union, and
# the one after counts again. The count is ~4 small ops a layer; at SmolLM2's batch-4 decode, whose
# union is ~0.9 of the columns in every layer, it was 3% of the step (one process, 150 interleaved
# steps: dense 57.0 ms, with the count 59.1, without 57.3). Both paths give the same result, so
# this changes only which one runs; a single row is always counted (its own kept fraction, ~0.5).
RECHECK = 16


def sparse_union(st: LayerState, N: int, F_: int, count) -> int | None:
    """The union of kept columns a call of N rows runs sparse on, or None where it runs dense.
    count() counts the union; it is not called above MAX_ROWS rows, nor while the layer skips the
    count for N rows (RECHECK)."""
    if N > MAX_ROWS:
        return None
    left = st.ffn_dense_left.get(N, 0) if N > 1 else 0
    if left:
        st.ffn_dense_left[N] = left - 1
        return None
    nu = count()
    if sparse_pays(N, nu, F_):
        return nu
    if N > 1:
        st.ffn_dense_left[N] = RECHECK - 1
    return None


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
    # where(|a| > t, a, 0) in one op (hardshrink; abs, compare and where were three, and on a
    # decode step each op is paid ~30 times with cold caches). A NaN in a propagates, as in the
    # dense MLP, instead of being dropped by the comparison.
    h_gate = F.hardshrink(a, st.ffn_threshold)
    # How many columns the call would run: the union of its rows' kept columns (one row: its own).
    nu = sparse_union(st, N, Fn, lambda: int(torch.count_nonzero(h_gate)) if N == 1 else
                      int(h_gate.reshape(N, Fn).ne(0).any(0).sum()))
    if nu is None:
        st.add("ffn", N * Fn, 0)
        return dn(h_gate * u(x))
    st.add("ffn", N * nu, 0)
    w2, t = (st.ffn_down_t, True) if st.ffn_down_t is not None else (dn.weight, False)
    # No `active`: the op runs the columns where some row's gate is nonzero (for decode-sized
    # calls their union, what nu counted); passing the union as indices measured slower (0.49
    # against 0.45 ms a call, d=576, F=1536, one row, half the columns).
    return gated_ffn(x, u.weight, w2, None, b1=u.bias, b2=dn.bias, gate=h_gate, activation="identity",
                     w2_transposed=t)


def set_thresholds(states, mlps, thresholds, transposed_down: bool) -> None:
    for st, mlp, t in zip(states, mlps, thresholds):
        st.ffn_threshold = None if t is None else float(t)
        st.ffn_down_t = None
        st.ffn_dense_left.clear()
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
