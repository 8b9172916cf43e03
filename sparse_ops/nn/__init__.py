"""Drop-in modules built on the functional ops."""
from .ffn import GatedFFN
from .layers import LayerDrop, SkipLayer, TokenRouter

__all__ = ["GatedFFN", "SkipLayer", "LayerDrop", "TokenRouter"]
