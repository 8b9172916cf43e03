"""The registered backward ops are public (torch.ops.sparse_ops.*_backward, and their Triton
twins): they get the forward's saved tensors from the caller and must check them before they
index with them. Each bad call runs in its own Python process, so a crash (an out-of-bounds
read or write) fails its case, not the run; a case passes when the process ends with a Python
exception whose message names what is wrong, and fails on a signal or a silent success."""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

HEADS = """
import torch, sparse_ops
from sparse_ops.ops import registry
q, k, v = (torch.randn(2, 3, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3))
m = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
BACKEND = {backend!r}
if BACKEND == "cpp":
    fwd, bwd = torch.ops.sparse_ops.masked_head_attention, torch.ops.sparse_ops.masked_head_attention_backward
else:
    fwd, bwd = registry.triton_op("masked_head_attention"), registry.triton_op("masked_head_attention_backward")
out, pairs, out_c, lse = fwd(q, k, v, m, None, False, None, False)
g = torch.ones_like(out)
args = dict(pairs=pairs, out=out, out_c=out_c, lse=lse, head_mask=m)
{change}
bwd(g, q, k, v, args["head_mask"], None, args["pairs"], args["out"], args["out_c"], args["lse"], False, None, False,
    [True, True, True, False])
print("NO ERROR")
"""

FFN = """
import torch, sparse_ops
from sparse_ops.ops import registry
gen = torch.Generator().manual_seed(0)
x = torch.randn(5, 8, dtype=torch.float64, generator=gen)
w1 = torch.randn(12, 8, dtype=torch.float64, generator=gen)
w2 = torch.randn(8, 12, dtype=torch.float64, generator=gen)
active = torch.tensor([1, 4, 9])
BACKEND = {backend!r}
if BACKEND == "cpp":
    fwd, bwd = torch.ops.sparse_ops.gated_ffn, torch.ops.sparse_ops.gated_ffn_backward
else:
    fwd, bwd = registry.triton_op("gated_ffn"), registry.triton_op("gated_ffn_backward")
out, idx, pre, up, row_mask, row_group = fwd(x, w1, w2, None, None, None, active, None, "gelu", False, False)
args = dict(idx=idx, pre=pre, active=active, row_mask=row_mask, row_group=row_group, x=x)
{change}
bwd(torch.ones_like(out), args["x"], w1, w2, None, None, args["active"], None, args["idx"], args["pre"], up,
    args["row_mask"], args["row_group"], "gelu", False, False, [True, True, False])
print("NO ERROR")
"""

ROWS = """
import torch, sparse_ops
from sparse_ops.ops import registry
x = torch.randn(7, 3, dtype=torch.float64)
src = torch.randn(3, 3, dtype=torch.float64)
args = dict(idx=torch.tensor([4, -1, 0]), grad=torch.ones(7, 3, dtype=torch.float64))
BACKEND = {backend!r}
bwd = torch.ops.sparse_ops.scatter_rows_backward if BACKEND == "cpp" else registry.triton_op("scatter_rows_backward")
{change}
bwd(args["grad"], x, args["idx"], src, None, [True, True, False])
print("NO ERROR")
"""

CASES = {
    # the reproducer: pairs past B * H (reads and writes past the heap before the check)
    "heads pairs 10**12": (HEADS, 'args["pairs"] = torch.tensor([0, 2, 10**12])', r"pairs must be the sorted running"),
    "heads pairs negative": (HEADS, 'args["pairs"] = torch.tensor([-5, 2, 4])', "pairs must be the sorted running"),
    "heads pairs repeated": (HEADS, 'args["pairs"] = torch.tensor([0, 0, 4])', "pairs must be the sorted running"),
    "heads pairs of another mask": (HEADS, 'args["pairs"] = torch.tensor([0, 1, 4])', "pairs must be the sorted running"),
    "heads pairs too many": (HEADS, 'args["pairs"] = torch.arange(7)', "pairs must"),
    "heads lse short": (HEADS, 'args["lse"] = args["lse"][:1]', "lse must be"),
    "heads out wrong shape": (HEADS, 'args["out"] = args["out"][:, :1]', ": out must be"),
    "ffn idx out of range": (FFN, 'args["idx"] = torch.tensor([1, 4, 10**9])', "idx must"),
    "ffn idx negative": (FFN, 'args["idx"] = torch.tensor([-3, 4, 9])', "idx must"),
    "ffn idx repeated": (FFN, 'args["idx"] = torch.tensor([1, 4, 4])', "idx must"),
    "ffn idx of other columns": (FFN, 'args["idx"] = torch.tensor([1, 4, 10])', "idx must"),
    "ffn row_mask short": (FFN, 'args["active"] = torch.rand(5, 12, generator=torch.Generator().manual_seed(1)) > 0.5\n'
                                'args["row_mask"] = torch.ones(2, 3, dtype=torch.bool)\n'
                                'args["row_group"] = torch.full((5,), -1)', "row_mask must be|idx must be the sorted"),
    # The reproducer: a per-row mask of fewer rows than x (the row grouping read past it).
    # A copy, so that under ASan the rows it lacks lie outside its allocation.
    "ffn row_mask fewer rows than x": (FFN, 'args["active"] = torch.rand(5, 12, generator=torch.Generator().manual_seed(1)) > 0.5\n'
                                           '_, args["idx"], args["pre"], up, rm, args["row_group"] = fwd(\n'
                                           '    x, w1, w2, None, None, None, args["active"], None, "gelu", False, False)\n'
                                           'args["row_mask"] = rm[:2].clone()', "row_mask must be"),
    "rows idx out of range": (ROWS, 'args["idx"] = torch.tensor([4, -1, 10**9])', "idx must be in"),
    "rows idx repeated": (ROWS, 'args["idx"] = torch.tensor([4, 4, 0])', "must not repeat a row"),
    "rows grad dtype": (ROWS, 'args["grad"] = args["grad"].float()', "grad must"),
}


def _run(code):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_raw_backward_refuses_bad_saved_tensors(case, backend):
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    template, change, message = CASES[case]
    r = _run(textwrap.dedent(template).format(backend=backend, change=change))
    assert r.returncode == 1, f"exit {r.returncode} (a negative one is a signal: a crash)\n{r.stdout}\n{r.stderr[-3000:]}"
    assert "NO ERROR" not in r.stdout
    assert re.search(message, r.stderr), r.stderr[-3000:]
    assert "Error" in r.stderr.splitlines()[-1], r.stderr[-3000:]


def test_unchanged_saved_tensors_still_pass():
    """The templates themselves run cleanly when nothing is changed (so each case above fails
    because of its one change)."""
    for template in (HEADS, FFN, ROWS):
        r = _run(textwrap.dedent(template).format(backend="cpp", change="pass"))
        assert r.returncode == 0 and "NO ERROR" in r.stdout, r.stderr[-3000:]


def test_nan_in_keys_of_running_pairs():
    """NaN in k (float32, some heads off) goes through the CPU kernel's exp (no float -> int
    conversion of NaN, which is undefined behaviour) and gives what the reference gives."""
    import sparse_ops
    from sparse_ops import reference as R
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 16, generator=g) for _ in range(3))
    k[0, 0, 5, 3] = float("nan")
    m = torch.tensor([[True, False, True], [False, True, True]])
    out = sparse_ops.masked_head_attention(q, k, v, m, backend="cpp")
    ref = R.masked_head_attention(q, k, v, m)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.isnan(out[0, 0]).any() and torch.isfinite(out[1]).all()
