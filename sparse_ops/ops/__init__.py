"""Functional ops. Each module wraps its registered torch ops and registers their
fake (meta) kernels and autograd formulas."""
from .ffn import gated_ffn
from .heads import masked_head_attention
from .layers import gather_rows, scatter_rows, skip_layer

__all__ = ["gated_ffn", "masked_head_attention", "skip_layer", "gather_rows", "scatter_rows"]
