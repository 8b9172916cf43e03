"""Skip heads and FFN columns of GPT-2 (a small random configuration: no pretrained GPT-2 is installable here).

    pip install transformers
    python examples/gpt2_masks.py
"""
import torch
import transformers

import sparse_ops

torch.manual_seed(0)
cfg = transformers.GPT2Config(n_embd=256, n_layer=4, n_head=8, n_positions=128)
model = transformers.GPT2LMHeadModel(cfg).eval()
ids = torch.randint(0, cfg.vocab_size, (2, 16))
with torch.no_grad():
    ref = model(input_ids=ids).logits

sparse_ops.patch(model)                 # Conv1D weights read in place; c_proj is already the decode-fast layout
H, F = cfg.n_head, 4 * cfg.n_embd
sparse_ops.set_masks(model, heads=[torch.arange(H) < H // 2] * cfg.n_layer, ffn=[torch.arange(F) % 2 == 0] * cfg.n_layer)
with torch.no_grad():
    out = model(input_ids=ids).logits
print("what ran:", sparse_ops.stats(model))
sparse_ops.clear_masks(model)
with torch.no_grad():
    torch.testing.assert_close(model(input_ids=ids).logits, ref)   # all on: the model as it was
print(model.generate(ids[:1], max_new_tokens=8, do_sample=False))
