"""Skip heads, FFN columns and (per sample) layers of a torch.nn.TransformerEncoder, and train through it.

    python examples/torch_encoder_masks.py
"""
import torch
from torch import nn

import sparse_ops

layer = nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True, norm_first=True)
enc = nn.TransformerEncoder(layer, num_layers=4)
x = torch.randn(16, 64, 256)
pad = torch.zeros(16, 64, dtype=torch.bool)
pad[:, 60:] = True                                  # the last 4 tokens of every sample are padding

sparse_ops.patch(enc)                               # same parameters, same state_dict
B, L, H, F = 16, 4, 8, 1024
sparse_ops.set_masks(enc,
                     heads=[torch.rand(B, H) < 0.5 for _ in range(L)],      # per (sample, head)
                     ffn=[torch.rand(F) < 0.5 for _ in range(L)],           # shared FFN columns
                     layers=torch.rand(B, L) < 0.75)                        # per (sample, layer)
out = enc(x, src_key_padding_mask=pad)
out.square().mean().backward()                      # gradients: only what ran contributes
print("what ran:", sparse_ops.stats(enc))
print("grad of layer 0's in_proj:", enc.layers[0].self_attn.in_proj_weight.grad.abs().sum().item())
sparse_ops.unpatch(enc)                             # back to plain torch.nn modules
