"""Drop-in modules built on the functional ops."""
from .attention import SparseMultiheadAttention
from .ffn import GatedFFN
from .layers import LayerDrop, SkipLayer, TokenRouter

__all__ = ["GatedFFN", "SparseMultiheadAttention", "SkipLayer", "LayerDrop", "TokenRouter"]
