"""What a patched layer knows: its masks, the rows that reach it, and what ran in the last forward.

One `LayerState` per transformer layer of a patched model, kept on the layer module as the
attribute `_sparse_state` (not a parameter or buffer: nothing of it is in state_dict). The
converted attention, FFN and layer modules of that layer read their masks from it and add what
they computed to its counters; `sparse_ops.stats` sums the counters over the layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

ATTR = "_sparse_state"
KINDS = ("heads", "ffn", "layers")


@dataclass
class LayerState:
    index: int                       # the layer's position in the model
    num_heads: int
    ffn_size: int
    heads: torch.Tensor | None = None    # None | bool [H] | bool [B, H]
    ffn: torch.Tensor | None = None      # None | bool [F] | int64 [K] | bool [B, F] | bool [B, T, F]
    keep: torch.Tensor | None = None     # this layer's column of the layers mask: None | bool [] | bool [B]
    # Set by the layer's forward for the modules inside it: the full batch size of this call and,
    # when only some samples run the layer, their indices (the modules then receive those rows only
    # and select the same rows of their [B, ...] masks).
    batch: int = 0
    rows: torch.Tensor | None = None
    # (computed, total) unit pairs of the last forward: (sample, head), (token, column), (sample, layer).
    counts: dict = field(default_factory=lambda: {k: [0, 0] for k in KINDS})

    def reset_counts(self):
        for k in KINDS:
            self.counts[k] = [0, 0]

    def add(self, kind: str, computed: int, total: int):
        c = self.counts[kind]
        c[0] += int(computed)
        c[1] += int(total)

    def rows_of(self, mask: torch.Tensor, n: int) -> torch.Tensor:
        """The rows of a per-sample mask ([B, ...]) that belong to the n samples this call received."""
        if mask.shape[0] == n:
            return mask
        if self.rows is not None and mask.shape[0] == self.batch and self.rows.numel() == n:
            return mask.index_select(0, self.rows)
        raise ValueError(f"sparse_ops: layer {self.index}: a per-sample mask of batch {mask.shape[0]} was set, "
                         f"but this forward has batch {self.batch or n}; set_masks again for this batch size")
