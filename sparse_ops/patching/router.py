"""Routed FFN columns in LLaMA-family (SwiGLU) MLPs: patch(model, gate={"ffn": ("router", keep)}).

Each layer's gates (child `sparse_gates`) hold an FFNRouter (sparse_ops.gates): a low-rank
predictor on the MLP's input that picks, per token, the k = round(keep * F) hidden columns that
run. It runs before any projection, so gate, up and down all run on the k columns (CATS, in
patching/contextual.py, must run the gate projection in full to decide).

  eval / no grad   the router's top-k as a mask. One row (a decode step of batch 1): gated_ffn
                   with those k indices (no host synchronisation). More rows: gated_ffn on the
                   union of the rows' columns where contextual.sparse_pays says it is faster,
                   else the dense MLP with the mask applied (the same result either way).
  with grad        the router's ste_topk gate (0/1 forward, softmax-surrogate gradient), so the
                   router also learns from the model's loss; same choice of sparse or dense.

fit_routers(model, batches) fits the routers to the dense model's own activations (Deja Vu's
recipe): the MLP inputs of a few batches of text are recorded with every router off, each row
is labelled with its k columns of largest |act(x W_gate) * (x W_up)|, and each router is trained
on them with binary cross-entropy (Adam).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import activations
from ..gates import FFNRouter, topk_mask
from ..ops import gated_ffn
from .contextual import sparse_pays, sparse_union
from .state import LayerState


def router_of(st: LayerState):
    g = None if st.gates is None else st.gates.get("ffn")
    return g if isinstance(g, FFNRouter) else None


def _dense(mlp, x, act, gate):
    g, u, dn = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    h = activations.forward(act)(F.linear(x, g.weight, g.bias)) * u(x)
    return dn(h if gate is None else h * gate)


def forward(st: LayerState, mlp, x: torch.Tensor, act: str) -> torch.Tensor:
    """The MLP on x [..., d] with the columns the layer's router picks."""
    r = router_of(st)
    Fn = st.ffn_size
    N = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if st.router_record is not None:  # fit_routers is recording: the dense MLP, and its input
        st.router_record.append(x.detach().reshape(-1, x.shape[-1]))
        st.add("ffn", N * Fn, 0)
        return _dense(mlp, x, act, None)
    g, u, dn = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    w2, t = (st.router_down_t, True) if st.router_down_t is not None else (dn.weight, False)
    learn = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in r.parameters()))
    if learn:
        gate = r.gate(x)
        on = gate.detach() != 0
        nu = r.k if N == 1 else int(on.reshape(N, Fn).any(0).sum())
        if not sparse_pays(N, nu, Fn):
            st.add("ffn", N * Fn, 0)
            return _dense(mlp, x, act, gate)
        st.add("ffn", N * nu, 0)
        return gated_ffn(x, g.weight, w2, None, b1=g.bias, b2=dn.bias, w3=u.weight, gate=gate, activation=act,
                         w2_transposed=t)
    z = r(x)
    if N == 1:
        idx = z.reshape(Fn).topk(r.k, sorted=False).indices
        st.add("ffn", r.k, 0)
        return gated_ffn(x, g.weight, w2, idx, b1=g.bias, b2=dn.bias, w3=u.weight, activation=act,
                         w2_transposed=t)
    mask = topk_mask(z, r.k)
    nu = sparse_union(st, N, Fn, lambda: int(mask.reshape(N, Fn).any(0).sum()))
    if nu is None:
        st.add("ffn", N * Fn, 0)
        return _dense(mlp, x, act, mask.to(x.dtype))
    st.add("ffn", N * nu, 0)
    return gated_ffn(x, g.weight, w2, mask, b1=g.bias, b2=dn.bias, w3=u.weight, activation=act, w2_transposed=t)


def set_down_copies(states, mlps, transposed: bool) -> None:
    for st, mlp in zip(states, mlps):
        st.router_down_t = mlp.down_proj.weight.detach().t().contiguous() if transposed else None
        st.ffn_dense_left.clear()


def _labels(mlp, x, act, k):
    """Each row's k columns of largest |act(x W_gate) * (x W_up)| (bool [N, F])."""
    g, u = mlp.gate_proj, mlp.up_proj
    return topk_mask((activations.forward(act)(F.linear(x, g.weight, g.bias)) * u(x)).abs(), k)


def fit(model, states, mlps, act, batches, steps: int, lr: float, batch_rows: int, max_rows: int, seed: int):
    """Record every layer's MLP input on `batches` (routers off), then fit each router; returns each
    layer's recall on the recorded rows (the share of the labelled columns its top-k picks)."""
    for st in states:
        st.router_record = []
    try:
        with torch.no_grad():
            for b in batches:
                model(**b) if isinstance(b, dict) else model(b)
        recorded = []
        for st in states:
            if not st.router_record:
                raise ValueError(f"sparse_ops.fit_routers: layer {st.index}'s MLP did not run on the batches")
            recorded.append(torch.cat(st.router_record))
    finally:
        for st in states:
            st.router_record = None
    gen = torch.Generator().manual_seed(seed)
    recalls = []
    for st, mlp, x in zip(states, mlps, recorded):
        r = router_of(st)
        if x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_rows].to(x.device)]
        with torch.no_grad():
            lab = _labels(mlp, x, act, r.k)
        was = r.training
        r.train()
        opt = torch.optim.Adam(r.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                i = torch.randint(x.shape[0], (min(batch_rows, x.shape[0]),), generator=gen).to(x.device)
                loss = r.fit_loss(x[i], lab[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        r.train(was)
        with torch.no_grad():
            hit = (r.mask(x) & lab).sum()
        recalls.append(float(hit) / max(1, int(lab.sum())))
    return recalls
