"""Hugging Face GPT-2 (GPT2Model / GPT2LMHeadModel): each block has attn.{c_attn, c_proj}, mlp.{c_fc,
c_proj} as Conv1D layers, whose weights are [in, out] (y = x W + b), ln_1 and ln_2.

Converted per block (class swaps, as in patching/bert.py):
  attn   heads: only the running heads' columns of c_attn (q, and k, v; every k, v head with a
         KV cache so the cache stays whole) and rows of c_proj are read (index_select of those
         columns / rows, then one GEMM each). Per-sample masks [B, H] project the union of the
         batch's running heads and skip the other pairs inside masked_head_attention. Causality
         as in patching/llama.py. Attention dropout in training runs
         F.scaled_dot_product_attention on the running heads (masked_head_attention has none).
  mlp    ffn: gated_ffn with w1 = c_fc.weight.t() (a view, no copy), w2 = c_proj.weight, which is
         already the [F, d] layout (w2_transposed=True: the decode-fast layout, for free).
  block  layers: per-sample skipping (skip_layer); with a KV cache every sample's K/V is
         appended first, from the block's input (ln_1, the k/v columns of c_attn): the CALM rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import gated_ffn, masked_head_attention, skip_layer
from ..ops.layers import zero_grads_for
from .llama import _CachedRows, _causal
from .state import (ATTR, LayerState, activation_name, active, begin_layer, convert_layer, converted, ffn_call,
                    find_layers, heads_of, layer_plan, restore_modules)

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
               "silu": "silu", "swish": "silu"}


def is_layer(m) -> bool:
    a, f = getattr(m, "attn", None), getattr(m, "mlp", None)
    return (a is not None and f is not None and hasattr(a, "c_attn") and hasattr(a, "c_proj")
            and hasattr(f, "c_fc") and hasattr(f, "c_proj") and hasattr(m, "ln_1") and hasattr(m, "ln_2"))


def layers_of(model):
    return find_layers(model, "h", is_layer)


def _kv_columns(E, D, kv_heads, device):
    """Columns of c_attn holding k then v of the given heads."""
    base = (kv_heads[:, None] * D + torch.arange(D, device=device)).flatten()
    return torch.cat((E + base, 2 * E + base))


class SparseGPT2Attention:
    def forward(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, output_attentions=False, **kwargs):
        st: LayerState = self._sparse_layer_state
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        H, D, E = self.num_heads, self.head_dim, self.embed_dim
        n, T = hidden_states.shape[:2]
        if (active(st, "heads") is None or encoder_hidden_states is not None or output_attentions
                or (self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn)):
            st.add("heads", n * H, 0)
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask,
                                   encoder_hidden_states=encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask,
                                   output_attentions=output_attentions, **kwargs)
        m, heads = heads_of(st, n)
        K = heads.numel()
        x = hidden_states
        dev = x.device
        kv = torch.arange(H, device=dev) if cache is not None else heads
        qcols = (heads[:, None] * D + torch.arange(D, device=dev)).flatten()
        cols = torch.cat((qcols, _kv_columns(E, D, kv, dev)))
        W, b = self.c_attn.weight, self.c_attn.bias
        y = torch.addmm(b.index_select(0, cols), x.reshape(-1, E), W.index_select(1, cols)).view(n, T, -1)
        q, k, v = y.split((K * D, kv.numel() * D, kv.numel() * D), dim=2)
        q = q.reshape(n, T, K, D).transpose(1, 2)
        k = k.reshape(n, T, -1, D).transpose(1, 2)
        v = v.reshape(n, T, -1, D).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
            k, v = k.index_select(1, heads), v.index_select(1, heads)
        Tk = k.shape[2]
        mask, causal = attention_mask, False
        if mask is None:
            if T > 1 and T == Tk:
                causal = True
            elif T > 1:
                mask = _causal(T, Tk, dev)
        else:
            mask = mask[..., :Tk]
        p = self.attn_dropout.p if self.training else 0.0
        if K == 0:
            o = x.new_zeros(n, T, 0)
        else:
            if p > 0:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                   scale=self.scaling)
                if m.dim() == 2 or m.is_floating_point():  # per-sample masks, or gate values
                    g = m.index_select(-1, heads).to(o.dtype)
                    o = o * (g[:, :, None, None] if g.dim() == 2 else g[None, :, None, None])
            else:
                hm = m.index_select(-1, heads)  # [K] or [n, K]: bool, or the running heads' gate values
                o = masked_head_attention(q, k, v, hm, attn_mask=mask, is_causal=causal, scale=self.scaling)
            o = o.transpose(1, 2).reshape(n, T, K * D)
        Wo = self.c_proj.weight.index_select(0, qcols)  # [K*D, E]: the running heads' rows
        out = torch.addmm(self.c_proj.bias, o.reshape(n * T, K * D), Wo).view(n, T, E)
        return self.resid_dropout(out), None


class SparseGPT2MLP:
    def forward(self, hidden_states):
        st: LayerState = self._sparse_layer_state
        x = hidden_states
        call = ffn_call(st, x.shape[0], x.shape[1])
        if call is None:
            return super().forward(x)
        fc, pr = self.c_fc, self.c_proj
        h = gated_ffn(x, fc.weight.t(), pr.weight, call[0], gate=call[1], b1=fc.bias, b2=pr.bias, activation=self._sparse_act,
                      w2_transposed=True)
        return self.dropout(h)  # GPT-2's MLP dropout is on the output: the same here


class SparseGPT2Block:
    def forward(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, use_cache=False, **kwargs):
        st: LayerState = getattr(self, ATTR)
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        B, T = hidden_states.shape[:2]
        begin_layer(st, B, T, self.training, hidden_states.device, hidden_states, attention_mask)
        keep, gate = layer_plan(st, B)
        full = super().forward
        call = dict(cache=cache, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask, use_cache=use_cache, **kwargs)
        if gate is None and (keep is None or (keep.dim() == 0 and bool(keep))
                             or (keep.dim() == 1 and bool(keep.all()))):
            st.add("layers", B, B)
            return full(hidden_states, **call)
        if encoder_hidden_states is not None:
            raise NotImplementedError("sparse_ops: layer skipping in GPT-2 blocks with cross-attention is not "
                                      "supported")
        if gate is None and (keep.dim() == 0 or not bool(keep.any())):
            st.add("layers", 0, B)
            if cache is not None:
                self._sparse_append_kv(hidden_states, cache, kwargs)
            return zero_grads_for(hidden_states, self)  # the parameters get zero gradients, not None
        if keep.shape[0] != B:
            raise ValueError(f"sparse_ops: layer {st.index}: the layers mask was set for batch {keep.shape[0]}; "
                             f"this forward has batch {B}")
        st.rows = torch.nonzero(keep).flatten()
        st.add("layers", st.rows.numel(), B)
        inner = None
        if cache is not None:
            k_all, v_all = self._sparse_append_kv(hidden_states, cache, kwargs)
            inner = _CachedRows(k_all, v_all, st.rows)

        def run(h, am):
            return full(h, cache=inner, attention_mask=am, use_cache=use_cache, **kwargs)
        per = isinstance(attention_mask, torch.Tensor) and attention_mask.shape[0] == B and B > 1
        try:
            y = skip_layer(run, hidden_states, keep, attention_mask, gate=gate, travel=[0] if per else None,
                           stay=[0] if isinstance(attention_mask, torch.Tensor) and not per else None)
            # A gate that closed the layer for every sample: its parameters still get (zero) gradients.
            return zero_grads_for(y, self) if st.rows.numel() == 0 else y
        finally:
            st.rows = None

    def _sparse_append_kv(self, hidden_states, cache, kwargs):
        a = self.attn
        n, T = hidden_states.shape[:2]
        E, D = a.embed_dim, a.head_dim
        h = self.ln_1(hidden_states)
        cols = _kv_columns(E, D, torch.arange(a.num_heads, device=h.device), h.device)
        y = torch.addmm(a.c_attn.bias.index_select(0, cols), h.reshape(-1, E),
                        a.c_attn.weight.index_select(1, cols)).view(n, T, -1)
        k, v = y.split(E, dim=2)
        k = k.reshape(n, T, -1, D).transpose(1, 2)
        v = v.reshape(n, T, -1, D).transpose(1, 2)
        return cache.update(k, v, a.layer_idx, kwargs=kwargs)


def convert(model, layers, heads: bool, ffn: bool, layer_skip: bool):
    cfg = getattr(model, "config", None)
    states = []
    for i, layer in enumerate(layers):
        a = layer.attn
        st = LayerState(i, a.num_heads, layer.mlp.c_fc.weight.shape[1], width=a.embed_dim)
        if ffn:
            layer.mlp._sparse_act = activation_name(ACTIVATIONS, getattr(cfg, "activation_function", None), "GPT-2")
        convert_layer(layer, st, [(a, SparseGPT2Attention), (layer.mlp, SparseGPT2MLP)])
        layer.__class__ = converted(type(layer), SparseGPT2Block)
        states.append(st)
    return states


def restore(layers, model=None):
    for layer in layers:
        restore_modules((layer, layer.attn, layer.mlp))
