"""Attention-head projections that read only the weight rows / columns of the heads that run.

A weight of N blocks of D rows ([N*D, E_in], e.g. nn.MultiheadAttention's in_proj_weight with
N = 3*H blocks: q heads, then k heads, then v heads) projects x onto chosen blocks only; an
out-projection weight [E, H*D] reads only the D columns of chosen heads. Blocks / heads that
are not chosen are never read, and their weight and bias gradients are exact zeros.

  head_in_proj(x, weight, bias, blocks, block_rows)           shared: the same blocks for every
  head_out_proj(o, weight, bias, heads, head_dim)              sample, one GEMM
  grouped_head_in_proj(x, weight, bias, samples, blocks, block_rows)
  grouped_head_out_proj(os, weight, bias, samples, heads, batch, head_dim)
                                                               groups of samples, each sample with
                                                               its own blocks, one batched GEMM per
                                                               group

The arguments are tensors, lists of tensors and plain ints (the schema a torch op could be
registered with). Index tensors are int64 and are checked against their bounds (one aminmax per
list), and a grouped op's samples for being in one group at most (one unique); both are skipped
while torch.compile traces (data-dependent). This module imports nothing from sparse_ops.nn.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import registry as _registry

Tensor = torch.Tensor


def _records_grad(*ts) -> bool:
    """Whether autograd records a call on ts, or torch.compile traces it (the Functions run then)."""
    return torch.compiler.is_compiling() or _registry.records_grad(ts)


# ----------------------------------------------------------------- checks
def _check_tensor(op, name, t, dims=None, like=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D; got shape {tuple(t.shape)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{op}: {name} must be on {like.device}; got {t.device}")
        if t.is_floating_point() and t.dtype != like.dtype:
            raise TypeError(f"{op}: {name} must have dtype {like.dtype}; got {t.dtype}")


def _check_index(op, name, idx, bound, like, bounds=True):
    """idx: int64 1-D on like's device, every value in [0, bound) (the values: with bounds=True)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{op}: {name} must be an int64 torch.Tensor; got {type(idx).__name__}")
    if idx.dtype != torch.int64 or idx.dim() != 1:
        raise ValueError(f"{op}: {name} must be a 1-D int64 tensor; got {idx.dtype} of shape {tuple(idx.shape)}")
    if idx.device != like.device:
        raise ValueError(f"{op}: {name} must be on {like.device}; got {idx.device}")
    if bounds:
        _check_bounds(op, [name], [idx], bound)


def _check_bounds(op, names, idxs, bound):
    """Every value of the index tensors idxs in [0, bound): one aminmax over all of them, not one
    per tensor (per tensor, cProfile put it at ~20 us each on the loaded VM, 20 of them in a
    5-group SparseMultiheadAttention forward); the tensor at fault is looked for only when there
    is one. Skipped while torch.compile traces (data-dependent)."""
    if torch.compiler.is_compiling():
        return
    named = [(n, t) for n, t in zip(names, idxs) if t.numel()]
    if not named:
        return
    idxs = [t for _, t in named]
    lo, hi = (int(v) for v in torch.aminmax(idxs[0] if len(idxs) == 1 else torch.cat(idxs)))
    if lo >= 0 and hi < bound:
        return
    for name, t in named:
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < 0 or hi >= bound:
            raise ValueError(f"{op}: {name} must hold indices in [0, {bound}); got values in [{lo}, {hi}]")


