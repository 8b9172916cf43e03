"""Which rows run: the positions of a keep mask's True entries, as ops torch.compile can trace.

Their output sizes depend on the mask's values. Eager code computes them inline (and branches
on the counts); while torch.compile traces, these ops stand in: their fakes return a new
unbacked size, so the kept count is a symbol of the graph, not a guard, and one graph serves
every mask (skip_layer, SparseMultiheadAttention's sparse path).

  kept_positions(mask [R] bool) -> idx [n] int64
  kept_positions_per_row(mask [B, T] bool) -> (idx [B*k] int64, valid [B, k] bool)
  token_plan(mask [B, T] bool) -> (idx, valid, k, n)      eager, with the counts as ints
"""
from __future__ import annotations

import torch


@torch.library.custom_op("sparse_ops::kept_positions", mutates_args=())
def kept_positions(mask: torch.Tensor) -> torch.Tensor:
    """The positions (int64) of the True entries of a bool [R] mask, in order."""
    if mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError(f"kept_positions: mask must be a 1-D bool tensor; got {mask.dtype} of shape "
                         f"{tuple(mask.shape)}")
    return torch.nonzero(mask).reshape(-1)


@kept_positions.register_fake
def _(mask):
    n = torch.library.get_ctx().new_dynamic_size()
    return mask.new_empty((n,), dtype=torch.long)


@torch.library.custom_op("sparse_ops::kept_positions_per_row", mutates_args=())
def kept_positions_per_row(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a bool [B, T] mask: (idx [B*k] int64, valid [B, k] bool) with k the largest
    count of True in a row; row b's True positions as b*T + t, in order, then -1 padding."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"kept_positions_per_row: mask must be a 2-D bool tensor; got {mask.dtype} of shape "
                         f"{tuple(mask.shape)}")
    idx, valid, _, _ = token_plan(mask)
    return idx, valid


@kept_positions_per_row.register_fake
def _(mask):
    k = torch.library.get_ctx().new_dynamic_size()
    return mask.new_empty((mask.shape[0] * k,), dtype=torch.long), mask.new_empty((mask.shape[0], k), dtype=torch.bool)


def token_plan(mask: torch.Tensor):
    """(idx, valid, k, n) of a bool [B, T] mask: kept_positions_per_row's two tensors, the padded
    width k and the number n of True entries, as ints."""
    B, T = mask.shape
    counts = mask.sum(1)
    k = int(counts.max()) if B > 0 else 0
    # Each row's True positions first, in order (a stable sort of the False flags), cut at k.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :k]
    valid = torch.arange(k, device=mask.device)[None, :] < counts[:, None]
    idx = torch.where(valid, order + torch.arange(B, device=mask.device)[:, None] * T,
                      torch.full_like(order, -1)).reshape(-1)
    return idx, valid, k, int(counts.sum())


__all__ = ["kept_positions", "kept_positions_per_row", "token_plan"]
