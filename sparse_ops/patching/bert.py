"""Hugging Face BERT-family encoders (BertModel and the models with its layer layout: each layer
has attention.self.{query,key,value}, attention.output.{dense,LayerNorm,dropout},
intermediate.dense (+ its activation) and output.{dense,LayerNorm,dropout}).

Conversion swaps the class of three modules per layer for a subclass defined here (the module
objects, their parameters and so state_dict stay as they are; unpatch swaps the classes back):
  attention (BertAttention)  heads: only the running (sample, head) pairs are projected (rows of
                             query/key/value, columns of attention.output.dense) and attended,
                             through sparse_ops.nn.attention_paths (its grouped projections and
                             masked_head_attention); then dropout and the residual LayerNorm.
  layer (BertLayer)          ffn: feed_forward_chunk runs gated_ffn on intermediate.dense (w1) and
                             output.dense (w2, read in its [d, F] nn.Linear layout: no copy; an
                             encoder has no decode step, which is where the transposed layout pays);
                             layers: forward runs only the kept samples (skip_layer), the attention
                             mask travelling with them.
The attention mask is the one the model builds for its attention implementation (None, a bool
[B, 1, Tq, Tk] with True = attend, or an additive float one); both forms are what
masked_head_attention takes, so no mask interface is registered for these models.
"""
from __future__ import annotations

import torch

from ..nn.attention_paths import Weights
from ..ops import gated_ffn, skip_layer
from ..ops.layers import zero_grads_for
from .state import (ATTR, LayerState, activation_name, active, attend_heads, begin_layer, convert_layer, converted,
                    ffn_call, find_layers, layer_plan, restore_modules)

# config.hidden_act -> gated_ffn's activation name
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": None,
               "relu": "relu", "silu": "silu", "swish": "silu"}


def is_layer(m) -> bool:
    a = getattr(m, "attention", None)
    return (a is not None and hasattr(getattr(a, "self", None), "query") and hasattr(getattr(a, "output", None), "dense")
            and hasattr(getattr(m, "intermediate", None), "dense") and hasattr(getattr(m, "output", None), "dense")
            and hasattr(m, "feed_forward_chunk"))


def layers_of(model):
    """The encoder's layers (a ModuleList named `layer` whose entries are BERT-family layers), or None."""
    return find_layers(model, "layer", is_layer)


def activation_of(layer) -> str:
    cfg = getattr(layer.attention.self, "config", None)
    return activation_name(ACTIVATIONS, getattr(cfg, "hidden_act", None), f"{type(layer).__name__}'s FFN")


# ----------------------------------------------------------------- converted modules
class SparseBertAttention:
    """Mixin over the model's BertAttention class: self-attention over the running heads only."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                cache=None, **kwargs):
        st: LayerState = self._sparse_layer_state
        sa = self.self
        H = sa.num_attention_heads
        n = hidden_states.shape[0]
        full = super().forward  # the model's own forward (cross-attention, a cache, attention weights)
        if (active(st, "heads") is None or getattr(self, "is_cross_attention", False) or cache is not None
                or kwargs.get("past_key_values") is not None or kwargs.get("output_attentions")):
            st.add("heads", n * H, 0)
            return full(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, cache=cache,
                        **kwargs)
        w = Weights(H, sa.attention_head_size, None, sa.query.weight, sa.key.weight, sa.value.weight, None,
                    self.output.dense.weight, self.output.dense.bias, None, None, False,
                    (sa.query.bias, sa.key.bias, sa.value.bias))
        mask4 = attention_mask
        if mask4 is not None and mask4.dim() != 4:
            raise ValueError(f"sparse_ops: {type(self).__name__} got an attention mask of shape "
                             f"{tuple(mask4.shape)}; expected [B or 1, 1 or H, Tq, Tk]")
        causal = bool(getattr(sa, "is_causal", False)) and mask4 is None
        o = attend_heads(st, w, hidden_states, mask4, causal, sa.dropout.p if self.training else 0.0)
        out = self.output
        return out.LayerNorm(out.dropout(o) + hidden_states), None


class SparseBertLayer:
    """Mixin over the model's BertLayer class: per-sample layer skipping and the gated FFN."""

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        st: LayerState = getattr(self, ATTR)
        B = hidden_states.shape[0]
        T = hidden_states.shape[1] if hidden_states.dim() == 3 else 1
        begin_layer(st, B, T, self.training, hidden_states.device, hidden_states, attention_mask)
        keep, gate = layer_plan(st, B)
        full = super().forward
        if gate is None and (keep is None or (keep.dim() == 1 and bool(keep.all()))):
            st.add("layers", B, B)
            return full(hidden_states, attention_mask, *args, **kwargs)
        if keep.dim() == 0:  # one flag for the whole batch
            if bool(keep):
                st.add("layers", B, B)
                return full(hidden_states, attention_mask, *args, **kwargs)
            st.add("layers", 0, B)
            return zero_grads_for(hidden_states, self)  # the parameters get zero gradients, not None
        if keep.shape[0] != B:
            raise ValueError(f"sparse_ops: layer {st.index}: the layers mask was set for batch {keep.shape[0]}; "
                             f"this forward has batch {B}")
        st.rows = torch.nonzero(keep).flatten()
        st.add("layers", st.rows.numel(), B)
        per_sample_mask = isinstance(attention_mask, torch.Tensor) and attention_mask.shape[0] == B and B > 1
        try:
            return skip_layer(full, hidden_states, keep, attention_mask, *args, gate=gate,
                              travel=[0] if per_sample_mask else None, stay=None if per_sample_mask else [0],
                              **kwargs)
        finally:
            st.rows = None

    def feed_forward_chunk(self, attention_output):
        st: LayerState = getattr(self, ATTR)
        x = attention_output
        call = ffn_call(st, x.shape[0], x.shape[1])
        if call is None:
            return super().feed_forward_chunk(attention_output)
        i, o = self.intermediate.dense, self.output.dense
        h = gated_ffn(x, i.weight, o.weight, call[0], gate=call[1], b1=i.bias, b2=o.bias, activation=self._sparse_act)
        return self.output.LayerNorm(self.output.dropout(h) + x)


def convert(model, layers, heads: bool, ffn: bool, layer_skip: bool):
    """Swap the classes of each layer's modules; returns the LayerStates in layer order."""
    states = []
    for i, layer in enumerate(layers):
        sa = layer.attention.self
        st = LayerState(i, sa.num_attention_heads, layer.intermediate.dense.out_features,
                        width=sa.query.in_features)
        if ffn:
            layer._sparse_act = activation_of(layer)
        # The attention is converted whatever `heads` says: it counts the pairs it runs for stats.
        convert_layer(layer, st, [(layer.attention, SparseBertAttention)])
        layer.__class__ = converted(type(layer), SparseBertLayer)
        states.append(st)
    return states


def restore(layers, model=None):
    for layer in layers:
        restore_modules((layer, layer.attention), names=(ATTR, "_sparse_layer_state", "_sparse_act"))
