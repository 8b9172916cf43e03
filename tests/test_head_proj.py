"""sparse_ops.ops.head_proj: the shared and grouped head projections equal their dense
formulas (forward, gradients, gradcheck), give exact-zero gradients to blocks / heads no sample
uses, and refuse bad arguments (out-of-range ids, a sample in two groups) with errors naming
them; sparse_ops/ops imports nothing from sparse_ops/nn."""
import ast
import pathlib

import pytest
import torch

from sparse_ops.ops.head_proj import grouped_head_in_proj, grouped_head_out_proj, head_in_proj, head_out_proj

F64 = torch.float64
B, T, E_IN, N, D, E = 4, 3, 6, 5, 2, 7  # N blocks of D rows; out-projection: H = N heads of D columns


def data(dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype, requires_grad=True)
    return r(B, T, E_IN), r(N * D, E_IN), r(N * D), r(E, N * D), r(E)


def idx(*v):
    return torch.tensor(v, dtype=torch.long)


def rows(W, blocks):  # [len(blocks) * D, E_in]: the blocks' rows in order
    return torch.cat([W[b * D:(b + 1) * D] for b in blocks])


def cols(W, heads):
    return torch.cat([W[:, h * D:(h + 1) * D] for h in heads], 1)


def test_head_in_proj_and_out_proj_equal_dense_and_zero_unused():
    x, W, b, Wo, bo = data()
    y = head_in_proj(x, W, b, idx(3, 0), D)
    ref = x @ rows(W, [3, 0]).T + torch.cat([b[6:8], b[0:2]])
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(head_in_proj(x, W, b, None, D), x @ W.T + b)
    o = torch.randn(B, T, 2 * D, dtype=F64, requires_grad=True)
    z = head_out_proj(o, Wo, bo, idx(4, 1), D)
    torch.testing.assert_close(z, o @ cols(Wo, [4, 1]).T + bo)
    gW, gWo = torch.autograd.grad(y.sum() + z.sum(), [W, Wo])
    unused = [h for h in range(N) if h not in (0, 3)]
    assert all((gW[h * D:(h + 1) * D] == 0).all() for h in unused)
    assert all((gWo[:, h * D:(h + 1) * D] == 0).all() for h in range(N) if h not in (1, 4))
    assert torch.autograd.gradcheck(lambda x, W, b: head_in_proj(x, W, b, idx(1, 4, 2), D), (x, W, b))
    assert torch.autograd.gradcheck(lambda o, W, b: head_out_proj(o, W, b, idx(2, 0), D), (o, Wo, bo))


def grouped_in_ref(x, W, b, samples, blocks):
    out = []
    for S, bl in zip(samples, blocks):
        S = list(range(B)) if S is None else S.tolist()
        R = bl.numel() // len(S)
        out.append(torch.stack([x[s] @ rows(W, bl[i * R:(i + 1) * R].tolist()).T
                                + torch.cat([b[j * D:(j + 1) * D] for j in bl[i * R:(i + 1) * R].tolist()])
                                for i, s in enumerate(S)]))
    return out


PLANS = {
    "two_groups": ([idx(0, 2), idx(3)], [idx(1, 0, 4, 1), idx(2, 3, 4)]),  # sample 1 in no group
    "one_group_all": ([None], [idx(0, 1, 2, 3, 1, 4, 0, 4)]),
    "three_groups": ([idx(1, 2), idx(0), idx(3)], [idx(0, 4), idx(3, 1, 2), idx(2, 2, 2, 2)]),  # a block twice
}


@pytest.mark.parametrize("plan", list(PLANS))
def test_grouped_in_proj_equals_per_sample_formula(plan):
    x, W, b, _, _ = data()
    samples, blocks = PLANS[plan]
    ys = grouped_head_in_proj(x, W, b, samples, blocks, D)
    refs = grouped_in_ref(x, W, b, samples, blocks)
    for y, r in zip(ys, refs):
        torch.testing.assert_close(y, r)
    gos = [torch.randn_like(r) for r in refs]
    ga = torch.autograd.grad(ys, [x, W, b], gos)
    gb = torch.autograd.grad(refs, [x, W, b], gos)
    for a, c in zip(ga, gb):
        torch.testing.assert_close(a, c)
    used = set(torch.cat(blocks).tolist())
    for h in set(range(N)) - used:
        assert (ga[1][h * D:(h + 1) * D] == 0).all() and (ga[2][h * D:(h + 1) * D] == 0).all()
    assert torch.autograd.gradcheck(lambda x, W, b: grouped_head_in_proj(x, W, b, samples, blocks, D), (x, W, b))


