"""python -m bench.ab REV [--ops ffn,heads,layers] [--match TEXT] [--rounds N] [--json PATH]

Every bench row of this checkout against the same row of git revision REV, in one process, call by
call. REV's tree is copied under .ab/<tag>/ with its names moved (package sparse_ops ->
sparse_ops_<tag>, its ops registered as torch.ops.sparse_ops_<tag>.*, bench -> bench_<tag>) and
built there once, so both builds load side by side. For each row, this tree's sparse callable and
REV's are timed interleaved by bench.harness.Timer (rotating order, medians), each after its own
case's dense callable, so the machine's drift, which moves separate processes 10-20% here, and a
call's neighbour fall on both alike. Rows are matched by (op, case, shape, keep); rows only one side has are
counted and skipped. The CPU rows only (the renamed build is a CPU build).

Columns: dense (this tree's case), old and new sparse ms; each build's speedup over dense; new/old = old_ms / new_ms
(above 1: this tree is faster).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("ffn", "heads", "layers", "models")


def _renamed_copy(src: str, dst: str, tag: str) -> None:
    """src (a source tree) copied to dst with sparse_ops -> sparse_ops_<tag>, bench -> bench_<tag>."""
    pkg, bench = f"sparse_ops_{tag}", f"bench_{tag}"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tests", "examples", ".git", "*.so", "build"))
    os.rename(os.path.join(dst, "sparse_ops"), os.path.join(dst, pkg))
    os.rename(os.path.join(dst, "bench"), os.path.join(dst, bench))
    for root, _, files in os.walk(dst):
        for f in files:
            if not f.endswith((".py", ".cpp", ".h", ".cu", ".cuh")):
                continue
            path = os.path.join(root, f)
            with open(path) as fh:
                text = fh.read()
            new = re.sub(r"\bsparse_ops\b", pkg, text)  # Python names, C++ namespace, op library, strings
            new = re.sub(r"(?<![\w.])bench(?=\.\w)", bench, new)  # module paths: bench.ffn, "bench.heads"
            new = re.sub(r"\b(from|import) bench\b", rf"\1 {bench}", new)
            new = new.replace('"bench"', f'"{bench}"')
            if new != text:
                with open(path, "w") as fh:
                    fh.write(new)


def build_old(rev: str) -> tuple[str, str]:
    """(directory to put on sys.path, tag): REV renamed and built under .ab/<tag>/ (reused when built)."""
    sha = subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short=10", rev], text=True).strip()
    tag = f"r{sha}"
    tree = os.path.join(ROOT, ".ab", tag)
    pkg = os.path.join(tree, f"sparse_ops_{tag}")
    if os.path.isdir(pkg) and any(f.startswith("_C") and f.endswith(".so") for f in os.listdir(pkg)):
        return tree, tag
    shutil.rmtree(tree, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, "src.tar")
        subprocess.check_call(["git", "-C", ROOT, "archive", "-o", archive, sha])
        src = os.path.join(tmp, "src")
        with tarfile.open(archive) as t:
            t.extractall(src, filter="data")
        _renamed_copy(src, tree, tag)
    print(f"building {rev} ({sha}) as sparse_ops_{tag} in {tree} ...", flush=True)
    env = dict(os.environ, CFLAGS=os.environ.get("CFLAGS", "-g0"), FORCE_CUDA="0")
    log = os.path.join(tree, "build.log")
    with open(log, "w") as fh:
        rc = subprocess.call([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                             stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"python -m bench.ab: building {rev} failed; see {log}")
    return tree, tag


def _key(case: dict) -> tuple:
    return case["op"], case["case"], case.get("shape"), case.get("keep")


def compare(tag: str, families, timer, match: str = "", out=print) -> tuple[list[dict], int]:
    """Rows of both builds, matched and timed; (rows, count of rows one side lacks)."""
    import torch
    rows, unmatched = [], 0
    for fam in families:
        try:
            new_mod = importlib.import_module(f"bench.{fam}")
            old_mod = importlib.import_module(f"bench_{tag}.{fam}")
        except ModuleNotFoundError as e:
            out(f"{fam}: skipped ({e})")
            continue
        old_iter = old_mod.cases("cpu", False)
        pending = {}
        for nc in new_mod.cases("cpu", False):
            k = _key(nc)
            while k not in pending:
                oc = next(old_iter, None)
                if oc is None:
                    break
                pending[_key(oc)] = oc
            oc = pending.pop(k, None)
            if oc is None:
                unmatched += 1
                continue
            if match and match not in " ".join(map(str, k)):
                continue
            train = nc.pop("train", False)
            oc.pop("train", None)
            for c in (nc, oc):  # a wrong result must not report a time
                if c.get("check"):
                    c["check"]()
            # Each build's sparse call right after its own case's dense call, as in python -m bench: a
            # call's speed depends on its neighbour (the OpenMP pool's state) and on what the cache
            # holds (a case cycles its own weight sets, and its dense call flushes them).
            fns = {"dense": nc["fns"]["dense"], "new": nc["fns"]["sparse"], "dense_old": oc["fns"]["dense"],
                   "old": oc["fns"]["sparse"]}
            with (torch.enable_grad() if train else torch.inference_mode()):
                med = timer.measure(fns)
            r = {"op": k[0], "case": k[1], "shape": k[2], "keep": k[3], "rounds": med["rounds"],
                 "dense_ms": round(med["dense"], 4), "old_ms": round(med["old"], 4), "new_ms": round(med["new"], 4),
                 "speedup_old": round(med["dense"] / med["old"], 3), "speedup_new": round(med["dense"] / med["new"], 3),
                 "new_over_old": round(med["old"] / med["new"], 3)}
            rows.append(r)
            out(f"{r['op']:6} {r['case'][:40]:40} {str(r['shape'])[:26]:26} {r['keep']:>5} "
                f"{r['dense_ms']:10.3f} {r['old_ms']:10.3f} {r['new_ms']:10.3f} "
                f"{r['speedup_old']:7.2f}x {r['speedup_new']:7.2f}x {r['new_over_old']:8.3f}")
        unmatched += len(pending)
    return rows, unmatched


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    p.add_argument("rev", help="git revision to compare against (built once under .ab/)")
    p.add_argument("--ops", default="ffn,heads,layers", help=f"comma-separated families ({','.join(FAMILIES)})")
    p.add_argument("--match", default="", help="only rows whose op/case/shape/keep contain this text")
    p.add_argument("--rounds", type=int, default=60, help="most rounds per row (default 60)")
    p.add_argument("--budget", type=float, default=4.0, help="seconds per row before stopping at --rounds")
    p.add_argument("--json", default=None, help="write one JSON object per row to PATH")
    args = p.parse_args(argv)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as python -m bench: before torch allocates
    tree, tag = build_old(args.rev)
    sys.path.insert(0, tree)
    sys.path.insert(0, ROOT)
    from . import harness
    timer = harness.Timer("cpu", False)
    timer.max_rounds, timer.budget_s = args.rounds, args.budget
    print(f"{'op':6} {'case':40} {'shape':26} {'keep':>5} {'dense ms':>10} {'old ms':>10} {'new ms':>10} "
          f"{'old x':>8} {'new x':>8} {'new/old':>8}   (old = {args.rev}, sparse_ops_{tag})")
    rows, unmatched = compare(tag, args.ops.split(","), timer, args.match)
    print(f"{len(rows)} rows compared; {unmatched} rows only one build has, skipped")
    if args.json:
        with open(args.json, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
