"""sparse_ops: dynamic sparse execution for transformers.

Heads, FFN columns and layers that a gate, mask or pruning method turns off are not
computed. See docs/design.md for the contract; `sparse_ops.info()` for what was built.
"""
from .backend import set_backend, get_backend
from . import reference
from .ops import gated_ffn, masked_head_attention, skip_layer
from . import gates
from . import nn
from .patching import patch, set_masks, clear_masks, unpatch, stats, fit_routers
from . import pruning
from . import info  # a callable module: sparse_ops.info() -> dict; python -m sparse_ops.info

__version__ = "0.1.0"

__all__ = ["gated_ffn", "masked_head_attention", "skip_layer", "gates", "nn", "info", "reference", "set_backend", "get_backend",
           "patch", "set_masks", "clear_masks", "unpatch", "stats", "fit_routers", "pruning"]
