"""Inputs of the masked_head_attention tests (CPU and CUDA): q/k/v, head masks, attention masks.

Drawn on the CPU in float64 from a seeded generator, then cast and moved, so every device and
dtype sees the same values."""
import torch

D64 = torch.float64


def qkv(B, H, Tq, Tk, D, dtype=torch.float32, layout="bhtd", seed=0, grad=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for T in (Tq, Tk, Tk):
        if layout == "bthd":  # the layout a fused QKV projection gives
            t = torch.randn(B, T, H, D, generator=g, dtype=D64).to(dtype).to(device).transpose(1, 2)
        else:
            t = torch.randn(B, H, T, D, generator=g, dtype=D64).to(dtype).to(device)
        out.append(t.detach().requires_grad_(grad) if grad else t)
    return out


def head_masks(B, H, dtype, seed=0, device="cpu"):
    """Named head masks: random bool/float per sample and shared, all on, all off, one pair on."""
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(B, H, generator=g) > 0.5
    on[0, 0] = True
    on[-1, -1] = False
    shared = torch.rand(H, generator=g) > 0.4
    shared[0] = True
    gate = torch.rand(B, H, generator=g, dtype=D64) + 0.1
    single = torch.zeros(B, H, dtype=torch.bool)
    single[B - 1, H // 2] = True
    masks = {
        "bool_BH": on,
        "bool_H": shared,
        "float_BH": gate * on,
        "float_H": (torch.rand(H, generator=g, dtype=D64) + 0.1) * shared,
        "float_BH_nonzero": gate,
        "all_on": torch.ones(B, H, dtype=torch.bool),
        "all_off": torch.zeros(B, H, dtype=torch.bool),
        "single": single,
    }
    return {k: (m.to(dtype) if m.is_floating_point() else m).to(device) for k, m in masks.items()}


def attn_masks(B, H, Tq, Tk, dtype, seed=1, device="cpu"):
    """Named attention masks: none, key padding, full bool, float [Tq, Tk] and [H, 1, Tk]."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    for b in range(B):
        pad[b, ..., Tk - (b % 3):] = False  # key padding, at least one key kept
    full = torch.rand(B, H, Tq, Tk, generator=g) > 0.3
    full[..., 0] = True
    masks = {
        "none": None,
        "key_padding": pad,
        "bool_full": full,
        "float_TqTk": torch.randn(Tq, Tk, generator=g, dtype=D64).to(dtype),
        "float_H11Tk": torch.randn(H, 1, Tk, generator=g, dtype=D64).to(dtype),
    }
    return {k: (m.to(device) if m is not None else None) for k, m in masks.items()}


def check_off_pairs_untouched(mha, q, k, v, on, head_masks, **kw):
    """NaN planted in the q/k/v of the pairs `on` leaves off reaches neither mha's output nor any
    gradient (q/k/v/gate), for each head mask of head_masks (zero exactly where on is False)."""
    q, k, v = (t.detach().clone() for t in (q, k, v))
    for t in (q, k, v):
        t[~on] = float("nan")
    for hm in head_masks:
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        g = hm.clone().requires_grad_(hm.is_floating_point())
        out = mha(qq, kk, vv, g, **kw)
        assert torch.isfinite(out).all()
        assert (out[~on] == 0).all()
        out.sum().backward()
        for t in (qq, kk, vv):
            assert torch.isfinite(t.grad).all()
            assert (t.grad[~on] == 0).all()
        if g.requires_grad:
            assert torch.isfinite(g.grad).all() and (g.grad[~on] == 0).all()
