"""Timing, rows, table, JSON and plot for `python -m bench`.

A case is a dict with the fields of a result row (op, case, dtype, shape, keep, ideal, ...)
and `fns`: name -> zero-argument callable, with at least "dense", "masked" and "sparse";
extra names become `<name>_ms` baseline columns. The callables of one case are timed
interleaved: every round runs each once, in rotating order, after a warm-up, and the row
reports the median per callable. So dense and sparse see the same machine state and their
ratio is side by side in one process, which on a noisy 2-core VM matters more than any
single number. `check` (optional) runs once, outside the timed region, and raises if the
sparse result is wrong, so a broken kernel cannot report a fast number.
"""
from __future__ import annotations

import json
import statistics
import time

import torch


class Timer:
    def __init__(self, device: str, quick: bool):
        self.device = device
        self.quick = quick
        # per row: at least min_rounds rounds, and rounds until budget_s is spent (capped)
        self.min_rounds = 3 if quick else 9
        self.max_rounds = 15 if quick else 60
        self.budget_s = 0.6 if quick else 2.5

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _time_one(self, fn) -> float:
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def measure(self, fns: dict) -> dict:
        names = list(fns)
        for name in names:  # warm-up (allocator, caches, lazy init)
            fns[name]()
            fns[name]()
        self._sync()
        times = {n: [] for n in names}
        t_start = time.perf_counter()
        r = 0
        while r < self.min_rounds or (r < self.max_rounds and time.perf_counter() - t_start < self.budget_s):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                times[n].append(self._time_one(fns[n]))
            r += 1
        return {n: statistics.median(v) for n, v in times.items()} | {"rounds": r}


def run_case(case: dict, timer: Timer) -> dict:
    fns = case.pop("fns")
    check = case.pop("check", None)
    if check is not None:
        check()
    med = timer.measure(fns)
    row = dict(case)
    row["rounds"] = med.pop("rounds")
    for name, ms in med.items():
        row[f"{name}_ms"] = round(ms, 4)
    row["speedup"] = round(row["dense_ms"] / row["sparse_ms"], 3)
    row["masked_speedup"] = round(row["dense_ms"] / row["masked_ms"], 3)
    row["vs_masked"] = round(row["masked_ms"] / row["sparse_ms"], 3)  # sparse_ops against masking by multiplication
    row.setdefault("ideal", round(1.0 / row["keep"], 3) if row["keep"] > 0 else float("inf"))
    row["ratio_to_ideal"] = round(row["speedup"] / row["ideal"], 3)
    if row.get("bytes"):  # the weight bytes the sparse path must read: the bandwidth it reached
        row["sparse_GBps"] = round(row["bytes"] / row["sparse_ms"] / 1e6, 1)
    return row


COLUMNS = [("op", 6), ("case", 30), ("shape", 22), ("keep", 5), ("dense_ms", 9), ("masked_ms", 9),
           ("sparse_ms", 9), ("speedup", 7), ("ideal", 6), ("extra", 28)]


def _extra(row: dict) -> str:
    base = {"dense_ms", "masked_ms", "sparse_ms"}
    parts = [f"vs masked {row['masked_ms'] / row['sparse_ms']:.2f}x"] if row.get("masked_ms") else []
    parts += [f"{k[:-3]} {row[k]:.3g}ms ({row['dense_ms'] / row[k]:.2f}x)"
              for k in row if k.endswith("_ms") and k not in base]
    if row.get("sparse_GBps"):
        parts.append(f"sparse reads {row['sparse_GBps']:.0f} GB/s")
    if row.get("note"):  # a baseline that could not run here, and why
        parts.append(str(row["note"]))
    return "; ".join(parts)


def format_row(row: dict) -> str:
    cells = []
    for name, width in COLUMNS:
        v = _extra(row) if name == "extra" else row.get(name, "")
        if isinstance(v, float):
            v = f"{v:.3f}" if name.endswith("_ms") else f"{v:.2f}"
        cells.append(str(v).ljust(width))
    return " ".join(cells)


def header() -> str:
    return " ".join(n.ljust(w) for n, w in COLUMNS)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (for the README)."""
    out = ["| op | case | shape | keep | dense ms | masked ms | sparse ms | speedup | ideal | baselines |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['op']} | {r['case']} | {r['shape']} | {r['keep']} | {r['dense_ms']:.3f} | "
                   f"{r['masked_ms']:.3f} | {r['sparse_ms']:.3f} | **{r['speedup']:.2f}x** | "
                   f"{r['ideal']:.2f} | {_extra(r)} |")
    return "\n".join(out)


def write_json(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_case = {}
    for r in rows:
        by_case.setdefault((r["op"], r["case"]), []).append(r)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for (op, case), rs in by_case.items():
        rs = sorted(rs, key=lambda r: r["keep"])
        if len(rs) < 2:
            continue
        ax.plot([r["keep"] for r in rs], [r["speedup"] for r in rs], marker="o", label=f"{op}: {case}")
    ks = sorted({r["keep"] for r in rows if r["keep"] > 0})
    if ks:
        ax.plot(ks, [1 / k for k in ks], "k--", label="ideal 1/keep")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("keep (fraction of units computed)")
    ax.set_ylabel("speedup over dense")
    dev = rows[0]["device"] if rows else ""
    ax.set_title(f"sparse_ops speedup vs dense ({dev})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_quality(rows: list[dict], path: str) -> bool:
    """Quality vs speedup of the rows that carry a quality (pruning and router rows: one panel per metric,
    the dense model as the reference point). Returns False when no row has one."""
    rows = [r for r in rows if r.get("quality")]
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({r["quality"]["metric"] for r in rows})
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rs = [r for r in rows if r["quality"]["metric"] == metric]
        ax.scatter([1.0], [rs[0]["quality"]["dense"]], marker="*", s=160, color="k", label="dense")
        for r in rs:
            ax.scatter([r["speedup"]], [r["quality"]["value"]], s=50, label=f"{r['case']} ({r['shape'].split()[0]})")
        ax.set_xlabel("speedup over dense (measured)")
        ax.set_ylabel(metric + (" (lower is better)" if metric == "perplexity" else " to dense (higher is better)"))
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    dev = rows[0].get("device", "")
    fig.suptitle(f"sparse_ops: quality vs speed ({dev})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
