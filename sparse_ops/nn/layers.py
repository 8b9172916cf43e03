"""Layer-skipping modules built on sparse_ops.skip_layer: SkipLayer, LayerDrop, TokenRouter."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..gates import ste_threshold, ste_topk
from ..ops.layers import skip_layer

_SKIP_GATES = ("none", "learned")


def _unprefix_layer(module, state_dict, prefix, local_metadata):
    """SkipLayer's state_dict: the wrapped layer's keys without `layer.`."""
    inner = prefix + "layer."
    for k in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + k[len(inner):]] = state_dict.pop(k)


def _prefix_layer(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Loading: the keys that are not SkipLayer's own (score.*) belong to the wrapped layer."""
    own = prefix + "score."
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)
              and not k.startswith(prefix + "layer.")]:
        state_dict[prefix + "layer." + k[len(prefix):]] = state_dict.pop(k)


class SkipLayer(nn.Module):
    """Wraps a layer so that samples (or tokens) it is told to skip are never fed to it.

    forward(x, *args, keep=None, gate=None, **kwargs): `keep` bool [B] or [B, T]; `gate` float
    shaped like keep (y = x + gate * (layer(x) - x), a zero gate skips). With gate='learned' a
    per-sample gate is learned: a linear score of the mean-pooled input through a straight-through
    threshold (hard 0/1 forward, sigmoid gradient), so samples the gate closes skip the layer.
    Transparent to the wrapped layer: attributes it does not have itself are the layer's
    (`skip.self_attn`), indexing and len() go to the layer, and state_dict keys are the layer's own
    (no `layer.` prefix; the learned gate's are `score.*`), so a checkpoint of the bare layer loads
    into the wrapper and back.
    """

    def __init__(self, layer: nn.Module, gate: str = "none", d_model: int | None = None,
                 dense_grad: bool = False, pad_mask_kwarg: str | None = None):
        super().__init__()
        if gate not in _SKIP_GATES:
            raise ValueError(f"SkipLayer: gate must be one of {_SKIP_GATES}; got {gate!r}")
        if gate == "learned" and d_model is None:
            raise ValueError("SkipLayer: gate='learned' needs d_model (the width of x)")
        if d_model is not None and (isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0):
            raise ValueError(f"SkipLayer: d_model must be a positive int; got {d_model!r}")
        self.layer = layer
        self.gate_kind = gate
        self.dense_grad = dense_grad
        self.pad_mask_kwarg = pad_mask_kwarg
        if gate == "learned":
            self.score = nn.Linear(d_model, 1)
            nn.init.zeros_(self.score.weight)
            nn.init.constant_(self.score.bias, 1.0)  # starts open
        self.register_state_dict_post_hook(_unprefix_layer)
        self.register_load_state_dict_pre_hook(_prefix_layer)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(super().__getattr__("layer"), name)

    def __getitem__(self, idx):
        return self.layer[idx]

    def __len__(self):
        return len(self.layer)

    def learned_gate(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.gate_kind != "learned":
            return None
        pooled = x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)
        return ste_threshold(self.score(pooled).squeeze(-1)).to(x.dtype)

    def forward(self, x, *args, keep=None, gate=None, **kwargs):
        g = self.learned_gate(x)
        if gate is not None:
            g = gate if g is None else g * gate
        if keep is None:
            keep = torch.ones(x.shape[: (g.dim() if g is not None else 1)], dtype=torch.bool, device=x.device)
        return skip_layer(self.layer, x, keep, *args, gate=g, dense_grad=self.dense_grad,
                          pad_mask_kwarg=self.pad_mask_kwarg, **kwargs)


