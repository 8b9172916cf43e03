"""SparseMultiheadAttention's compute paths, on batch-first inputs and the module's weights.

  forward_shared      the same heads for every sample (all heads: nothing gathered); also a
                      per-sample mask where grouping does not pay (grouping_pays): the union of
                      the batch's heads, the mask as a gate (off pairs skipped in the core)
  forward_per_sample  samples grouped by their number of active heads
  forward_dense       every head computed, off heads selected away (need_weights, add_bias_kv,
                      add_zero_attn, dense_grad)
The projections are sparse_ops.ops.head_proj's; the attention core of every path is
sparse_ops.ops.heads.masked_head_attention (`attend`), so the chosen backend (cpp, cuda,
triton, torch) runs it. Exceptions that run F.scaled_dot_product_attention itself: dropout > 0
in training (the op has no dropout) and need_weights=True (the weights are computed explicitly).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..ops.head_proj import grouped_head_in_proj, grouped_head_out_proj, head_in_proj, head_out_proj
from ..ops.heads import masked_head_attention
from ..ops.plans import kept_positions, kept_positions_per_row


class Weights(NamedTuple):
    """The parameters of an nn.MultiheadAttention that the paths read (tensors as they are, no copies)."""
    num_heads: int
    head_dim: int
    in_proj_weight: torch.Tensor | None  # [3E, E] when q, k, v have embed_dim features, else None
    q_proj_weight: torch.Tensor | None  # [E, E], [E, kdim], [E, vdim] otherwise
    k_proj_weight: torch.Tensor | None
    v_proj_weight: torch.Tensor | None
    in_proj_bias: torch.Tensor | None  # [3E]
    out_proj_weight: torch.Tensor  # [E, E]
    out_proj_bias: torch.Tensor | None
    bias_k: torch.Tensor | None
    bias_v: torch.Tensor | None
    add_zero_attn: bool
    # Separate q, k, v biases ([E] each, e.g. three nn.Linear layers of a Hugging Face model) when
    # there is no concatenated in_proj_bias; read in place as the weights are.
    qkv_biases: tuple | None = None

    @classmethod
    def of(cls, mha) -> "Weights":
        same = mha._qkv_same_embed_dim
        return cls(mha.num_heads, mha.head_dim, mha.in_proj_weight if same else None,
                   None if same else mha.q_proj_weight, None if same else mha.k_proj_weight,
                   None if same else mha.v_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
                   mha.out_proj.bias, mha.bias_k, mha.bias_v, mha.add_zero_attn)

    def in_proj(self, i: int, r: int):
        """(W, b): the rows of projections i..i+r-1 (0 q, 1 k, 2 v) as one weight [r*E, E_in] and its
        bias [r*E] (or None). Views of a concatenated in_proj_weight; separate q, k, v weights are
        concatenated (a copy, r = 3 only where proj_groups fuses them)."""
        E = self.out_proj_weight.shape[0]
        if self.in_proj_weight is not None:
            b = None if self.in_proj_bias is None else self.in_proj_bias[i * E:(i + r) * E]
            return self.in_proj_weight[i * E:(i + r) * E], b
        ws = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)[i:i + r]
        bs = self._separate_biases()[i:i + r]
        if r == 1:
            return ws[0], bs[0]
        return torch.cat(ws), None if bs[0] is None else torch.cat(bs)

    def _separate_biases(self):
        """(b_q, b_k, b_v) of separate q, k, v weights (each [E] or None): qkv_biases, else views of
        in_proj_bias."""
        if self.qkv_biases is not None:
            return tuple(self.qkv_biases)
        E = self.out_proj_weight.shape[0]
        b = self.in_proj_bias
        return tuple(None if b is None else b[j * E:(j + 1) * E] for j in range(3))

    def proj_groups(self, q_in, k_in, v_in):
        """[(input, first projection, r)]: which projections run as one GEMM. Self-attention runs q, k
        and v as one GEMM; with separate weights of one shape (a Hugging Face model's three
        nn.Linear layers) on a copy of the three concatenated, made per call (3 E x E_in elements):
        on MiniLM's shapes (32 x 128 tokens, E 384, 12 heads of 32) one GEMM of N = 3 K D took
        13.2 ms where three of N = K D took 14.2 (per-sample groups, 6 heads each), and 5% less
        with a shared mask (6 or 12 heads)."""
        if self.in_proj_weight is not None:
            if q_in is k_in and k_in is v_in:
                return [(q_in, 0, 3)]
            if k_in is v_in:
                return [(q_in, 0, 1), (k_in, 1, 2)]
            return [(q_in, 0, 1), (k_in, 1, 1), (v_in, 2, 1)]
        ws = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        if (q_in is k_in and k_in is v_in and ws[0].shape == ws[1].shape == ws[2].shape
                and len({b is None for b in self._separate_biases()}) == 1):
            return [(q_in, 0, 3)]
        return [(q_in, 0, 1), (k_in, 1, 1), (v_in, 2, 1)]


def attend(q, k, v, gate, attn_mask, is_causal, dropout_p, backend):
    """SDPA on [n, K, L, D] where every (sample, head) pair runs, times gate ([K] or [n, K], no zeros;
    None: 1) per pair, through masked_head_attention (the gate as a float head_mask: the op applies
    it and gives it its gradient; no gate: an all-on bool head_mask). dropout_p > 0 (training with
    dropout) runs F.scaled_dot_product_attention itself: the op has no dropout."""
    if dropout_p > 0.0:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        if gate is not None:
            o = o * (gate.view(1, -1, 1, 1) if gate.dim() == 1 else gate.view(*gate.shape, 1, 1))
        return o
    hm = gate if gate is not None else torch.ones(q.shape[1], dtype=torch.bool, device=q.device)
    return masked_head_attention(q, k, v, hm, attn_mask=attn_mask, is_causal=is_causal, backend=backend)


def forward_sparse(w: Weights, q_in, k_in, v_in, m, on, mask4, causal, dropout_p, backend):
    """Only the (sample, head) pairs that are on (m: the head mask, on: m != 0 as bool).

    Shared mask ([H], or [B, H] with equal rows): the active heads' rows of W_in and columns of
    Wo are gathered once; each projection is one GEMM over the batch, the attention runs on
    [B, K, L, D] (forward_shared). Per-sample mask [B, H]: samples are grouped by their number K
    of active heads (a batch whose samples all have the same K, e.g. top-k gates, is one group).
    Group g (n samples) gathers its samples' rows of x and their heads' weight rows / Wo columns,
    and runs one batched GEMM per projection ([n, T, E] @ [n, E, r*K*D], grouped_head_in_proj),
    the attention on [n, K, L, D] and one batched out-projection ([n, L, K*D] @ [n, K*D, E],
    grouped_head_out_proj) (forward_per_sample). That is done where grouping_pays (long enough
    sequences for the weight gathers to pay); otherwise the union of the batch's heads runs as a
    shared mask with the per-sample mask as its gate (forward_shared).

    Measured (B=8, T=256, E=768, H=12, fp32, torch.set_num_threads(2) on the shared 2-core
    CPU; forward in eval under inference_mode, where nn.MultiheadAttention takes its native
    fast path; forward+backward in training; medians of 16 rounds, case order alternating;
    speedup over dense nn.MultiheadAttention, need_weights=False; the attention core was
    F.scaled_dot_product_attention then):
      per-sample keep 0.5 (6 of 12 heads per sample): grouped per sample (this) fwd 1.88x,
        fwd+bwd 1.88x (keep 0.25: 3.66x / 3.77x); grouped per head instead (MoE-style: gather
        the samples that use head h, [n_h, T, E] @ [E, 3D] GEMMs, SDPA on [n_h, 1, T, D],
        index_add of each head's out-projection into the output) fwd 1.70x, fwd+bwd 1.32x
        (keep 0.25: 2.45x / 2.17x): N=3D=192 GEMMs, a copy of x per head and an index_add of
        a [n_h, T, E] output per head. Kept: per sample.
      per-sample Bernoulli(0.5) masks (46 of 96 pairs on, K per sample 4..8: 5 groups):
        fwd 1.88x, fwd+bwd 1.77x; shared [H] keep 0.5: fwd 2.38x, fwd+bwd 2.15x.
      Before _GroupedInProj (ops/head_proj.py), autograd through index_select + bmm on the
        transposed weight copied the weight gradient again and split/cat'ed it per group:
        fwd+bwd 1.58x.
      One GEMM per run of consecutive heads reading the weights in place (no gathers, ~80
        small GEMMs per call) lost on a loaded machine: the number of ops, each of which
        synchronises both threads, mattered more than the 37 MB of weight copies saved.
    With masked_head_attention as the attention core, against the module of b31d13d in one
    process (bench/ab_mha.py: same shapes, old/new/old call by call, paired medians of 40 forward
    / 16-24 training rounds; time old/new, 1.0 = unchanged):
      2 threads, machine quiet (load < 1.7; A/A 0.967-1.019): forward shared keep 0.5 0.982,
        per-sample keep 0.5 1.000, keep 0.25 0.982, Bernoulli(0.5) 0.977-0.994 (3 runs);
        forward+backward shared 0.990, per-sample keep 0.5 0.989, keep 0.25 1.012, Bernoulli
        0.942-0.990 (3 runs). Loaded (load 3-8; A/A 0.93-1.12): forward 0.973-1.016, forward+
        backward 0.914-1.063.
      1 thread, thread CPU time (not inflated by descheduling; A/A 0.93-1.01): forward
        0.968-0.994, forward+backward 0.970-0.990.
    Bernoulli's 5 groups make 5 op calls; one costs ~0.24 ms more than
    F.scaled_dot_product_attention forward + backward (tiny shapes, 1 thread: the op's autograd
    wrapper and checks).
    """
    H = w.num_heads
    gated = m.is_floating_point()
    if q_in.shape[0] == 0:  # an empty batch (under torch.compile, a layer every sample skips runs on 0 rows)
        return forward_shared(w, q_in, k_in, v_in, None, m if gated else None, mask4, causal, dropout_p, backend)
    if torch.compiler.is_compiling():
        return _forward_traced(w, q_in, k_in, v_in, m, on, mask4, causal, dropout_p, backend)
    if m.dim() == 1 or bool((on == on[:1]).all()):
        row = on.reshape(-1, H)[0].tolist()  # (an empty batch returned above)
        heads = [h for h, o in enumerate(row) if o]
        gate = m[..., heads] if gated else None  # [K] or [B, K]
        return forward_shared(w, q_in, k_in, v_in, heads, gate, mask4, causal, dropout_p, backend)
    learn = torch.is_grad_enabled() and (q_in.requires_grad or w.out_proj_weight.requires_grad
                                         or (gated and m.requires_grad))
    if not grouping_pays(on, q_in.shape[1], learn):
        row = on.any(0).tolist()
        heads = [h for h, o in enumerate(row) if o]
        gate = (m if gated else on.to(q_in.dtype))[:, heads]  # [B, U]: the off pairs' exact zeros are skipped
        return forward_shared(w, q_in, k_in, v_in, heads, gate, mask4, causal, dropout_p, backend)
    return forward_per_sample(w, q_in, k_in, v_in, m if gated else None, on, mask4, causal, dropout_p, backend)


# grouping_pays' break-even: L * (U - K) >= GROUPING_MIN[learn] * K.
GROUPING_MIN = {False: 64.0, True: 64.0}


def grouping_pays(on: torch.Tensor, L: int, learn: bool) -> bool:
    """Whether a per-sample mask (on: bool [B, H]) runs faster grouped (each sample's own heads'
    weights gathered: forward_per_sample) than on the union of the batch's heads (one GEMM per
    projection, the off (sample, head) pairs skipped only in the attention core: forward_shared
    with the mask as a gate). Grouping saves L * (U - K) rows of projection work per sample (U
    heads in the union, K per sample on average) and costs a gather of K heads' weights per
    sample; with gradients (learn) the backward's GEMMs share the gathers, so it pays sooner.

    Measured on all-MiniLM-L6-v2 (E 384, 12 heads), a per-sample head mask with U = 12, 2 threads,
    speedup of the whole model over the dense one (grouped / union):
      AVX-512 Xeon, FFN dense, B = 16, a head router, medians of 8 rounds:
        inference, K 6:  L 32 0.72 / 0.89; 48 0.96 / 1.00; 64 1.03 / 1.08; 96 1.06 / 1.07;
                         128 1.07 / 1.09; 192 1.14 / 1.17
        inference, K 3:  L 48 1.04 / 1.06; 128 1.27 / 1.21; 256 1.31 / 1.32
        training (forward + backward), K 6:  L 48 0.92 / 0.99; 128 1.22 / 1.09
      AMD EPYC (Zen 4), B = 32, random per-sample masks, half of each sample's FFN columns off as
      well (the FFN's row groups run in parallel, csrc/cpu/ffn_cpu.cpp forward_groups), inference,
      grouped_head_out_proj gathering rows of Wo's transpose (no copy inside bmm):
        K 6:  L 48 1.17 / 1.19; 64 1.45 / 1.30; 96 1.38 / 1.22; 128 1.53 / 1.41 (other runs at 128:
              1.49 / 1.36, 1.32 / 1.34; heads alone: 1.21 / 1.03, 1.13 / 1.07)
        K 3:  L 32 1.44 / 1.21; 64 1.60 / 1.39; 128 1.92 / 1.46
    so 64 with and without gradients: grouped from L = 64 at K 6 of 12 (the break-even on the AMD
    machine lies between 48 and 64; on the Xeon union stays ahead by 1-5% at K 6 up to L 192)."""
    K = float(on.sum()) / max(1, on.shape[0])
    U = float(on.any(0).sum())
    return L * (U - K) >= GROUPING_MIN[learn] * K


def _forward_traced(w: Weights, q_in, k_in, v_in, m, on, mask4, causal, dropout_p, backend):
    """forward_sparse while torch.compile traces: no Python decision on the mask's values, so one
    graph serves every mask. The active heads come from sparse_ops.ops.plans (their count a
    symbol of the graph). Shared [H]: forward_shared on them. Per-sample [B, H]: one group of
    every sample, padded to the largest active count k (a padded slot projects head 0 and has
    gate 0, so the attention skips it and it adds exact zeros): B*k heads' projections run where
    eager's groups run sum(K_b), equal for a shared or top-k mask."""
    if m.dim() == 1:
        heads = kept_positions(on)
        gate = m.index_select(0, heads) if m.is_floating_point() else None
        return forward_shared(w, q_in, k_in, v_in, heads, gate, mask4, causal, dropout_p, backend)
    H, D = w.num_heads, w.head_dim
    B, L = q_in.shape[:2]
    dev = q_in.device
    idx, valid = kept_positions_per_row(on)
    k = valid.shape[1]
    heads = torch.where(valid, idx.view(B, k) - torch.arange(B, device=dev)[:, None] * H, 0)  # [B, k]
    ones = torch.ones((), dtype=q_in.dtype, device=dev)
    gate = torch.where(valid, m.gather(1, heads) if m.is_floating_point() else ones, 0)  # pads: 0
    comps = [None, None, None]
    for x, i, r in w.proj_groups(q_in, k_in, v_in):
        W, bias = w.in_proj(i, r)
        blocks = (torch.arange(r, device=dev)[None, :, None] * H + heads[:, None, :]).reshape(-1)
        (y,) = grouped_head_in_proj(x, W, bias, [None], [blocks], D)
        for j, c in enumerate(y.view(B, x.shape[1], r, k, D).unbind(2)):
            comps[i + j] = c.transpose(1, 2)  # [B, k, T, D]
    am = mask4
    if am is not None and am.shape[1] > 1:  # a per-head mask: each sample's own heads
        am = am.expand(B, *am.shape[1:])[torch.arange(B, device=dev)[:, None], heads]
    o = attend(comps[0], comps[1], comps[2], gate, am, causal, dropout_p, backend)
    o = o.transpose(1, 2).reshape(B, L, k * D)
    return grouped_head_out_proj([o], w.out_proj_weight, w.out_proj_bias, [None], [heads.reshape(-1)], B, D)


def forward_shared(w: Weights, q_in, k_in, v_in, heads, gate, mask4, causal, dropout_p, backend):
    """The heads in `heads` (sorted; None: all H; a list, or an int64 tensor while traced) for
    every sample; gate: None, [K] or [B, K]."""
    H, D = w.num_heads, w.head_dim
    dev = q_in.device
    B, L = q_in.shape[:2]
    traced = isinstance(heads, torch.Tensor)
    every = heads is None or (not traced and len(heads) == H)  # every head on: nothing to gather
    K = H if every else heads.shape[0] if traced else len(heads)
    h_t = None if every else heads if traced else torch.tensor(heads, dtype=torch.long, device=dev)
    comps = [None, None, None]
    for x, i, r in w.proj_groups(q_in, k_in, v_in):
        W, bias = w.in_proj(i, r)
        if every:
            blocks = None
        elif traced:
            blocks = (torch.arange(r, device=dev)[:, None] * H + heads[None, :]).reshape(-1)
        else:
            blocks = torch.tensor([c * H + h for c in range(r) for h in heads], dtype=torch.long, device=dev)
        y = head_in_proj(x, W, bias, blocks, D)
        # unbind, not r selects: its backward is one stack, where each select's backward would
        # zero-fill and copy a whole y-sized gradient.
        comps[i:i + r] = [c.transpose(1, 2) for c in y.view(B, x.shape[1], r, K, D).unbind(2)]  # [B, K, T, D]
    q, k, v = comps
    if not traced and K == 0:
        # Nothing runs; the empty weight slices (and the empty gate) stay in the graph so that the
        # parameters (and a gate that requires grad) get zero gradients, not None.
        o = q + (k.sum() + v.sum())
        if gate is not None:
            o = o * (gate.view(1, 0, 1, 1) if gate.dim() == 1 else gate.view(B, 0, 1, 1))
    else:
        am = mask4
        if am is not None and am.shape[1] > 1 and not every:
            am = am.index_select(1, h_t)
        o = attend(q, k, v, gate, am, causal, dropout_p, backend)
    o = o.transpose(1, 2).reshape(B, L, K * D)  # free: the attention's output is laid out [B, L, K, D]
    return head_out_proj(o, w.out_proj_weight, w.out_proj_bias, h_t, D)


def forward_per_sample(w: Weights, q_in, k_in, v_in, gate, on, mask4, causal, dropout_p, backend):
    """Samples grouped by their number K of active heads (on: bool [B, H]); gate: float [B, H] or None."""
    H, D = w.num_heads, w.head_dim
    B, L = q_in.shape[:2]
    dev = q_in.device
    rows = on.tolist()
    by_k = {}
    for b, row in enumerate(rows):
        by_k.setdefault(sum(row), []).append(b)
    groups = []  # (S_t or None, samples, K, heads per sample) for the groups that run something
    for K in sorted(by_k):
        samples = by_k[K]
        if K > 0:
            S_t = None if len(samples) == B else torch.tensor(samples, dtype=torch.long, device=dev)
            groups.append((S_t, samples, K, [[h for h, o in enumerate(rows[b]) if o] for b in samples]))
    samples_t = [S_t for S_t, _, _, _ in groups]
    comps = [[None] * len(groups) for _ in range(3)]
    for x, i, r in w.proj_groups(q_in, k_in, v_in):
        W, bias = w.in_proj(i, r)
        blocks = [torch.tensor([c * H + h for hs in heads for c in range(r) for h in hs], dtype=torch.long,
                               device=dev) for _, _, _, heads in groups]
        ys = grouped_head_in_proj(x, W, bias, samples_t, blocks, D)
        for g, ((_, smp, K, _), y) in enumerate(zip(groups, ys)):
            for j, c in enumerate(y.view(len(smp), x.shape[1], r, K, D).unbind(2)):
                comps[i + j][g] = c.transpose(1, 2)  # [n, K, T, D]
    os, out_heads = [], []
    for g, (S_t, smp, K, heads) in enumerate(groups):
        n = len(smp)
        am = mask4
        if am is not None:
            if am.shape[0] > 1 and S_t is not None:
                am = am.index_select(0, S_t)
            if am.shape[1] > 1:  # a per-head mask: each sample's own heads
                am = am.expand(n, *am.shape[1:])[torch.arange(n, device=dev)[:, None],
                                                 torch.tensor(heads, dtype=torch.long, device=dev)]
        gg = None
        if gate is not None:
            gs, ons = (gate, on) if S_t is None else (gate.index_select(0, S_t), on.index_select(0, S_t))
            gg = gs[ons].view(n, K)  # row-major: the order of `heads`
        o = attend(comps[0][g], comps[1][g], comps[2][g], gg, am, causal, dropout_p, backend)
        os.append(o.transpose(1, 2).reshape(n, L, K * D))  # free: the attention's output is laid out [n, L, K, D]
        out_heads.append(torch.tensor([h for hs in heads for h in hs], dtype=torch.long, device=dev))
    return grouped_head_out_proj(os, w.out_proj_weight, w.out_proj_bias, samples_t, out_heads, B, D)


def forward_dense(w: Weights, q_in, k_in, v_in, m, mask4, causal, dropout_p, need_weights, average, dense_grad,
                  backend):
    """Every head computed (not the fast path), as F.multi_head_attention_forward does, then the
    heads that are off selected away before out_proj (nothing of theirs, not even a NaN, reaches
    the output). Used for need_weights=True, add_bias_kv, add_zero_attn and dense_grad. Returned
    weights of heads that are off are zeros. The attention is masked_head_attention (dense_grad
    gives its exact gate gradient to skipped heads), except with need_weights=True (the weights
    are computed explicitly) and dropout > 0 in training (F.scaled_dot_product_attention)."""
    H, D = w.num_heads, w.head_dim
    B, L, _ = q_in.shape
    E = H * D
    comps = [None, None, None]
    for x, i, r in w.proj_groups(q_in, k_in, v_in):
        W, bias = w.in_proj(i, r)
        y = F.linear(x, W, bias).view(B, x.shape[1], r, H, D)
        for j in range(r):
            comps[i + j] = y[:, :, j].transpose(1, 2)  # [B, H, T, D]
    q, k, v = comps
    if w.bias_k is not None:
        k = torch.cat([k, w.bias_k.view(1, H, 1, D).expand(B, H, 1, D)], dim=2)
        v = torch.cat([v, w.bias_v.view(1, H, 1, D).expand(B, H, 1, D)], dim=2)
        mask4 = None if mask4 is None else F.pad(mask4, (0, 1))
    if w.add_zero_attn:
        k = torch.cat([k, k.new_zeros(B, H, 1, D)], dim=2)
        v = torch.cat([v, v.new_zeros(B, H, 1, D)], dim=2)
        mask4 = None if mask4 is None else F.pad(mask4, (0, 1))
    gated = m.is_floating_point()
    mb = m.view(-1, H, 1, 1) if m.dim() == 2 else m.view(1, H, 1, 1)
    on = (mb != 0) if gated else mb
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    wts = None
    if need_weights:
        s = (q * (1.0 / D) ** 0.5) @ k.transpose(-2, -1)
        if mask4 is not None:
            s = s + mask4
        p = torch.softmax(s, dim=-1)
        if dropout_p > 0.0:
            p = F.dropout(p, p=dropout_p)
        o = p @ v
        wts = torch.where(on, p * mb, zero) if gated else torch.where(on, p, zero)
        if average:
            wts = wts.mean(dim=1)
        o = torch.where(on, o * mb, zero) if gated else torch.where(on, o, zero)
    elif dropout_p == 0.0 and k.shape[2] > 0:
        # masked_head_attention takes the attention mask in SDPA's form (bool True = attend, or
        # additive float; ours is additive) and gives dense_grad's exact gate gradient.
        o = masked_head_attention(q, k, v, m, attn_mask=mask4, is_causal=causal, dense_grad=dense_grad,
                                  backend=backend)
    else:
        if dense_grad and gated and m.requires_grad:
            raise ValueError("SparseMultiheadAttention: dense_grad=True is not supported with dropout > 0 "
                             "in training (dropout)")
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask4, dropout_p=dropout_p, is_causal=causal)
        o = torch.where(on, o * mb, zero) if gated else torch.where(on, o, zero)
    out = F.linear(o.transpose(1, 2).reshape(B, L, E), w.out_proj_weight, w.out_proj_bias)
    return out, wts


__all__ = ["Weights", "attend", "forward_sparse", "forward_shared", "forward_per_sample", "forward_dense"]
