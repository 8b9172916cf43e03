"""Functional ops. Each module wraps its registered torch ops and registers their
fake (meta) kernels and autograd formulas."""
from .ffn import gated_ffn

__all__ = ["gated_ffn"]
