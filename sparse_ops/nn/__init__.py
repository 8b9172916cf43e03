"""Drop-in modules built on the functional ops."""
from .ffn import GatedFFN

__all__ = ["GatedFFN"]