class LayerDrop(nn.Module):
    """A stack of layers where, in training, each layer is dropped with probability p.

    per_sample=True: each sample drops each layer independently, and the dropped samples are
    really not computed (skip_layer), so the step gets faster by about 1/(1-p) on the layers.
    per_sample=False: the whole batch drops a layer together (fairseq-style LayerDrop).
    In eval every layer runs, unless `keep_layers` names the subset to keep (a list of indices,
    or 'every_other' as in the LayerDrop paper's pruning at inference).
    Parameters of a layer no sample ran get zero gradients (DistributedDataParallel-safe).
    """

    def __init__(self, layers: Sequence[nn.Module], p: float = 0.1, per_sample: bool = True,
                 keep_layers: Sequence[int] | str | None = None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"LayerDrop: p must be in [0, 1); got {p}")
        self.layers = nn.ModuleList(layers)
        self.p = p
        self.per_sample = per_sample
        self.keep_layers = self._resolve_keep(keep_layers)

    def _resolve_keep(self, keep_layers):
        n = len(self.layers)
        if keep_layers is None:
            return None
        if keep_layers == "every_other":
            return list(range(0, n, 2))
        if isinstance(keep_layers, str):
            raise ValueError(f"LayerDrop: keep_layers must be a list of indices or 'every_other'; got {keep_layers!r}")
        keep = sorted(set(int(i) for i in keep_layers))
        if any(i < 0 or i >= n for i in keep):
            raise ValueError(f"LayerDrop: keep_layers must be indices in [0, {n}); got {list(keep_layers)}")
        return keep

    def forward(self, x, *args, **kwargs):
        B = x.shape[0]
        for i, layer in enumerate(self.layers):
            if not self.training:
                if self.keep_layers is None or i in self.keep_layers:
                    x = _hidden(layer(x, *args, **kwargs))
                continue
            if self.per_sample:
                keep = torch.rand(B, device=x.device) >= self.p
            else:
                keep = torch.full((B,), bool(torch.rand(()) >= self.p), device=x.device)
            x = skip_layer(layer, x, keep, *args, **kwargs)
        return x


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class TokenRouter(nn.Module):
    """Mixture-of-Depths router: picks, per sample, the top `capacity` fraction of tokens.

    forward(x) -> (keep [B, T] bool, gate [B, T]): gate = sigmoid(score) on the chosen tokens and
    0 elsewhere, so `skip_layer(layer, x, keep, gate=gate)` gives y = x + gate * (layer(x) - x)
    and the router learns through the gate (a residual layer makes that x + gate * f(x)).
    Top-k over the sequence looks at future tokens, so it is not causal. causal=True adds a small
    predictor trained (aux_loss) to guess from each token alone whether top-k would pick it;
    in eval the predictor decides (score > 0), token by token, which works for decoding.
    """

    def __init__(self, d_model: int, capacity: float, causal: bool = False, hidden: int | None = None):
        super().__init__()
        if not 0.0 < capacity <= 1.0:
            raise ValueError(f"TokenRouter: capacity must be in (0, 1]; got {capacity}")
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"TokenRouter: d_model must be a positive int; got {d_model!r}")
        self.capacity = capacity
        self.causal = causal
        self.score = nn.Linear(d_model, 1)
        if causal:
            h = hidden or max(8, d_model // 8)
            self.predictor = nn.Sequential(nn.Linear(d_model, h), nn.SiLU(), nn.Linear(h, 1))
        self._last_targets = None

    def k(self, T: int) -> int:
        return max(1, min(T, math.ceil(self.capacity * T)))

    def forward(self, x: torch.Tensor):
        scores = self.score(x).squeeze(-1)  # [B, T]
        if self.causal and not self.training:
            keep = self.predictor(x).squeeze(-1) > 0
        else:
            hard = ste_topk(scores, self.k(x.shape[1]), dim=-1)
            keep = hard.detach() > 0.5
            self._last_targets = keep.to(x.dtype)
        gate = torch.where(keep, torch.sigmoid(scores), torch.zeros_like(scores))
        return keep, gate

    def aux_loss(self, x: torch.Tensor) -> torch.Tensor:
        """BCE of the causal predictor against the last top-k choice (train it beside the model)."""
        if not self.causal:
            raise RuntimeError("TokenRouter.aux_loss: only a causal router has a predictor")
        if self._last_targets is None:
            raise RuntimeError("TokenRouter.aux_loss: call the router in training mode first")
        logits = self.predictor(x.detach()).squeeze(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, self._last_targets)
