"""A/B of SparseMultiheadAttention against an older copy of its module file, in one process.

python -m bench.ab_mha --before /path/to/old/sparse_ops/nn/attention.py [--threads 2]
                       [--rounds-fwd 40] [--rounds-train 16] [--cases "all on,shared keep 0.5"]

The old file is loaded as the module sparse_ops.nn._before_attention, so its relative imports
(..gates, ..ops.heads) resolve to this package; an old file whose measured paths call only torch
(F.linear, bmm, F.scaled_dot_product_attention, as at b31d13d) then runs exactly its old code.
Both modules are made with from_module of one nn.MultiheadAttention (B=8, T=256, E=768, H=12,
fp32, self-attention, need_weights=False). Each case first checks that the new output (and, in
training, every gradient) equals the old one, then times old, new and old again (the A/A) call
by call in rotating order (bench/README.md, "Measuring a kernel change on this VM"): forward in
eval under torch.inference_mode, forward+backward in training. Reported per case: medians, and
the median over rounds of old/new of the calls of one round (paired, adjacent in time), the
same for the A/A, and the paired ratio of CPU time (with --threads 1 the thread's own CPU time,
which being descheduled on a loaded machine does not inflate; else the process's, both threads
and their spin-waits). Per-sample masks have exactly round(keep * H) heads on in every sample
(one group), except "Bernoulli 0.5" (several groups).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as python -m bench does

import torch  # noqa: E402
from torch import nn  # noqa: E402

B, T, E, H = 8, 256, 768, 12


def load_old(path):
    import sparse_ops.nn  # noqa: F401  (the package the old file's relative imports resolve in)
    spec = importlib.util.spec_from_file_location("sparse_ops.nn._before_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SparseMultiheadAttention


def masks(g):
    def per_sample(keep):
        m = torch.zeros(B, H, dtype=torch.bool)
        for b in range(B):
            m[b, torch.randperm(H, generator=g)[:round(keep * H)]] = True
        return m
    shared = torch.zeros(H, dtype=torch.bool)
    shared[torch.randperm(H, generator=g)[:H // 2]] = True
    return {"all on": None, "shared keep 0.5": shared, "per-sample keep 0.5": per_sample(0.5),
            "per-sample keep 0.25": per_sample(0.25), "Bernoulli 0.5": torch.rand(B, H, generator=g) < 0.5}


def timed(fns, n, cpu_clock):
    for f in fns.values():
        f()
        f()
    names = list(fns)
    ts = {k: [] for k in names}
    cs = {k: [] for k in names}
    for r in range(n):
        for k in names[r % len(names):] + names[:r % len(names)]:
            c0, t0 = cpu_clock(), time.perf_counter()
            fns[k]()
            ts[k].append((time.perf_counter() - t0) * 1e3)
            cs[k].append((cpu_clock() - c0) * 1e3)

    def paired(d, a, b):
        return statistics.median(x / y for x, y in zip(d[a], d[b]))
    return {"old_ms": statistics.median(ts["old"]), "new_ms": statistics.median(ts["new"]),
            "old/new": paired(ts, "old", "new"), "A/A": paired(ts, "old", "old2"),
            "cpu old/new": paired(cs, "old", "new"), "cpu A/A": paired(cs, "old", "old2")}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.ab_mha", description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the old sparse_ops/nn/attention.py")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds-fwd", type=int, default=40)
    p.add_argument("--rounds-train", type=int, default=16)
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu_clock = time.thread_time if args.threads == 1 else time.process_time

    from sparse_ops.nn import SparseMultiheadAttention as New
    Old = load_old(args.before)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    old, new = Old.from_module(mha), New.from_module(mha)
    x = torch.randn(B, T, E, generator=g)
    go = torch.randn(B, T, E, generator=g)
    cases = masks(g)
    only = None if args.cases is None else set(args.cases.split(","))
    print(f"B={B} T={T} E={E} H={H} fp32 threads={args.threads}; old: {args.before}")
    print(f"{'mode':8s} {'case':21s} {'old ms':>8s} {'new ms':>8s} {'old/new':>8s} {'A/A':>6s} "
          f"{'cpu old/new':>11s} {'cpu A/A':>7s}")
    for train in (False, True):
        for name, m in cases.items():
            if only and name not in only:
                continue
            old.train(train)
            new.train(train)
            if train:
                xs = {"old": x.clone().requires_grad_(), "new": x.clone().requires_grad_()}
                got = {}
                for k, mod in (("old", old), ("new", new)):
                    for q in mod.parameters():
                        q.grad = None
                    out = mod(xs[k], xs[k], xs[k], need_weights=False, head_mask=m)[0]
                    out.backward(go)
                    got[k] = [out.detach(), xs[k].grad] + [q.grad for _, q in sorted(mod.named_parameters())]
                for a, b in zip(got["old"], got["new"]):
                    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)

                def step(mod, xx):
                    ps = list(mod.parameters())

                    def f():
                        for q in ps:
                            q.grad = None
                        xx.grad = None
                        mod(xx, xx, xx, need_weights=False, head_mask=m)[0].backward(go)
                    return f
                fns = {"old": step(old, xs["old"]), "new": step(new, xs["new"]), "old2": step(old, xs["old"])}
                n = args.rounds_train
            else:
                def fwd(mod):
                    def f():
                        with torch.inference_mode():
                            return mod(x, x, x, need_weights=False, head_mask=m)[0]
                    return f
                torch.testing.assert_close(fwd(new)(), fwd(old)(), rtol=1e-4, atol=1e-4)
                fns = {"old": fwd(old), "new": fwd(new), "old2": fwd(old)}
                n = args.rounds_fwd
            r = timed(fns, n, cpu_clock)
            print(f"{'fwd+bwd' if train else 'fwd':8s} {name:21s} {r['old_ms']:8.2f} {r['new_ms']:8.2f} "
                  f"{r['old/new']:8.3f} {r['A/A']:6.3f} {r['cpu old/new']:11.3f} {r['cpu A/A']:7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
