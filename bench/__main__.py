"""python -m bench [--ops ffn,layers,heads] [--device cpu|cuda] [--quick] [--json PATH] [--plot PATH]

Prints one row per case: dense, masked (mask-multiply) and sparse times (interleaved medians,
side by side in one process), speedup = dense_ms / sparse_ms and the ideal 1/keep (or the
case's own bound). See bench/README.md.
"""
from __future__ import annotations

import os

# Large tensors (weights) on 2 MB transparent huge pages, for dense and sparse alike: a
# gather-GEMV touches scattered rows, and with 4 KB pages every row costs a page walk.
# Measured (N=1, keep 0.25, weights streamed from DRAM): 0.55 ms -> 0.42 ms; dense 1.30 -> 1.22 ms.
# Read by torch's CPU allocator at its first allocation, so it is set before torch is imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import importlib
import sys
import time

import torch

from . import harness

# op family -> module with cases(device, quick); a new family is one line here.
FAMILIES = {
    "ffn": "bench.ffn",
    "layers": "bench.layers",
    "heads": "bench.heads",
    "models": "bench.models",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=None, help=f"comma-separated families: {','.join(FAMILIES)} "
                                               "(default: every implemented one)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="fewer rounds per row (< 3 min on 2 cores)")
    p.add_argument("--json", default=None, help="write one JSON object per row to PATH")
    p.add_argument("--plot", default=None, help="write a speedup-vs-keep PNG to PATH")
    p.add_argument("--markdown", default=None, help="write the rows as a Markdown table to PATH")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("python -m bench: --device cuda needs a CUDA device; none is visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.ops.split(",")] if args.ops else list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        print(f"python -m bench: unknown op family {unknown}; known: {list(FAMILIES)}", file=sys.stderr)
        return 2

    import sparse_ops
    info = sparse_ops.info()
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"sparse_ops {info['version']}  torch {info['torch']}  device {dev_name}  "
          f"threads {torch.get_num_threads()}  {'quick' if args.quick else 'full'}  "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")
    timer = harness.Timer(args.device, args.quick)
    rows = []

    def save():  # after every row, so a run cut short (a crash, gpu-check's time limit) keeps its rows
        if args.json:
            harness.write_json(rows, args.json)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(harness.markdown_table(rows) + "\n")

    save()
    t0 = time.time()
    for name in names:
        mod = importlib.import_module(FAMILIES[name])
        print(harness.header())
        grad_ctx = torch.enable_grad
        for case in mod.cases(args.device, args.quick):
            ctx = grad_ctx() if case.pop("train", False) else torch.inference_mode()
            with ctx:
                row = harness.run_case(case, timer)
            row["device_name"] = dev_name
            rows.append(row)
            print(harness.format_row(row), flush=True)
            save()
    print(f"{len(rows)} rows in {time.time() - t0:.0f} s")
    if args.plot and rows:
        harness.plot(rows, args.plot)
        root, ext = os.path.splitext(args.plot)
        if harness.plot_quality(rows, f"{root}_quality{ext or '.png'}"):
            print(f"quality vs speed: {root}_quality{ext or '.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
