"""sparse_ops.patching.layer_dropout: LayerDrop over a patched model (per sample or per batch,
probabilities scaled by depth, p = 1, a generator for reproducible drops, nothing dropped in
eval), against the same drops given as a layers mask."""
from __future__ import annotations

import math

import pytest
import torch

import sparse_ops
from sparse_ops.patching import layer_dropout

transformers = pytest.importorskip("transformers")

L = 4


def small_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg)


def small_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=40, num_hidden_layers=L,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def run(model, ids):
    out = model(input_ids=ids)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@pytest.mark.parametrize("scaling,expected", [
    ("uniform", [0.4] * 4), ("linear", [0.0, 0.4 / 3, 0.8 / 3, 0.4]),
    ("exp", [0.4 * (2 ** (i / 3) - 1) for i in range(4)]),
    ("log", [0.4 * math.log(i + 1) / math.log(4) for i in range(4)]),
    ("sin", [0.4 * math.sin(math.pi / 2 * i / 3) for i in range(4)])])
def test_probabilities_scale_with_depth(scaling, expected):
    m = sparse_ops.patch(small_bert())
    assert layer_dropout(m, 0.4, scaling=scaling) == pytest.approx(expected)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("per_sample", [True, False])
def test_drops_equal_the_same_layers_mask_and_are_reproducible(family, per_sample):
    make = small_bert if family == "bert" else small_llama
    B = 6
    ids = torch.randint(5, 100, (B, 9), generator=torch.Generator().manual_seed(0))
    a = sparse_ops.patch(make()).train()
    probs = layer_dropout(a, 0.5, scaling="linear", per_sample=per_sample, generator=torch.Generator().manual_seed(7))
    out = run(a, ids)
    st = sparse_ops.stats(a)
    # The same draws, in the order the layers make them (a layer with p = 0 draws nothing), as a
    # layers mask on a twin in eval mode.
    g = torch.Generator().manual_seed(7)
    keep = torch.stack([(torch.rand(B if per_sample else 1, generator=g) >= q).expand(B) if q > 0
                        else torch.ones(B, dtype=torch.bool) for q in probs], 1)
    b = sparse_ops.patch(make()).eval()
    sparse_ops.set_masks(b, layers=keep)
    with torch.no_grad():
        ref = run(b, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert st["layers"] == pytest.approx(keep.float().mean().item())
    assert 0 < keep.sum() < keep.numel()  # the seed drops some, not all
    # Reproducible with the same generator seed; nothing dropped in eval.
    layer_dropout(a, 0.5, scaling="linear", per_sample=per_sample, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(run(a, ids), out, rtol=0, atol=0)
    a.eval()
    with torch.no_grad():
        run(a, ids)
    assert sparse_ops.stats(a)["layers"] == 1.0


def test_p_one_skips_every_layer_and_still_gives_zero_gradients():
    m = sparse_ops.patch(small_bert()).train()
    layer_dropout(m, 1.0)
    ids = torch.randint(5, 100, (3, 7))
    out = run(m, ids)
    assert sparse_ops.stats(m)["layers"] == 0.0
    out.square().sum().backward()
    for n, p in m.named_parameters():
        if ".layer." in n:
            assert p.grad is not None and not p.grad.any(), n  # zero, not None: DDP without find_unused
    layer_dropout(m, None)
    run(m, ids)
    assert sparse_ops.stats(m)["layers"] == 1.0


def test_layer_dropout_errors():
    m = sparse_ops.patch(small_bert())
    with pytest.raises(ValueError, match="p must be a probability"):
        layer_dropout(m, 1.5)
    with pytest.raises(ValueError, match="scaling must be one of"):
        layer_dropout(m, 0.1, scaling="cubic")
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        layer_dropout(m, 0.1, generator=3)
    with pytest.raises(TypeError, match="not patched"):
        layer_dropout(small_bert(), 0.1)
    with pytest.raises(ValueError, match="layers=False"):
        layer_dropout(sparse_ops.patch(small_bert(), layers=False), 0.1)
