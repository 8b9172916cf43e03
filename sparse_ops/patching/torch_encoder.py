"""torch.nn.TransformerEncoderLayer, alone or in a torch.nn.TransformerEncoder (norm_first both
ways, batch_first both ways).

Conversion swaps each layer's class for a subclass whose forward always takes the layer's
Python path (torch's fused encoder fast path would compute every head and column): the
attention through sparse_ops.nn.attention_paths on the layer's own nn.MultiheadAttention
weights (only the running heads' rows of in_proj_weight and columns of out_proj), the FFN
through gated_ffn on linear1 / linear2 ([d, F], read in place), per-sample layer skipping
through skip_layer with src_key_padding_mask travelling. A TransformerEncoder's nested-tensor
conversion is turned off while patched (its layers would receive nested tensors).
Dropout in training: attention dropout runs (attention_paths); the FFN's hidden dropout (between
the activation and linear2) cannot run inside gated_ffn, so with dropout > 0 in training an FFN
mask runs the FFN densely with the mask multiplied in (counted as computed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention_masks import attention_mask_4d
from ..nn.attention_paths import Weights
from ..ops import gated_ffn, skip_layer
from ..ops.layers import zero_grads_for
from .state import (ATTR, LayerState, active, attend_heads, begin_layer, converted, ffn_active, layer_plan,
                    restore_modules)

WHO = "sparse_ops.patch"


def layers_of(model):
    if isinstance(model, nn.TransformerEncoderLayer):
        return [model]
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder):
            return list(mod.layers)
    return None


def activation_of(layer) -> str:
    act = layer.activation
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu:
        return "gelu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if act is F.silu or isinstance(act, nn.SiLU):
        return "silu"
    raise TypeError(f"{WHO}: TransformerEncoderLayer activation {act!r} is not one gated_ffn runs (relu, gelu, "
                    f"gelu tanh, silu); patch with ffn=False")


class SparseEncoderLayer:
    """Mixin over nn.TransformerEncoderLayer."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        st: LayerState = getattr(self, ATTR)
        bf = self.self_attn.batch_first
        batched = src.dim() == 3
        x = src if (bf or not batched) else src.transpose(0, 1)  # [B, T, E]
        if not batched:
            x = x.unsqueeze(0)
            if src_key_padding_mask is not None:
                src_key_padding_mask = src_key_padding_mask.unsqueeze(0)
        B, T = x.shape[0], x.shape[1]
        kpm = src_key_padding_mask  # True (or -inf) = padding; what a SampleRouter reads: True = real
        real = None if kpm is None or st.gates is None else (
            ~kpm if kpm.dtype == torch.bool else kpm > torch.finfo(kpm.dtype).min / 2)
        begin_layer(st, B, T, self.training, x.device, x, real)
        keep, gate = layer_plan(st, B)
        body = self._sparse_body
        if gate is None and (keep is None or (keep.dim() == 0 and bool(keep))
                             or (keep.dim() == 1 and bool(keep.all()))):
            st.add("layers", B, B)
            y = body(x, src_mask, src_key_padding_mask, is_causal)
        elif keep.dim() == 0:
            st.add("layers", 0, B)
            y = zero_grads_for(x, self)  # the parameters get zero gradients, not None
        else:
            if keep.shape[0] != B:
                raise ValueError(f"sparse_ops: layer {st.index}: the layers mask was set for batch {keep.shape[0]}; "
                                 f"this forward has batch {B}")
            st.rows = torch.nonzero(keep).flatten()
            st.add("layers", st.rows.numel(), B)
            try:
                y = skip_layer(lambda xb, kpm: body(xb, src_mask, kpm, is_causal), x, keep, src_key_padding_mask,
                               gate=gate, travel=[0] if src_key_padding_mask is not None else None)
                if st.rows.numel() == 0:  # closed for every sample: the parameters still get (zero) gradients
                    y = zero_grads_for(y, self)
            finally:
                st.rows = None
        if not batched:
            return y.squeeze(0)
        return y if bf else y.transpose(0, 1)

    def _sparse_body(self, x, src_mask, kpm, is_causal):
        if self.norm_first:
            x = x + self._sparse_sa(self.norm1(x), src_mask, kpm, is_causal)
            return x + self._sparse_ff(self.norm2(x))
        x = self.norm1(x + self._sparse_sa(x, src_mask, kpm, is_causal))
        return self.norm2(x + self._sparse_ff(x))

    def _sparse_sa(self, x, attn_mask, kpm, is_causal):
        st: LayerState = getattr(self, ATTR)
        mha = self.self_attn
        H = mha.num_heads
        n, T = x.shape[0], x.shape[1]
        if active(st, "heads") is None:
            st.add("heads", n * H, 0)
            xi = x if mha.batch_first else x.transpose(0, 1)
            o = mha(xi, xi, xi, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=False, is_causal=is_causal)[0]
            return self.dropout1(o if mha.batch_first else o.transpose(0, 1))
        mask4, causal = attention_mask_4d(kpm, attn_mask, is_causal, False, n, H, T, T, True, x.dtype, who=WHO)
        o = attend_heads(st, Weights.of(mha), x, mask4, causal, mha.dropout if self.training else 0.0)
        return self.dropout1(o)

    def _sparse_ff(self, x):
        st: LayerState = getattr(self, ATTR)
        n, T = x.shape[0], x.shape[1]
        F_ = st.ffn_size
        a = active(st, "ffn")
        if a is None:
            st.add("ffn", n * T * F_, 0)
            return self._ff_block(x)
        if (a.dtype == torch.bool or a.is_floating_point()) and a.dim() >= 2:  # per sample or per token
            a = st.rows_of(a, n)
        if self.training and self.dropout.p > 0:
            # Hidden dropout cannot run inside gated_ffn: dense, with the mask (or gate) multiplied in.
            st.add("ffn", n * T * F_, 0)
            if a.dtype == torch.int64:
                a = torch.zeros(F_, dtype=torch.bool, device=x.device).index_fill_(0, a, True)
            m = a[:, None, :] if a.dim() == 2 else a
            h = self.dropout(self.activation(self.linear1(x)) * m.to(x.dtype))
            return self.dropout2(self.linear2(h))
        a, computed = ffn_active(st, n, T)
        st.add("ffn", computed, 0)
        l1, l2 = self.linear1, self.linear2
        act, g = (None, a) if a.is_floating_point() else (a, None)
        return self.dropout2(gated_ffn(x, l1.weight, l2.weight, act, gate=g, b1=l1.bias, b2=l2.bias,
                                       activation=self._sparse_act))


def convert(model, layers, heads: bool, ffn: bool, layer_skip: bool):
    states = []
    for i, layer in enumerate(layers):
        st = LayerState(i, layer.self_attn.num_heads, layer.linear1.out_features,
                        width=layer.self_attn.embed_dim)
        layer._sparse_act = activation_of(layer) if ffn else None
        setattr(layer, ATTR, st)
        layer.__class__ = converted(type(layer), SparseEncoderLayer)
        states.append(st)
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder) and getattr(mod, "use_nested_tensor", False):
            mod._sparse_nested = mod.use_nested_tensor
            mod.use_nested_tensor = False
    return states


def restore(layers, model=None):
    restore_modules(layers)
    if model is not None:
        for mod in model.modules():
            if "_sparse_nested" in mod.__dict__:
                mod.use_nested_tensor = mod._sparse_nested
                del mod._sparse_nested
