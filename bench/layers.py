"""Layer-skipping cases: sparse_ops.skip_layer / LayerDrop against running every row.

dense:  the layer on every row                                  (nothing skipped)
masked: the layer on every row, then where(keep, layer(x), x)   (the mask-multiply approach)
sparse: sparse_ops.skip_layer / sparse_ops.nn.LayerDrop         (skipped rows never computed)
A BERT-base layer: nn.TransformerEncoderLayer(768, 12 heads, FFN 3072), dropout 0.
"""
from __future__ import annotations

import torch
from torch import nn

import sparse_ops
from sparse_ops import backend as _backend
from sparse_ops.nn import LayerDrop

D, H, FF = 768, 12, 3072


def _layer(device, g):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    return nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True).to(device)


def _keep(B, keep, g, device):
    k = torch.zeros(B, dtype=torch.bool)
    k[torch.randperm(B, generator=g)[:round(keep * B)]] = True
    return k.to(device)


def _row(name, shape, keep, device, fns, check=None, train=False, ideal=None):
    row = {"op": "layers", "case": name, "device": device, "dtype": "float32", "shape": shape, "keep": keep,
           "backend": _backend.choose("scatter_rows", torch.device(device)), "fns": fns, "train": train}
    if check is not None:
        row["check"] = check
    if ideal is not None:
        row["ideal"] = ideal
    return row


def _close(a, b, what):
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
        raise AssertionError(f"bench layers {what}: sparse result differs from the masked one")


def per_sample(keep, device, train, B=16, T=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = _layer(device, g).train(train)
    x = torch.randn(B, T, D, generator=g).to(device).requires_grad_(train)
    k = _keep(B, keep, g, device)
    km = k[:, None, None]

    fns = {"dense": lambda: layer(x),
           "masked": lambda: torch.where(km, layer(x), x),
           "sparse": lambda: sparse_ops.skip_layer(layer, x, k)}
    if train:
        grad = torch.randn(B, T, D, generator=g).to(device)

        def stepper(fn):
            def step():
                layer.zero_grad(set_to_none=True)
                x.grad = None
                fn().backward(grad)
            return step
        fns = {n: stepper(f) for n, f in fns.items()}

    def check():
        with torch.no_grad():
            _close(sparse_ops.skip_layer(layer, x, k), torch.where(km, layer(x), x), "per-sample")

    name = "BERT layer per-sample " + ("fwd+bwd" if train else "fwd")
    return _row(name, f"B={B} T={T} d={D}", keep, device, fns, check, train)


def layerdrop_step(p, device, B=16, T=128, n_layers=6, seed=0):
    """A training step of a 6-layer encoder: per-sample LayerDrop vs no LayerDrop."""
    g = torch.Generator().manual_seed(seed)
    layers = [_layer(device, g) for _ in range(n_layers)]
    ld = LayerDrop(layers, p=p, per_sample=True).train()
    batch_ld = LayerDrop(layers, p=p, per_sample=False).train()
    x = torch.randn(B, T, D, generator=g).to(device).requires_grad_()
    grad = torch.randn(B, T, D, generator=g).to(device)
    params = [q for layer in layers for q in layer.parameters()]

    def dense():
        h = x
        for layer in layers:
            h = layer(h)
        return h

    def masked():  # per-sample LayerDrop by masking: every layer still runs on every sample
        h = x
        for layer in layers:
            keep = (torch.rand(B, device=device) >= p)[:, None, None]
            h = torch.where(keep, layer(h), h)
        return h

    def index_select():  # per-sample drop by index_select / index_copy (torchtune's pattern)
        h = x
        for layer in layers:
            idx = torch.nonzero(torch.rand(B, device=device) >= p).flatten()
            if idx.numel():
                h = h.index_copy(0, idx, layer(h.index_select(0, idx)))
        return h

    def stepper(fn):
        def step():
            for q in params:
                q.grad = None
            x.grad = None
            fn().backward(grad)
        return step

    fns = {"dense": stepper(dense), "masked": stepper(masked), "sparse": stepper(lambda: ld(x)),
           "batch_drop": stepper(lambda: batch_ld(x)), "index_select": stepper(index_select)}
    return _row(f"LayerDrop p={p} 6-layer train step", f"B={B} T={T} d={D}", 1 - p, device, fns, None, True)


def per_token(capacity, device, B=16, T=128, seed=0):
    """Mixture-of-Depths: each sample's top `capacity` fraction of tokens runs the layer."""
    g = torch.Generator().manual_seed(seed)
    layer = _layer(device, g).eval()
    x = torch.randn(B, T, D, generator=g).to(device)
    scores = torch.randn(B, T, generator=g).to(device)
    k = round(capacity * T)
    keep = torch.zeros(B, T, dtype=torch.bool, device=device)
    keep.scatter_(1, scores.topk(k, dim=1).indices, True)

    def masked():
        return torch.where(keep[..., None], layer(x), x)

    def check():
        ref = torch.stack([x[b].index_copy(0, torch.nonzero(keep[b]).flatten(),
                                          layer(x[b][keep[b]][None])[0]) for b in range(B)])
        _close(sparse_ops.skip_layer(layer, x, keep), ref, "per-token")

    fns = {"dense": lambda: layer(x), "masked": masked, "sparse": lambda: sparse_ops.skip_layer(layer, x, keep)}
    return _row("BERT layer per-token (MoD) fwd", f"B={B} T={T} d={D}", capacity, device, fns, check)


def cases(device: str, quick: bool):
    for keep in (1.0, 0.5, 0.25):
        yield per_sample(keep, device, train=False)
    for keep in (1.0, 0.5):
        yield per_sample(keep, device, train=True)
    yield per_token(0.5, device)
    yield layerdrop_step(0.5, device)
