"""Masks a user already has from torch.nn.utils.prune, as unit masks our ops can skip.

torch.nn.utils.prune keeps each pruned module's mask in a `weight_mask` buffer and multiplies it
in, so nothing runs faster. Only whole units turn into speed:
  FFN column j is off when the down projection's column j is all pruned, or an input row j is all
  pruned and its bias cannot make the unit nonzero (no bias, bias entry 0, or the gated LLaMA MLP,
  whose gate/up row of zeros gives exactly 0);
  head h is off when o's columns of the head are all pruned, or v's rows of the head (its KV group
  in GQA) are all pruned with no bias left (then the head outputs exactly 0). Pruned q or k rows
  alone do not turn a head off (it attends uniformly).
Everything else (scattered zeros, partial rows) is reported as giving no speedup.
"""
from __future__ import annotations

import torch

from ._arch import arch, parts


def _mask(lin):
    m = getattr(lin, "weight_mask", None)
    return None if m is None else m.detach() != 0


def _bias_zero(lin, idx_rows):
    """bool per row: the linear's bias is absent or exactly zero (after its own pruning mask)."""
    if lin.bias is None:
        return torch.ones(len(idx_rows), dtype=torch.bool)
    return lin.bias.detach()[idx_rows] == 0


def from_torch_prune(model):
    """(masks, report) from the weight_mask buffers torch.nn.utils.prune left on the model:
    masks = {"heads": [bool [H] or None per layer], "ffn": [bool [F] or None per layer]} for
    sparse_ops.set_masks (None: nothing off in that layer); report = {module name: what its mask
    gives} for every module that has a weight_mask."""
    a = arch(model, "from_torch_prune")
    names = {id(m): n for n, m in model.named_modules()}
    H, Hkv, dh = a.num_heads, a.num_kv_heads, a.head_dim
    heads, ffn, report = [], [], {}
    for layer in a.layers:
        pt = parts(a, layer)
        F = pt["ffn_out"].weight.shape[1]
        col_off = torch.zeros(F, dtype=torch.bool)
        mo = _mask(pt["ffn_out"])
        if mo is not None:
            col_off |= ~mo.any(0)
        gated = len(pt["ffn_in"]) > 1
        for lin in pt["ffn_in"]:
            mi = _mask(lin)
            if mi is not None:
                rows = ~mi.any(1)
                col_off |= rows if gated else rows & _bias_zero(lin, torch.arange(F))
        head_off = torch.zeros(H, dtype=torch.bool)
        mo = _mask(pt["o"])
        if mo is not None:
            head_off |= ~mo.reshape(mo.shape[0], H, dh).any(2).any(0)
        mv = _mask(pt["v"])
        if mv is not None:
            grp = ~mv.reshape(Hkv, dh, -1).any(2).any(1)
            grp &= _bias_zero(pt["v"], torch.arange(Hkv * dh)).reshape(Hkv, dh).all(1)
            head_off |= grp.repeat_interleave(H // Hkv)
        heads.append(~head_off if bool(head_off.any()) else None)
        ffn.append(~col_off if bool(col_off.any()) else None)
        units = {id(pt[k]): ("heads", head_off) for k in ("q", "k", "v", "o")}
        units[id(pt["ffn_out"])] = ("ffn", col_off)
        units.update({id(lin): ("ffn", col_off) for lin in pt["ffn_in"]})
        for lin in (pt["q"], pt["k"], pt["v"], pt["o"], *pt["ffn_in"], pt["ffn_out"]):
            m = _mask(lin)
            if m is None:
                continue
            zero = 1.0 - float(m.float().mean())
            kind, off = units.get(id(lin), (None, None))
            n_off = int(off.sum()) if off is not None else 0
            if n_off:
                unit = "heads" if kind == "heads" else "FFN columns"
                what = f"{n_off} of {off.numel()} {unit} off: skipped (a speedup)"
            else:
                what = "no whole unit off: no speedup (scattered zeros are still multiplied)"
            report[names[id(lin)]] = f"{zero:.0%} of weights pruned; {what}"
    for n, m in model.named_modules():
        if hasattr(m, "weight_mask") and n not in report:
            zero = 1.0 - float((m.weight_mask != 0).float().mean())
            report[n] = f"{zero:.0%} of weights pruned; not an attention or FFN projection: no speedup"
    return {"heads": heads, "ffn": ffn}, report
