"""sparse_ops.pruning.from_torch_prune: the weight_mask buffers torch.nn.utils.prune leaves, read as
unit masks. Whole pruned units must give the same outputs through our ops (patch + set_masks) as
the torch-pruned model's own mask multiplication; scattered zeros must be reported as no speedup."""
from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as tprune

import sparse_ops
from sparse_ops.pruning import from_torch_prune

transformers = pytest.importorskip("transformers")


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, initializer_range=0.1)
    return transformers.BertModel(cfg).eval()


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def out(model, ids):
    with torch.no_grad():
        o = model(ids)
    return o.last_hidden_state if hasattr(o, "last_hidden_state") else o.logits


def through_ops(m, masks):
    """The torch-pruned model, its masks made permanent (in place: a torch-pruned model cannot be
    deep-copied), patched, with the unit masks set."""
    for mod in m.modules():
        if hasattr(mod, "weight_mask"):
            tprune.remove(mod, "weight")
    sparse_ops.patch(m)
    sparse_ops.set_masks(m, **masks)
    return m


def test_ln_structured_ffn_columns_and_heads_bert():
    m = bert()
    ids = torch.randint(0, 100, (2, 7))
    l0 = m.encoder.layer[0]
    tprune.ln_structured(l0.output.dense, "weight", amount=0.5, n=2, dim=1)           # 24 FFN columns
    head2 = torch.ones_like(l0.attention.output.dense.weight)
    head2[:, 16:24] = 0                                                                # head 2's o columns
    tprune.custom_from_mask(l0.attention.output.dense, "weight", head2)
    tprune.random_unstructured(m.encoder.layer[1].intermediate.dense, "weight", amount=0.3)
    masks, report = from_torch_prune(m)
    assert int((~masks["ffn"][0]).sum()) == 24 and masks["ffn"][1] is None
    assert masks["heads"][0].tolist() == [True, True, False, True] and masks["heads"][1] is None
    assert "24 of 48 FFN columns off" in report["encoder.layer.0.output.dense"]
    assert "no speedup" in report["encoder.layer.1.intermediate.dense"]
    ref = out(m, ids)
    m2 = through_ops(m, masks)
    torch.testing.assert_close(out(m2, ids), ref, rtol=0, atol=1e-5)
    assert sparse_ops.stats(m2)["ffn"] == pytest.approx((24 + 48) / 96)


def test_bert_input_row_with_bias_is_not_off():
    """A zero input row of intermediate.dense still has GELU(bias) flowing out: not an off column."""
    m = bert()
    dense_in = m.encoder.layer[0].intermediate.dense
    mask = torch.ones_like(dense_in.weight)
    mask[:5] = 0
    tprune.custom_from_mask(dense_in, "weight", mask)
    with torch.no_grad():
        dense_in.bias[:5] = 0.5              # (BERT initialises biases to 0)
    masks, report = from_torch_prune(m)
    assert masks["ffn"][0] is None
    with torch.no_grad():
        dense_in.bias[:5] = 0
    masks, _ = from_torch_prune(m)
    assert int((~masks["ffn"][0]).sum()) == 5
    ids = torch.randint(0, 100, (2, 7))
    ref = out(m, ids)
    torch.testing.assert_close(out(through_ops(m, masks), ids), ref, rtol=0, atol=1e-5)


def test_llama_gqa_value_group_and_gate_rows():
    m = llama()
    ids = torch.randint(0, 100, (2, 7))
    a = m.model.layers[1].self_attn
    dh = a.head_dim
    vm = torch.ones_like(a.v_proj.weight)
    vm[dh:2 * dh] = 0                                     # KV group 1: query heads 3, 4, 5 off
    tprune.custom_from_mask(a.v_proj, "weight", vm)
    tprune.ln_structured(m.model.layers[0].mlp.gate_proj, "weight", amount=0.25, n=1, dim=0)   # 10 rows
    tprune.l1_unstructured(m.model.layers[0].self_attn.q_proj, "weight", amount=0.5)
    masks, report = from_torch_prune(m)
    assert masks["heads"][1].tolist() == [True, True, True, False, False, False]
    assert masks["heads"][0] is None
    assert int((~masks["ffn"][0]).sum()) == 10
    assert "no speedup" in report["model.layers.0.self_attn.q_proj"]
    ref = out(m, ids)
    torch.testing.assert_close(out(through_ops(m, masks), ids), ref, rtol=0, atol=1e-5)


def test_global_unstructured_gives_no_unit_masks():
    m = bert()
    params = [(layer.intermediate.dense, "weight") for layer in m.encoder.layer]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=0.4)
    masks, report = from_torch_prune(m)
    assert all(x is None for x in masks["ffn"]) and all(x is None for x in masks["heads"])
    assert len(report) == 2 and all("no speedup" in v for v in report.values())


def test_other_modules_reported_and_errors():
    m = bert()
    tprune.random_unstructured(m.pooler.dense, "weight", amount=0.2)
    _, report = from_torch_prune(m)
    assert "not an attention or FFN projection" in report["pooler.dense"]
    with pytest.raises(TypeError, match="Sequential"):
        from_torch_prune(torch.nn.Sequential(torch.nn.Linear(3, 3)))