@pytest.mark.parametrize("plan", list(PLANS))
def test_grouped_out_proj_equals_per_sample_formula(plan):
    _, _, _, Wo, bo = data()
    samples, heads = PLANS[plan]
    g = torch.Generator().manual_seed(1)
    os = []
    for S, hd in zip(samples, heads):
        n = B if S is None else S.numel()
        os.append(torch.randn(n, T, hd.numel() // n * D, generator=g, dtype=F64, requires_grad=True))
    out = grouped_head_out_proj(os, Wo, bo, samples, heads, B, D)
    ref = [bo.expand(T, E)] * B
    for S, hd, o in zip(samples, heads, os):
        S = list(range(B)) if S is None else S.tolist()
        K = hd.numel() // len(S)
        for i, s in enumerate(S):
            ref[s] = ref[s] + o[i] @ cols(Wo, hd[i * K:(i + 1) * K].tolist()).T
    ref = torch.stack(ref)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(ref)
    ins = [Wo, bo, *os]
    for a, c in zip(torch.autograd.grad(out, ins, go), torch.autograd.grad(ref, ins, go)):
        torch.testing.assert_close(a, c)
    assert torch.autograd.gradcheck(
        lambda Wo, bo, *os: grouped_head_out_proj(list(os), Wo, bo, samples, heads, B, D), (Wo, bo, *os))
    # no bias: samples in no group are zeros
    out0 = grouped_head_out_proj(os, Wo, None, samples, heads, B, D)
    torch.testing.assert_close(out0, ref - bo)


# chunks of one sample; of 3 samples in "one_group_all" (R = K = 2: 192 and 224 bytes a sample), 3 + 1;
# one chunk for everything
@pytest.mark.parametrize("chunk_bytes", [1, 672, 1 << 30])
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_projections_without_grad_equal_the_autograd_path(plan, chunk_bytes, bias, monkeypatch):
    """Without autograd the grouped projections gather their weights a chunk of samples at a
    time (head_proj._CHUNK_BYTES); the result is the autograd Functions' (the per-sample formula
    tested above), for chunks of one sample, chunks that leave a partial last one, and one chunk."""
    from sparse_ops.ops import head_proj
    x, W, b, Wo, bo = (t.detach() for t in data())
    b, bo = (b, bo) if bias else (None, None)
    samples, ids = PLANS[plan]
    g = torch.Generator().manual_seed(2)
    os = [torch.randn(B if S is None else S.numel(), T, hd.numel() // (B if S is None else S.numel()) * D,
                      generator=g, dtype=F64) for S, hd in zip(samples, ids)]
    with_grad = (grouped_head_in_proj(x, W.requires_grad_(), b, samples, ids, D),
                 grouped_head_out_proj(os, Wo.requires_grad_(), bo, samples, ids, B, D))
    assert with_grad[1].grad_fn is not None
    monkeypatch.setattr(head_proj, "_CHUNK_BYTES", chunk_bytes)
    with torch.no_grad():
        ys = grouped_head_in_proj(x, W, b, samples, ids, D)
        out = grouped_head_out_proj(os, Wo, bo, samples, ids, B, D)
    assert out.grad_fn is None
    for y, r in zip(ys, with_grad[0]):
        torch.testing.assert_close(y, r.detach())
    torch.testing.assert_close(out, with_grad[1].detach())


def test_nan_in_unused_blocks_does_not_leak():
    x, W, b, Wo, bo = data()
    with torch.no_grad():
        W[2 * D:3 * D] = float("nan")
        Wo[:, 2 * D:3 * D] = float("nan")
    samples, blocks = [idx(0, 1), idx(3, 2)], [idx(0, 1, 4, 3), idx(1, 0, 3, 4)]
    ys = grouped_head_in_proj(x, W, b, samples, blocks, D)  # [2, T, 2D] each
    out = grouped_head_out_proj(ys, Wo, bo, samples, blocks, B, D)  # the same blocks as heads
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert (W.grad[2 * D:3 * D] == 0).all() and (Wo.grad[:, 2 * D:3 * D] == 0).all()


def test_errors_name_the_argument():
    x, W, b, Wo, bo = data()
    with pytest.raises(ValueError, match=r"blocks must hold indices in \[0, 5\)"):
        head_in_proj(x, W, b, idx(0, 5), D)
    with pytest.raises(ValueError, match="blocks must be a 1-D int64"):
        head_in_proj(x, W, b, idx(0, 1).int(), D)
    with pytest.raises(ValueError, match="weight must be"):
        head_in_proj(x, W, b, idx(0), 3)
    with pytest.raises(ValueError, match="bias must be"):
        head_in_proj(x, W, b[:-1], idx(0), D)
    with pytest.raises(TypeError, match="bias must have dtype"):
        head_in_proj(x, W, b.float(), idx(0), D)
    with pytest.raises(ValueError, match="heads must hold indices"):
        head_out_proj(torch.zeros(B, T, D, dtype=F64), Wo, bo, idx(-1), D)
    with pytest.raises(ValueError, match="o's last dimension"):
        head_out_proj(torch.zeros(B, T, 3 * D, dtype=F64), Wo, bo, idx(1), D)
    with pytest.raises(ValueError, match=r"samples\[0\] must hold indices"):
        grouped_head_in_proj(x, W, b, [idx(0, 4)], [idx(0, 1)], D)
    with pytest.raises(ValueError, match=r"blocks\[1\] must hold indices in \[0, 5\); got values in \[2, 7\]"):
        grouped_head_in_proj(x, W, b, [idx(0), idx(1, 2)], [idx(0), idx(2, 7)], D)
    with pytest.raises(ValueError, match=r"samples\[1\] must hold indices in \[0, 4\)"):
        grouped_head_out_proj([torch.zeros(1, T, D, dtype=F64)] * 2, Wo, bo, [idx(0), idx(-1)], [idx(0), idx(1)], B, D)
    with pytest.raises(ValueError, match=r"blocks\[1\] must hold R > 0 ids"):
        grouped_head_in_proj(x, W, b, [idx(0), idx(1, 2)], [idx(0), idx(1, 2, 3)], D)
    with pytest.raises(ValueError, match="a sample id appears twice"):
        grouped_head_in_proj(x, W, b, [idx(0, 2), idx(2)], [idx(0, 1), idx(1)], D)
    with pytest.raises(ValueError, match="a sample id appears twice"):
        grouped_head_out_proj([torch.zeros(2, T, D, dtype=F64)], Wo, bo, [idx(1, 1)], [idx(0, 1)], B, D)
    with pytest.raises(ValueError, match=r"samples\[1\] is None \(every sample\) but there are 2 groups"):
        grouped_head_in_proj(x, W, b, [idx(0), None], [idx(0), idx(1, 2, 3, 4)], D)
    with pytest.raises(ValueError, match="one entry per group"):
        grouped_head_in_proj(x, W, b, [idx(0)], [idx(0), idx(1)], D)
    with pytest.raises(TypeError, match="must be lists"):
        grouped_head_in_proj(x, W, b, idx(0), [idx(0)], D)
    with pytest.raises(ValueError, match="x must be 3-D"):
        grouped_head_in_proj(x[0], W, b, [None], [idx(0, 1, 2)], D)
    with pytest.raises(ValueError, match=r"os\[0\] must be \[n, L, K \* head_dim\]"):
        grouped_head_out_proj([torch.zeros(2, T, D, dtype=F64)], Wo, bo, [idx(0, 1)], [idx(0, 1, 2, 3)], B, D)
    with pytest.raises(ValueError, match="one tensor per group"):
        grouped_head_out_proj([], Wo, bo, [idx(0)], [idx(0)], B, D)
    with pytest.raises(ValueError, match="at least one group"):
        grouped_head_out_proj([], Wo, bo, [], [], B, D)
    with pytest.raises(ValueError, match="batch must be"):
        grouped_head_out_proj([torch.zeros(1, T, D, dtype=F64)], Wo, bo, [idx(0)], [idx(0)], -1, D)


def test_ops_do_not_import_nn():
    """The layering is nn -> ops -> kernels: nothing under sparse_ops/ops imports sparse_ops.nn."""
    ops_dir = pathlib.Path(__file__).resolve().parents[1] / "sparse_ops" / "ops"
    def is_nn(name):
        return name == "sparse_ops.nn" or name.startswith("sparse_ops.nn.")

    bad = []
    for f in sorted(ops_dir.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                # the absolute names imported: package sparse_ops.ops, `level` dots up
                base = "sparse_ops.ops".rsplit(".", node.level - 1)[0] if node.level else ""
                mod = ".".join(p for p in (base, node.module) if p)
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
                if any(is_nn(t) for t in targets):
                    bad.append(f"{f.name}: from {'.' * node.level}{node.module or ''} import "
                               f"{', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Import):
                bad += [f"{f.name}: import {a.name}" for a in node.names if is_nn(a.name)]
    assert ops_dir.is_dir() and not bad, bad
