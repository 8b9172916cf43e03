"""Hugging Face LLaMA-family decoders (LlamaModel and the models with its layer layout: Qwen2,
Mistral, SmolLM2): each layer has self_attn.{q,k,v,o}_proj (grouped-query attention: H query
heads, Hkv key/value heads), rotary position embeddings, and mlp.{gate,up,down}_proj (SwiGLU).

Converted per layer (class swaps, as in patching/bert.py):
  self_attn  heads: only the running query heads' rows of q_proj and columns of o_proj are
             read. A KV head is computed when any query head of its group runs; with a KV cache
             every KV head is computed and appended (k/v projections are 1/groups of q's), so the
             cache stays whole whatever the masks do next. Per-sample masks [B, H] project the
             union of the batch's running heads and skip the other (sample, head) pairs inside
             masked_head_attention. Causality: the mask the model built (a bool [B, 1, Tq, Tk] with
             padding, True = attend), or with none, is_causal for a prefill without a cache
             (Tq == Tk), none for one query (decode), and an explicit bottom-right mask for a chunk of
             queries after a cache.
  mlp        ffn: gated_ffn with w1 = gate_proj, w3 = up_proj, w2 = down_proj (read in place in
             its [d, F] nn.Linear layout: no copy of the weights; the transposed layout that makes
             decode fastest would need a second copy of down_proj, not made here).
  layer      layers: per-sample skipping (skip_layer). With a KV cache a skipped sample still
             appends its K/V, computed from the layer's input (input_layernorm, k/v projections,
             rotary on k): the CALM rule, so later tokens attend to real keys. The layer computes
             every sample's K/V first and appends them; the kept samples' attention reads its rows of
             the updated cache (their K/V projections run twice: 2 Hkv of the H + 2 Hkv heads).
"""
from __future__ import annotations

import torch

