"""Pruning methods that produce data our ops turn into speed: which heads, FFN columns and layers to
keep, or a shallower / physically smaller model.

  Seven(model, keep, start_step=0, steps=100, alpha1=0.8, alpha2=0.9, granularity=..., modules=None)
                         SEVEN importance scores and masks (seven.py); .set_masks() (structured),
                         .to_semi_structured() (2:4 on CUDA: torch's semi-structured sparse matmul)
  prune_layers(model, n, calib, score="block_influence")   remove n layers (layers.py)
  merge_layers(model, calib, threshold)                     sliding-window layer merging (layers.py)
  compact(model)         a patched model's static masks made physical (compact.py)
  load_compact(path, cls)   load a compacted model saved with save_pretrained
  from_torch_prune(model)   masks a torch.nn.utils.prune user already has, as unit masks (torch_prune.py)

Supported models: Hugging Face BERT-family encoders and LLaMA-family decoders (_arch.py); Seven's
unstructured and 2:4 granularities work on any model's nn.Linear modules.
"""
from .compact import compact, load_compact
from .layers import merge_layers, prune_layers
from .seven import Seven
from .torch_prune import from_torch_prune

__all__ = ["Seven", "prune_layers", "merge_layers", "compact", "load_compact", "from_torch_prune"]