def _check_layer(op, weight, bias, size_name, size, like):
    """weight 2-D and bias (or None) [weight's rows] on like's device and dtype; size a positive int."""
    _check_tensor(op, "weight", weight, 2, like)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"{op}: {size_name} must be a positive int; got {size!r}")
    if bias is not None:
        _check_tensor(op, "bias", bias, 1, like)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: bias must be [{weight.shape[0]}] (weight's rows); got shape {tuple(bias.shape)}")


def _check_weight(op, weight, bias, block_rows, e_in, like):
    _check_layer(op, weight, bias, "block_rows", block_rows, like)
    if weight.shape[1] != e_in or weight.shape[0] % block_rows:
        raise ValueError(f"{op}: weight must be [N * block_rows, {e_in}] (block_rows={block_rows}); "
                         f"got shape {tuple(weight.shape)}")
    return weight.shape[0] // block_rows


def _check_out_weight(op, weight, bias, head_dim, like):
    _check_layer(op, weight, bias, "head_dim", head_dim, like)
    if weight.shape[1] % head_dim:
        raise ValueError(f"{op}: weight must be [E, H * head_dim] (head_dim={head_dim}); "
                         f"got shape {tuple(weight.shape)}")
    return weight.shape[1] // head_dim


# ----------------------------------------------------------------- shared heads
def head_in_proj(x: Tensor, weight: Tensor, bias: Tensor | None, blocks: Tensor | None, block_rows: int) -> Tensor:
    """F.linear(x, weight's row blocks `blocks`, their bias): [..., len(blocks) * block_rows].

    weight [N * block_rows, E_in] seen as N blocks of block_rows rows; blocks: int64 [R] block ids
    (in output order), or None for all N blocks (nothing gathered: F.linear on the weight itself).
    One GEMM; the chosen blocks are gathered once (index_select), and autograd's index_select
    backward puts exact zeros in the gradient rows of blocks not chosen.
    """
    op = "head_in_proj"
    _check_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have a last (feature) dimension; got a 0-D tensor")
    N = _check_weight(op, weight, bias, block_rows, x.shape[-1], x)
    if blocks is None:
        return F.linear(x, weight, bias)
    _check_index(op, "blocks", blocks, N, x)
    e_in = weight.shape[1]
    W = weight.view(N, block_rows * e_in).index_select(0, blocks).view(-1, e_in)
    b = None if bias is None else bias.view(N, block_rows).index_select(0, blocks).view(-1)
    return F.linear(x, W, b)


def head_out_proj(o: Tensor, weight: Tensor, bias: Tensor | None, heads: Tensor | None, head_dim: int) -> Tensor:
    """F.linear(o, weight's columns of `heads`, bias): o [..., K * head_dim] -> [..., E].

    weight [E, H * head_dim]; heads: int64 [K] head ids in o's order, or None for all H heads.
    Columns of heads not chosen are never read and get exact-zero gradients.
    """
    op = "head_out_proj"
    _check_tensor(op, "o", o)
    if o.dim() < 1:
        raise ValueError(f"{op}: o must have a last (feature) dimension; got a 0-D tensor")
    H = _check_out_weight(op, weight, bias, head_dim, o)
    E = weight.shape[0]
    if heads is None:
        if o.shape[-1] != H * head_dim:
            raise ValueError(f"{op}: o's last dimension must be H * head_dim = {H * head_dim}; got {o.shape[-1]}")
        return F.linear(o, weight, bias)
    _check_index(op, "heads", heads, H, o)
    if o.shape[-1] != heads.numel() * head_dim:
        raise ValueError(f"{op}: o's last dimension must be len(heads) * head_dim = {heads.numel() * head_dim}; "
                         f"got {o.shape[-1]}")
    if torch.compiler.is_compiling():
        return _TracedHeadOutProj.apply(o, weight, bias, heads, head_dim)
    W = weight.view(E, H, head_dim).index_select(1, heads).reshape(E, -1)
    return F.linear(o, W, bias)


class _TracedHeadOutProj(torch.autograd.Function):
    """head_out_proj with its backward written out, for torch.compile: with the head count a
    symbol of the graph (sparse_ops.ops.plans), autograd's own mm backward asks whether the
    gathered [E, K*D] weight's row stride is 1, a guard on that symbol that fails the trace.
    Here the weight gradient is one mm into the chosen columns (index_add), the input gradient
    one mm by the gathered weight."""

    @staticmethod
    def forward(ctx, o, weight, bias, heads, head_dim):
        E, HD = weight.shape
        # Sizes spelled out, never -1: inferring one from a symbolic element count asserts that it is
        # not 0, and no active head (K = 0) is a valid mask.
        W = weight.view(E, HD // head_dim, head_dim).index_select(1, heads).reshape(E, heads.shape[0] * head_dim)
        ctx.save_for_backward(o, W, heads)
        ctx.head_dim, ctx.has_bias = head_dim, bias is not None
        ctx.shape = weight.shape
        return F.linear(o, W, bias)

    @staticmethod
    def backward(ctx, g):
        o, W, heads = ctx.saved_tensors
        E, HD = ctx.shape
        D = ctx.head_dim
        K = heads.shape[0]
        g2 = g.reshape(-1, E)
        go = gw = gb = None
        if ctx.needs_input_grad[0]:
            go = (g2 @ W).view(o.shape)
        if ctx.needs_input_grad[1]:
            gsel = (g2.t() @ o.reshape(g2.shape[0], K * D)).view(E, K, D)
            gw = torch.zeros((E, HD // D, D), dtype=W.dtype, device=W.device).index_add_(1, heads, gsel).view(E, HD)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return go, gw, gb, None, None


# ----------------------------------------------------------------- per-sample groups
class _GroupedInProj(torch.autograd.Function):
    """In-projection of groups of samples, each sample with its own R weight blocks:
    y_g = x[S_g] @ Wg^T + bg with Wg [n, R*D, E_in] the D-row blocks idx_g of W (viewed [N, D, E_in]),
    one batched GEMM per group. plan: [(S_g or None for all samples, n, R, idx_g)].

    One Function for every group, so that backward has one weight-gradient buffer: each group's
    blocks come straight from one bmm into an index_add. (Autograd through index_select and a
    bmm on the transposed gathered weight copied that [n, R*D, E_in] gradient once more, 28 MB a
    step at B=8, keep 0.5, and a Function per group zero-filled and summed a full-size gradient
    per group: ~20 ms of ~190 at 5 groups.) Blocks no sample uses get exact-zero gradients."""

    @staticmethod
    def forward(ctx, x, W, bias, plan, D):
        Ein = x.shape[-1]
        W2 = W.view(-1, D * Ein)
        ys, saved = [], []
        for S_t, n, R, idx in plan:
            xs = x if S_t is None else x.index_select(0, S_t)
            Wg = W2.index_select(0, idx).view(n, R * D, Ein)
            Wt = Wg.transpose(1, 2)
            if bias is None:
                ys.append(torch.bmm(xs, Wt))
            else:
                ys.append(torch.baddbmm(bias.view(-1, D).index_select(0, idx).view(n, 1, R * D), xs, Wt))
            saved += [xs, Wg]
        ctx.save_for_backward(*saved)
        ctx.plan, ctx.meta = plan, (x.shape, W.shape, None if bias is None else bias.shape, D)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *gys):
        saved = ctx.saved_tensors
        xshape, Wshape, bshape, D = ctx.meta
        Ein = xshape[-1]
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bshape is not None
        plan = ctx.plan
        # One group of every sample (a batch whose samples all run the same number of heads): its
        # input gradient is x's, nothing to scatter.
        whole = len(plan) == 1 and plan[0][0] is None
        gx = saved[1].new_zeros(xshape) if (need_x and not whole) else None
        gW = saved[1].new_zeros(Wshape) if need_W else None
        gb = saved[1].new_zeros(bshape) if need_b else None
        for g, ((S_t, n, R, idx), gy) in enumerate(zip(plan, gys)):
            xs, Wg = saved[2 * g], saved[2 * g + 1]
            if need_x:
                dx = torch.bmm(gy, Wg)
                if whole:
                    gx = dx
                else:
                    gx.index_copy_(0, S_t, dx)  # every sample is in one group at most
            if need_W:
                gW.view(-1, D * Ein).index_add_(0, idx, torch.bmm(gy.transpose(1, 2), xs).view(-1, D * Ein))
            if need_b:
                gb.view(-1, D).index_add_(0, idx, gy.sum(1).reshape(-1, D))
        return gx, gW, gb, None, None


class _GroupedOutProj(torch.autograd.Function):
    """Out-projection of groups of samples with K heads each: out[S_g] = o_g @ Wo[:, heads]^T + bo,
    o_g [n, L, K*D], heads idx_g [n*K] (Wo viewed [E, H, D]); samples in no group get bo (or 0).
    plan: [(S_g or None, n, K, idx_g)], disjoint groups. Columns no sample uses get exact-zero
    gradients."""

    @staticmethod
    def forward(ctx, Wo, bo, plan, B, L, D, *os):
        E = Wo.shape[0]
        whole = len(plan) == 1 and plan[0][0] is None
        out = None
        if not whole:
            out = Wo.new_empty(B, L, E)
            if bo is None:
                out.zero_()
            else:
                out.copy_(bo.expand(B, L, E))
        # Each group gathers its heads' columns of Wo as [E, n*K, D] (rows of D contiguous floats)
        # and bmm reads the permuted view [n, K*D, E] as a transposed operand, without a copy.
        # Measured against gathering rows of a transposed copy of Wo ([n, K*D, E] contiguous, one
        # E x E transposed copy per call), forward alone, medians of 40 alternating calls: E 768,
        # n 8, L 256, K 3: 3.9 vs 4.5 ms; K 6: 7.3 vs 8.0; E 384, n 32, L 128, K 6: 4.2 vs 4.3, K 3:
        # 2.0 vs 2.2. (The backward's weight gradient does go through the transpose: below.)
        Wgs = []
        for (S_t, n, K, idx), o in zip(plan, os):
            Wg = Wo.view(E, -1, D).index_select(1, idx)  # [E, n*K, D]
            Wt = Wg.view(E, n, K * D).permute(1, 2, 0)  # [n, K*D, E], a view
            y = torch.bmm(o, Wt) if bo is None else torch.baddbmm(bo.view(1, 1, E), o, Wt)
            if whole:
                out = y
            else:
                out.index_copy_(0, S_t, y)  # every sample is in one group at most
            Wgs.append(Wg)
        ctx.save_for_backward(*os, *Wgs)
        ctx.plan, ctx.meta = plan, (Wo.shape, bo is not None, D)
        return out

    @staticmethod
    def backward(ctx, gout):
        saved = ctx.saved_tensors
        plan = ctx.plan
        Wshape, has_bias, D = ctx.meta
        E, HD = Wshape
        os, Wgs = saved[:len(plan)], saved[len(plan):]
        need_W, need_b = ctx.needs_input_grad[:2]
        need_o = ctx.needs_input_grad[6:]
        # The weight gradient is gathered as the gradient of Wo's transpose ([n, K*D, E] blocks from
        # bmm index_add'ed as rows), then transposed once: index_add of [E, n*K, D] blocks along
        # dim 1 needed a permuted copy of every group's gradient (fwd+bwd at E 384, n 32, L 128,
        # K 6: 13.9 vs 16.2 ms).
        gWT = Wgs[0].new_zeros(HD // D, D * E) if need_W else None
        gos = []
        for (S_t, n, K, idx), o, Wg, no in zip(plan, os, Wgs, need_o):
            gy = gout if S_t is None else gout.index_select(0, S_t)
            gos.append(torch.bmm(gy, Wg.view(E, n, K * D).permute(1, 0, 2)) if no else None)
            if need_W:
                dWg = torch.bmm(o.transpose(1, 2), gy)  # [n, K*D, E]
                gWT.index_add_(0, idx, dWg.view(n * K, D * E))
        gW = gWT.view(HD, E).t().contiguous() if need_W else None
        gb = gout.sum((0, 1)) if (need_b and has_bias) else None
        return (gW, gb, None, None, None, None, *gos)


# ----------------------------------------------------------------- per-sample groups, no autograd
# Without a graph to record (inference), the grouped projections gather each group's weights a
# few samples at a time into one reused buffer: the whole group's gathered copy (28 MB a layer for
# MiniLM's in-projection at 32 samples x 6 heads) went through DRAM, and, freshly allocated on
# every call, was zero-filled by the kernel page by page first (index_select into a new 28 MB
# tensor 3.5 ms, into an existing one 1.4 ms). A chunk of about _CHUNK_BYTES of weights is
# gathered and read back by its GEMM from cache.
_CHUNK_BYTES = 4 << 20


def _chunk(n: int, bytes_per_sample: int) -> int:
    return max(1, min(n, _CHUNK_BYTES // max(1, bytes_per_sample)))


def _in_proj_chunked(x, W, bias, plan, D):
    """_GroupedInProj's forward, without autograd, gathering the weights in chunks of samples."""
    B, T, Ein = x.shape
    W2 = W.view(-1, D * Ein)
    bD = None if bias is None else bias.view(-1, D)
    ys = []
    for S_t, n, R, idx in plan:
        y = x.new_empty(n, T, R * D)
        c = _chunk(n, R * D * Ein * x.element_size())
        buf = W.new_empty(c * R, D * Ein)
        for s0 in range(0, n, c):
            s1 = min(n, s0 + c)
            ids = idx[s0 * R:s1 * R]
            xs = x[s0:s1] if S_t is None else x.index_select(0, S_t[s0:s1])
            Wt = torch.index_select(W2, 0, ids, out=buf[:(s1 - s0) * R]).view(s1 - s0, R * D, Ein).transpose(1, 2)
            if bD is None:
                torch.bmm(xs, Wt, out=y[s0:s1])
            else:
                torch.baddbmm(bD.index_select(0, ids).view(s1 - s0, 1, R * D), xs, Wt, out=y[s0:s1])
        ys.append(y)
    return ys


def _out_proj_chunked(Wo, bo, plan, B, L, D, os):
    """_GroupedOutProj's forward, without autograd, gathering the weights in chunks of samples."""
    E = Wo.shape[0]
    whole = len(plan) == 1 and plan[0][0] is None
    out = Wo.new_empty(B, L, E)
    if not whole:
        if bo is None:
            out.zero_()
        else:
            out.copy_(bo.expand(B, L, E))
    W3 = Wo.view(E, -1, D)
    for (S_t, n, K, idx), o in zip(plan, os):
        c = _chunk(n, E * K * D * Wo.element_size())
        buf = Wo.new_empty(E, c * K, D)
        tmp = None if whole else Wo.new_empty(c, L, E)
        for s0 in range(0, n, c):
            s1 = min(n, s0 + c)
            m = s1 - s0
            Wg = torch.index_select(W3, 1, idx[s0 * K:s1 * K], out=buf[:, :m * K]) if m == c else \
                W3.index_select(1, idx[s0 * K:s1 * K])
            Wt = Wg.view(E, m, K * D).permute(1, 2, 0)  # [m, K*D, E], a view
            dst = out[s0:s1] if whole else tmp[:m]
            if bo is None:
                torch.bmm(o[s0:s1], Wt, out=dst)
            else:
                torch.baddbmm(bo.view(1, 1, E), o[s0:s1], Wt, out=dst)
            if not whole:
                out.index_copy_(0, S_t[s0:s1], dst)
    return out


def _group_sizes(op, x_batch, samples, idx_list, idx_name, bound, like):
    """[(S or None, n, R, idx)]: each group's samples, their count, blocks per sample, blocks."""
    if not isinstance(samples, (list, tuple)) or not isinstance(idx_list, (list, tuple)):
        raise TypeError(f"{op}: samples and {idx_name} must be lists (one entry per group); got "
                        f"{type(samples).__name__} and {type(idx_list).__name__}")
    if len(samples) != len(idx_list):
        raise ValueError(f"{op}: samples and {idx_name} must have one entry per group; got {len(samples)} "
                         f"and {len(idx_list)}")
    plan = []
    for g, (S, idx) in enumerate(zip(samples, idx_list)):
        if S is None:
            n = x_batch
        else:
            _check_index(op, f"samples[{g}]", S, x_batch, like, bounds=False)
            n = S.numel()
        _check_index(op, f"{idx_name}[{g}]", idx, bound, like, bounds=False)
        # While traced, idx's length can be a symbol of the graph (sparse_ops.ops.plans): not checked
        # (a guard on it would fail), and R = 0 (no block) runs as empty GEMMs.
        if n == 0 or (not torch.compiler.is_compiling() and (idx.numel() == 0 or idx.numel() % n)):
            raise ValueError(f"{op}: {idx_name}[{g}] must hold R > 0 ids for each of the group's {n} samples "
                             f"(a non-empty group); got {idx.numel()} ids")
        plan.append((S, n, idx.numel() // n, idx))
    sg = [g for g, S in enumerate(samples) if S is not None]
    if len(plan) > 1 and len(sg) < len(plan):
        raise ValueError(f"{op}: samples[{next(g for g in range(len(plan)) if samples[g] is None)}] is None "
                         f"(every sample) but there are {len(plan)} groups; groups must not share samples")
    _check_bounds(op, [f"samples[{g}]" for g in sg], [samples[g] for g in sg], x_batch)
    if sg and not torch.compiler.is_compiling():
        every = samples[sg[0]] if len(sg) == 1 else torch.cat([samples[g] for g in sg])
        if torch.unique(every).numel() < every.numel():
            raise ValueError(f"{op}: samples: a sample id appears twice (in one group or in two); each sample "
                             f"belongs to one group at most")
    _check_bounds(op, [f"{idx_name}[{g}]" for g in range(len(plan))], list(idx_list), bound)
    return tuple(plan)


def grouped_head_in_proj(x: Tensor, weight: Tensor, bias: Tensor | None, samples: Sequence[Tensor | None],
                         blocks: Sequence[Tensor], block_rows: int) -> list[Tensor]:
    """Per group g: x[samples[g]] projected on each sample's own weight blocks.

    x [B, T, E_in]; weight [N * block_rows, E_in] seen as N blocks (bias [N * block_rows] or None);
    samples[g]: int64 [n_g] sample ids, or None for every sample of x (n_g = B); blocks[g]: int64
    [n_g * R_g], sample i's R_g block ids at [i * R_g, (i + 1) * R_g). Returns one
    [n_g, T, R_g * block_rows] tensor per group, sample i's blocks in its order. A sample belongs to
    one group at most (checked). One batched GEMM per group ([n_g, T, E_in] @
    [n_g, E_in, R_g * block_rows]), one autograd Function for all groups (see _GroupedInProj).
    """
    op = "grouped_head_in_proj"
    _check_tensor(op, "x", x, 3)
    N = _check_weight(op, weight, bias, block_rows, x.shape[-1], x)
    plan = _group_sizes(op, x.shape[0], samples, blocks, "blocks", N, x)
    if not plan:
        return []
    if not _records_grad(x, weight, bias):
        return _in_proj_chunked(x, weight, bias, plan, block_rows)
    return list(_GroupedInProj.apply(x, weight, bias, plan, block_rows))


def grouped_head_out_proj(os: Sequence[Tensor], weight: Tensor, bias: Tensor | None,
                          samples: Sequence[Tensor | None], heads: Sequence[Tensor], batch: int,
                          head_dim: int) -> Tensor:
    """out [batch, L, E]: for each group g, rows samples[g] (None: every sample) are
    os[g] @ weight[:, heads of each sample]^T + bias; the rows of samples in no group are the bias (or 0).

    os[g] [n_g, L, K_g * head_dim]; weight [E, H * head_dim]; heads[g]: int64 [n_g * K_g], sample i's
    K_g head ids at [i * K_g, (i + 1) * K_g) in os[g]'s order. A sample belongs to one group at most
    (checked). One batched GEMM per group ([n_g, L, K_g * head_dim] @
    [n_g, K_g * head_dim, E]), one autograd Function for all groups (see _GroupedOutProj).
    """
    op = "grouped_head_out_proj"
    if not isinstance(os, (list, tuple)):
        raise TypeError(f"{op}: os must be a list of tensors (one per group); got {type(os).__name__}")
    if not isinstance(batch, int) or batch < 0:
        raise ValueError(f"{op}: batch must be a non-negative int; got {batch!r}")
    _check_tensor(op, "weight", weight, 2)
    for g, o in enumerate(os):
        _check_tensor(op, f"os[{g}]", o, 3, weight)
    H = _check_out_weight(op, weight, bias, head_dim, weight)
    plan = _group_sizes(op, batch, samples, heads, "heads", H, weight)
    if len(os) != len(plan):
        raise ValueError(f"{op}: os must have one tensor per group ({len(plan)}); got {len(os)}")
    if not plan:
        raise ValueError(f"{op}: needs at least one group (the sequence length comes from os)")
    L = os[0].shape[1]
    for g, ((_, n, K, _), o) in enumerate(zip(plan, os)):
        if tuple(o.shape) != (n, L, K * head_dim):
            raise ValueError(f"{op}: os[{g}] must be [n, L, K * head_dim] = {[n, L, K * head_dim]}; "
                             f"got {tuple(o.shape)}")
    if not _records_grad(weight, bias, *os):
        return _out_proj_chunked(weight, bias, plan, batch, L, head_dim, os)
    return _GroupedOutProj.apply(weight, bias, plan, batch, L, head_dim, *os)


__all__ = ["head_in_proj", "head_out_proj", "grouped_head_in_proj", "grouped_head_out_proj"]