from ..ops import gated_ffn, masked_head_attention, skip_layer
from ..ops.layers import zero_grads_for
from ..ops.head_proj import head_in_proj, head_out_proj
from . import contextual, router
from .state import (ATTR, LayerState, activation_name, active, begin_layer, convert_layer, converted, ffn_call,
                    find_layers, heads_of, layer_plan, restore_modules)

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def is_layer(m) -> bool:
    a, f = getattr(m, "self_attn", None), getattr(m, "mlp", None)
    return (a is not None and f is not None and all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and all(hasattr(f, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and hasattr(m, "input_layernorm") and hasattr(m, "post_attention_layernorm"))


def layers_of(model):
    return find_layers(model, "layers", is_layer)


def _rotary(q, k, cos, sin):
    """Rotary embedding on q, k [B, h, T, D] with cos, sin [B or 1, T, D] (the half-rotation form)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rot(t):
        h = t.shape[-1] // 2
        return torch.cat((-t[..., h:], t[..., :h]), dim=-1)
    return (q * cos + rot(q) * sin) if q is not None else None, k * cos + rot(k) * sin


def _causal(Tq, Tk, device):
    """Bottom-right aligned causal mask [Tq, Tk] (True = attend): query i sees keys up to Tk - Tq + i."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)


class SparseLlamaAttention:
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        st: LayerState = self._sparse_layer_state
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        H = st.num_heads
        n, T = hidden_states.shape[:2]
        if active(st, "heads") is None or kwargs.get("output_attentions"):
            st.add("heads", n * H, 0)
            return super().forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        m, heads = heads_of(st, n)
        K = heads.numel()
        D = self.head_dim
        Hkv = self.k_proj.out_features // D
        groups = H // Hkv
        x = hidden_states
        # KV heads: every one with a cache (the cache stays whole), else those a running head reads.
        kv = torch.arange(Hkv, device=x.device) if cache is not None else torch.unique(heads // groups)
        kv_all = kv.numel() == Hkv
        hb = None if K == H else heads  # every head: the weights as they are, nothing gathered
        q = head_in_proj(x, self.q_proj.weight, self.q_proj.bias, hb, D).view(n, T, K, D).transpose(1, 2)
        kb = None if kv_all else kv
        k = head_in_proj(x, self.k_proj.weight, self.k_proj.bias, kb, D).view(n, T, -1, D).transpose(1, 2)
        v = head_in_proj(x, self.v_proj.weight, self.v_proj.bias, kb, D).view(n, T, -1, D).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = _rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        # Each running query head reads its group's KV head (position in kv).
        pos = torch.full((Hkv,), -1, dtype=torch.long, device=x.device)
        pos[kv] = torch.arange(kv.numel(), device=x.device)
        sel = pos[heads // groups]
        if not (groups == 1 and kv_all and K == H):
            k = k.index_select(1, sel)
            v = v.index_select(1, sel)
        Tk = k.shape[2]
        mask = attention_mask
        causal = False
        if mask is None:
            if T > 1 and T == Tk:
                causal = True
            elif T > 1:
                mask = _causal(T, Tk, x.device)
        elif mask.dtype == torch.bool or mask.is_floating_point():
            mask = mask[..., :Tk]
        hm = m.index_select(-1, heads)  # [K] or [n, K]: bool, or the running heads' gate values
        p = self.attention_dropout if self.training else 0.0
        if p > 0:
            raise NotImplementedError("sparse_ops: attention dropout in training is not supported by the patched "
                                      "LLaMA attention (config.attention_dropout > 0)")
        if K == 0:
            o = x.new_zeros(n, T, 0)
        else:
            o = masked_head_attention(q, k, v, hm, attn_mask=mask, is_causal=causal, scale=self.scaling)
            o = o.transpose(1, 2).reshape(n, T, K * D)
        return head_out_proj(o, self.o_proj.weight, self.o_proj.bias, hb, D), None


class SparseLlamaMLP:
    def forward(self, x):
        st: LayerState = self._sparse_layer_state
        if (st.ffn is None and st.ffn_threshold is not None) or st.ffn_calib is not None:
            return contextual.forward(st, self, x, self._sparse_act)
        if st.gates is not None and router.router_of(st) is not None:
            return router.forward(st, self, x, self._sparse_act)
        call = ffn_call(st, x.shape[0], x.shape[1])
        if call is None:
            return super().forward(x)
        g, u, dn = self.gate_proj, self.up_proj, self.down_proj
        return gated_ffn(x, g.weight, dn.weight, call[0], gate=call[1], b1=g.bias, b2=dn.bias, w3=u.weight,
                         activation=self._sparse_act)


class SparseLlamaLayer:
    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        st: LayerState = getattr(self, ATTR)
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        B, T = hidden_states.shape[:2]
        begin_layer(st, B, T, self.training, hidden_states.device, hidden_states, attention_mask)
        keep, gate = layer_plan(st, B)
        full = super().forward
        call = dict(attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
                    position_embeddings=position_embeddings, **kwargs)
        if gate is None and (keep is None or (keep.dim() == 0 and bool(keep))
                             or (keep.dim() == 1 and bool(keep.all()))):
            st.add("layers", B, B)
            return full(hidden_states, **call)
        if gate is None and (keep.dim() == 0 or not bool(keep.any())):
            st.add("layers", 0, B)
            if cache is not None:
                self._sparse_append_kv(hidden_states, position_embeddings, cache, kwargs)
            return zero_grads_for(hidden_states, self)  # the parameters get zero gradients, not None
        if keep.shape[0] != B:
            raise ValueError(f"sparse_ops: layer {st.index}: the layers mask was set for batch {keep.shape[0]}; "
                             f"this forward has batch {B}")
        st.rows = torch.nonzero(keep).flatten()
        st.add("layers", st.rows.numel(), B)
        cos, sin = position_embeddings
        inner = None
        if cache is not None:
            # Every sample's K/V goes into the cache (the CALM rule for the skipped ones); the kept
            # samples' attention then reads its rows of the updated cache.
            k_all, v_all = self._sparse_append_kv(hidden_states, position_embeddings, cache, kwargs)
            inner = _CachedRows(k_all, v_all, st.rows)

        def run(h, am, c, s):
            return full(h, attention_mask=am, position_ids=position_ids, cache=inner, use_cache=use_cache,
                        position_embeddings=(c, s), **kwargs)
        per = lambda t: isinstance(t, torch.Tensor) and t.shape[0] == B and B > 1  # noqa: E731
        travel = [i for i, t in enumerate((attention_mask, cos, sin)) if per(t)]
        stay = [i for i, t in enumerate((attention_mask, cos, sin)) if isinstance(t, torch.Tensor) and i not in travel]
        try:
            y = skip_layer(run, hidden_states, keep, attention_mask, cos, sin, gate=gate, travel=travel or None,
                           stay=stay or None)
            # A gate that closed the layer for every sample: its parameters still get (zero) gradients.
            return zero_grads_for(y, self) if st.rows.numel() == 0 else y
        finally:
            st.rows = None

    def _sparse_append_kv(self, hidden_states, position_embeddings, cache, kwargs):
        """The K/V a skipped layer still appends: from its input, k/v projections and rotary on k."""
        a = self.self_attn
        n, T = hidden_states.shape[:2]
        h = self.input_layernorm(hidden_states)
        k = a.k_proj(h).view(n, T, -1, a.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(n, T, -1, a.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        _, k = _rotary(None, k, cos, sin)
        return cache.update(k, v, a.layer_idx, kwargs=kwargs)


class _CachedRows:
    """What the kept samples' attention sees as its cache: update() returns their rows of the layer's
    keys and values, already updated for the whole batch (what it would append is the same)."""

    def __init__(self, k, v, rows):
        self.k, self.v, self.rows = k, v, rows

    def update(self, k, v, layer_idx, *args, **kwargs):
        return self.k.index_select(0, self.rows), self.v.index_select(0, self.rows)


def convert(model, layers, heads: bool, ffn: bool, layer_skip: bool):
    cfg = getattr(model, "config", None)
    states = []
    for i, layer in enumerate(layers):
        a = layer.self_attn
        H = a.q_proj.out_features // a.head_dim
        st = LayerState(i, H, layer.mlp.gate_proj.out_features, width=a.q_proj.in_features)
        if ffn:
            layer.mlp._sparse_act = activation_name(ACTIVATIONS, getattr(cfg, "hidden_act", None),
                                                    type(layer.mlp).__name__)
        convert_layer(layer, st, [(a, SparseLlamaAttention), (layer.mlp, SparseLlamaMLP)])
        layer.__class__ = converted(type(layer), SparseLlamaLayer)
        states.append(st)
    return states


def restore(layers, model=None):
    for layer in layers:
        restore_modules((layer, layer.self_attn, layer.mlp))
