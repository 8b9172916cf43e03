"""SparseMultiheadAttention: equal to nn.MultiheadAttention with every head on, equal to its
head-masked reference (each head's attention output times its mask value before out_proj) with a
head mask, exact-zero gradients for heads that are off, gradcheck, NaN isolation, from_module,
state_dict round trips, gates and errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_ops
from sparse_ops.nn import SparseMultiheadAttention
from sparse_ops.nn import attention_paths


@pytest.fixture(params=["grouped", "union"])
def grouping(request, monkeypatch):
    """A per-sample head mask either way forward_sparse can run it: grouped per sample, or on the
    batch's union of heads with the mask as a gate (attention_paths.grouping_pays picks by shape)."""
    c = 0.0 if request.param == "grouped" else float("inf")
    monkeypatch.setattr(attention_paths, "GROUPING_MIN", {False: c, True: c})
    return request.param

E, H, B, L, S = 16, 4, 3, 5, 7
D = E // H
F32, F64 = torch.float32, torch.float64


def tol(dtype):
    return dict(rtol=1e-5, atol=2e-5) if dtype == F32 else dict(rtol=1e-9, atol=1e-10)


def make(dtype=F32, seed=0, **kw):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, dtype=dtype, **kw)
    with torch.no_grad():  # non-zero biases, so that bias handling is tested too
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    return mha, SparseMultiheadAttention.from_module(mha)


def inputs(batch_first, dtype=F32, self_attn=True, kdim=E, vdim=E, seed=1, batched=True):
    g = torch.Generator().manual_seed(seed)

    def t(T, d):
        shape = ((B, T, d) if batch_first else (T, B, d)) if batched else (T, d)
        return torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)

    q = t(L if not self_attn else S, E)
    if self_attn:
        return q, q, q
    return q, t(S, kdim), t(S, vdim)


def reference(mha, query, key, value, m=None, key_padding_mask=None, attn_mask=None, is_causal=False):
    """nn.MultiheadAttention's output with head h's attention output multiplied by m[b, h] (or m[h])
    before out_proj. F.multi_head_attention_forward with an identity out-projection gives the
    concatenated head outputs exactly (x @ I is exact); the mask and out_proj are applied here."""
    batched = query.dim() == 3
    if batched and mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    eye = torch.eye(E, dtype=query.dtype)
    same = mha._qkv_same_embed_dim
    heads, _ = F.multi_head_attention_forward(
        query, key, value, E, H, mha.in_proj_weight, mha.in_proj_bias, mha.bias_k, mha.bias_v,
        mha.add_zero_attn, 0.0, eye, None, training=False, key_padding_mask=key_padding_mask,
        need_weights=False, attn_mask=attn_mask, is_causal=is_causal, use_separate_proj_weight=not same,
        q_proj_weight=mha.q_proj_weight, k_proj_weight=mha.k_proj_weight, v_proj_weight=mha.v_proj_weight)
    Lq = heads.shape[0]
    hv = heads.reshape(Lq, -1, H, D)
    if m is not None:
        mm = m.to(heads.dtype) if m.dtype == torch.bool else m
        hv = hv * (mm.view(1, -1, H, 1) if mm.dim() == 2 else mm.view(1, 1, H, 1))
    out = F.linear(hv.reshape(heads.shape), mha.out_proj.weight, mha.out_proj.bias)
    if batched and mha.batch_first:
        out = out.transpose(0, 1)
    return out


def masks(dtype=F32, seed=2):
    g = torch.Generator().manual_seed(seed)
    bh = torch.tensor([[True, False, True, False], [False, True, True, True], [True, False, False, False]])
    sh = torch.tensor([False, True, True, False])
    gate_bh = (torch.rand(B, H, generator=g, dtype=dtype) + 0.5) * bh
    gate_sh = (torch.rand(H, generator=g, dtype=dtype) + 0.5) * sh
    return {
        "bool_BH": bh,  # K = 2, 3, 1: three per-sample groups
        "bool_BH_equalK": torch.tensor([[True, False, True, False], [False, True, True, False],
                                        [True, True, False, False]]),
        "bool_H": sh,
        "bool_BH_same_rows": sh.expand(B, H).clone(),
        "bool_BH_with_off_and_on_rows": torch.tensor([[False] * 4, [True] * 4, [True, False, False, True]]),
        "float_BH": gate_bh,
        "float_H": gate_sh,
        "float_BH_same_rows": gate_bh[0].expand(B, H).clone(),
        "float_H_no_zero": torch.rand(H, generator=g, dtype=dtype) + 0.5,
        "float_BH_no_zero": torch.rand(B, H, generator=g, dtype=dtype) + 0.5,
        "all_off_H": torch.zeros(H, dtype=torch.bool),
        "all_off_BH_float": torch.zeros(B, H, dtype=dtype),
    }


def grads(out, tensors, go):
    return torch.autograd.grad(out, tensors, go, allow_unused=True)


def params(mod):
    return [p for _, p in sorted(mod.named_parameters())]


def check_equal(mha, smha, q, k, v, m=None, dtype=F32, **kw):
    out = smha(q, k, v, need_weights=False, head_mask=m, **kw)[0]
    if m is None:
        ref = mha(q, k, v, need_weights=False, **kw)[0]
    else:
        ref = reference(mha, q, k, v, m, **kw)
    torch.testing.assert_close(out, ref, **tol(dtype))
    go = torch.randn_like(ref)
    ins = [t for t in {id(t): t for t in (q, k, v)}.values()]
    ga = grads(out, ins + params(smha), go)
    gb = grads(ref, ins + params(mha), go)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a,
                                   torch.zeros_like(a) if b is None else b, **tol(dtype))
    return out, ga


def attn_mask_cases(Lq, Sk, dtype=F32, seed=3):
    g = torch.Generator().manual_seed(seed)
    bool2 = torch.rand(Lq, Sk, generator=g) > 0.6
    bool2[:, 0] = False  # True = not allowed; keep one key per row
    bool3 = torch.rand(B * H, Lq, Sk, generator=g) > 0.6
    bool3[..., 1] = False
    kpm = torch.zeros(B, Sk, dtype=torch.bool)
    kpm[1, -2:] = True
    kpm[2, -1] = True
    return {
        "none": {},
        "kpm_bool": {"key_padding_mask": kpm},
        "kpm_float": {"key_padding_mask": torch.zeros(B, Sk, dtype=dtype).masked_fill(kpm, float("-inf"))},
        "attn_bool_2d": {"attn_mask": bool2},
        "attn_float_2d": {"attn_mask": torch.randn(Lq, Sk, generator=g, dtype=dtype)},
        "attn_bool_3d": {"attn_mask": bool3},
        "attn_float_3d_and_kpm": {"attn_mask": torch.randn(B * H, Lq, Sk, generator=g, dtype=dtype),
                                  "key_padding_mask": torch.zeros(B, Sk, dtype=dtype).masked_fill(kpm, -1e9)},
    }


# ------------------------------------------------------------------ every head on == nn.MultiheadAttention
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("am", list(attn_mask_cases(S, S)))
@pytest.mark.parametrize("head_mask", [None, "bool_all_on", "float_ones"])
def test_all_heads_on_equals_mha(batch_first, am, head_mask):
    mha, smha = make(batch_first=batch_first)
    q, k, v = inputs(batch_first)
    m = {None: None, "bool_all_on": torch.ones(B, H, dtype=torch.bool), "float_ones": torch.ones(H)}[head_mask]
    kw = attn_mask_cases(S, S)[am]
    out, _ = check_equal(mha, smha, q, k, v, m, **kw)
    if head_mask == "float_ones":  # the sparse code path (every head on, float gate): same as mha itself
        torch.testing.assert_close(out, mha(q, k, v, need_weights=False, **kw)[0], **tol(F32))


@pytest.mark.parametrize("kind", ["cross_kdim_vdim", "cross_same_dim", "no_bias", "key_is_value"])
@pytest.mark.parametrize("head_mask", [None, "float_ones", "bool_BH", "float_H"])
def test_configs_equal_reference(kind, head_mask):
    kw = {"cross_kdim_vdim": dict(kdim=6, vdim=10), "no_bias": dict(bias=False)}.get(kind, {})
    mha, smha = make(batch_first=True, **kw)
    q, k, v = inputs(True, self_attn=kind == "no_bias", kdim=kw.get("kdim", E), vdim=kw.get("vdim", E))
    if kind == "key_is_value":
        v = k
    m = None if head_mask is None else (torch.ones(H) if head_mask == "float_ones" else masks()[head_mask])
    check_equal(mha, smha, q, k, v, m)


@pytest.mark.parametrize("batch_first", [True, False])
def test_is_causal_with_attn_mask(batch_first):
    mha, smha = make(batch_first=batch_first)
    q, k, v = inputs(batch_first)
    causal = nn.Transformer.generate_square_subsequent_mask(S)
    for m in (None, masks()["bool_BH"], masks()["float_H"]):
        check_equal(mha, smha, q, k, v, m, attn_mask=causal, is_causal=True)
        # with a key_padding_mask the mask itself is used (as in nn.MultiheadAttention)
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, -1] = True
        check_equal(mha, smha, q, k, v, m, attn_mask=causal, is_causal=True, key_padding_mask=kpm)
    with pytest.raises(RuntimeError, match="attn_mask"):
        smha(q, k, v, is_causal=True, need_weights=False, head_mask=masks()["bool_H"])


@pytest.mark.parametrize("batch_first", [True, False])
def test_is_causal_hint_with_fewer_queries_than_keys(batch_first):
    """L < S: nn.MultiheadAttention replaces the mask by SDPA's top-left causal rule; the op refuses
    is_causal with L < S, so the module passes that top-left mask explicitly: the same result."""
    mha, smha = make(batch_first=batch_first)
    q, k, v = inputs(batch_first, self_attn=False)
    assert L < S
    causal = torch.ones(L, S, dtype=torch.bool).triu(S - L + 1)  # True = not allowed; bottom-right
    for m in (None, masks()["bool_BH"]):
        check_equal(mha, smha, q, k, v, m, attn_mask=causal, is_causal=True)


def test_unbatched_input():
    mha, smha = make(batch_first=True)
    q, k, v = inputs(True, batched=False)
    check_equal(mha, smha, q, k, v)
    m = torch.tensor([True, False, True, True])
    out = smha(q, k, v, need_weights=False, head_mask=m)[0]
    torch.testing.assert_close(out, reference(mha, q, k, v, m), **tol(F32))
    kpm = torch.zeros(S, dtype=torch.bool)
    kpm[-2:] = True
    out = smha(q, k, v, need_weights=False, head_mask=m, key_padding_mask=kpm)[0]
    torch.testing.assert_close(out, reference(mha, q, k, v, m, key_padding_mask=kpm), **tol(F32))


def test_need_weights_equals_mha_all_on():
    mha, smha = make(batch_first=True)
    q, k, v = inputs(True)
    for avg in (True, False):
        a = smha(q, k, v, average_attn_weights=avg)
        b = mha(q, k, v, average_attn_weights=avg)
        torch.testing.assert_close(a[0], b[0], **tol(F32))
        torch.testing.assert_close(a[1], b[1], **tol(F32))


# ------------------------------------------------------------------ head masks == head-masked reference
@pytest.mark.parametrize("mask", list(masks()))
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("am", ["none", "kpm_bool", "attn_bool_3d", "attn_float_3d_and_kpm"])
def test_head_mask_equals_reference(mask, batch_first, am, grouping):
    mha, smha = make(batch_first=batch_first)
    q, k, v = inputs(batch_first)
    m = masks()[mask]
    if m.is_floating_point():
        m = m.clone().requires_grad_()
    kw = attn_mask_cases(S, S)[am]
    out = smha(q, k, v, need_weights=False, head_mask=m, **kw)[0]
    m2 = m.detach().clone().requires_grad_(m.requires_grad)
    ref = reference(mha, q, k, v, m2, **kw)
    torch.testing.assert_close(out, ref, **tol(F32))
    go = torch.randn_like(ref)
    ins = [q] + params(smha) + ([m] if m.requires_grad else [])
    ins2 = [q] + params(mha) + ([m2] if m.requires_grad else [])
    ga, gb = grads(out, ins, go), grads(ref, ins2, go)
    if m.requires_grad:
        # Straight-through gate gradient (docs/design.md): exact where the head ran, 0 where it was skipped.
        gb = gb[:-1] + (torch.where(m.detach() != 0, gb[-1], 0.0),)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **tol(F32))
    # Heads that are off for every sample: exact-zero gradients of their rows and columns.
    on = (m != 0) if m.is_floating_point() else m
    off = ~on.reshape(-1, H).any(0)
    gW = dict(zip([n for n, _ in sorted(smha.named_parameters())], ga[1:]))
    assert (gW["in_proj_weight"].view(3, H, D, E)[:, off] == 0).all()
    assert (gW["in_proj_bias"].view(3, H, D)[:, off] == 0).all()
    assert (gW["out_proj.weight"].view(E, H, D)[:, off] == 0).all()


@pytest.mark.parametrize("mask", ["bool_BH", "float_H", "float_BH"])
def test_need_weights_with_head_mask(mask):
    mha, smha = make(batch_first=True)
    q, k, v = inputs(True)
    m = masks()[mask]
    out, w = smha(q, k, v, head_mask=m, average_attn_weights=False)
    torch.testing.assert_close(out, reference(mha, q, k, v, m), **tol(F32))
    _, w_ref = mha(q, k, v, average_attn_weights=False)
    mm = (m.float() if m.dtype == torch.bool else m)
    mm = mm.view(-1, H, 1, 1) if mm.dim() == 2 else mm.view(1, H, 1, 1)
    torch.testing.assert_close(w, w_ref * mm, **tol(F32))
    _, w_avg = smha(q, k, v, head_mask=m)
    torch.testing.assert_close(w_avg, (w_ref * mm).mean(1), **tol(F32))


@pytest.mark.parametrize("opt", [dict(add_bias_kv=True), dict(add_zero_attn=True),
                                 dict(add_bias_kv=True, add_zero_attn=True)])
def test_bias_kv_and_zero_attn_with_head_mask(opt):
    mha, smha = make(batch_first=False, **opt)
    q, k, v = inputs(False)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, -1] = True
    for m in (None, masks()["bool_BH"], masks()["float_H"]):
        check_equal(mha, smha, q, k, v, m, key_padding_mask=kpm)


def test_dropout_in_training_with_head_mask():
    mha, smha = make(batch_first=True, dropout=0.5)
    smha.train()
    q, k, v = inputs(True)
    m = masks()["bool_BH"]
    torch.manual_seed(0)
    out = smha(q, k, v, need_weights=False, head_mask=m)[0]
    out.sum().backward()
    off = ~m.any(0)
    assert (smha.in_proj_weight.grad.view(3, H, D, E)[:, off] == 0).all()
    # eval: no dropout, equal to the reference
    smha.eval()
    torch.testing.assert_close(smha(q, k, v, need_weights=False, head_mask=m)[0],
                               reference(mha, q, k, v, m), **tol(F32))


def test_dense_grad_gives_exact_gate_gradient_for_skipped_heads():
    mha, smha = make(batch_first=True)
    smha.dense_grad = True
    q, k, v = inputs(True)
    m = masks()["float_BH"].clone().requires_grad_()
    out = smha(q, k, v, need_weights=False, head_mask=m)[0]
    m2 = m.detach().clone().requires_grad_()
    ref = reference(mha, q, k, v, m2)
    torch.testing.assert_close(out, ref, **tol(F32))
    go = torch.randn_like(ref)
    (gm,) = torch.autograd.grad(out, [m], go)
    (gm2,) = torch.autograd.grad(ref, [m2], go)
    torch.testing.assert_close(gm, gm2, **tol(F32))  # skipped heads included
    assert (gm[m.detach() == 0] != 0).all()


# ------------------------------------------------------------------ gradcheck, NaN isolation
def test_gradcheck_float64(grouping):
    torch.manual_seed(0)
    e, h, b, t = 8, 2, 2, 3
    smha = SparseMultiheadAttention(e, h, batch_first=True, dtype=F64)
    x = torch.randn(b, t, e, dtype=F64, requires_grad=True)
    ps = params(smha)
    kpm = torch.tensor([[False, False, True], [False, False, False]])

    def f(m):
        def run(x, *w):
            with torch.nn.utils.stateless._reparametrize_module(
                    smha, dict(zip(sorted(n for n, _ in smha.named_parameters()), w))):
                return smha(x, x, x, need_weights=False, head_mask=m, key_padding_mask=kpm)[0]
        return run

    assert torch.autograd.gradcheck(f(torch.tensor([[True, False], [False, True]])), [x, *ps])
    assert torch.autograd.gradcheck(f(torch.tensor([False, True])), [x, *ps])
    gate = (torch.rand(b, h, dtype=F64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, g: smha(x, x, x, need_weights=False, head_mask=g)[0], [x, gate])
    gate = torch.tensor([[0.7, 0.0], [1.3, 0.4]], dtype=F64, requires_grad=True)  # per-sample, with a zero
    assert torch.autograd.gradcheck(lambda x: smha(x, x, x, need_weights=False, head_mask=gate)[0], [x])


@pytest.mark.parametrize("mask", ["bool_H", "float_H", "bool_BH_equalK", "bool_BH_two_groups"])
def test_nan_in_off_head_does_not_leak(mask, grouping):
    mha, smha = make(batch_first=True)
    two = torch.tensor([[True, False, True, False], [False, True, True, False], [True, False, False, False]])
    m = two if mask == "bool_BH_two_groups" else masks()[mask]
    on = (m != 0) if m.is_floating_point() else m
    off = (~on.reshape(-1, H).any(0)).nonzero().flatten()
    assert off.numel() > 0
    h = int(off[0])
    with torch.no_grad():
        smha.in_proj_weight.view(3, H, D, E)[:, h] = float("nan")
        smha.in_proj_bias.view(3, H, D)[:, h] = float("nan")
        smha.out_proj.weight.view(E, H, D)[:, h] = float("nan")
    q, _, _ = inputs(True)
    out = smha(q, q, q, need_weights=False, head_mask=m)[0]
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(q.grad).all()
    for name, p in smha.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert (smha.in_proj_weight.grad.view(3, H, D, E)[:, h] == 0).all()
    assert (smha.out_proj.weight.grad.view(E, H, D)[:, h] == 0).all()


def test_empty_batch_and_half_types():
    mha, smha = make(batch_first=True)
    x = torch.randn(0, S, E)
    for m in (torch.zeros(0, H), torch.ones(0, H, dtype=torch.bool), masks()["bool_H"]):
        assert smha(x, x, x, need_weights=False, head_mask=m)[0].shape == (0, S, E)
    q, _, _ = inputs(True)
    smha16 = SparseMultiheadAttention.from_module(mha).to(torch.bfloat16)
    for m in (masks()["bool_BH"], masks()["float_H"]):
        out = smha16(q.bfloat16(), q.bfloat16(), q.bfloat16(), need_weights=False, head_mask=m)[0]
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference(mha, q, q, q, m), rtol=0.05, atol=0.05)


def test_all_off_gives_bias_and_zero_grads_not_none():
    mha, smha = make(batch_first=True)
    q, _, _ = inputs(True)
    for m in (masks()["all_off_H"], masks()["all_off_BH_float"]):
        smha.zero_grad(set_to_none=True)
        out = smha(q, q, q, need_weights=False, head_mask=m)[0]
        torch.testing.assert_close(out, smha.out_proj.bias.expand_as(out).detach())
        out.sum().backward()
        assert (smha.in_proj_weight.grad == 0).all() and (smha.out_proj.weight.grad == 0).all()
        assert (smha.in_proj_bias.grad == 0).all()


# ------------------------------------------------------------------ construction, state_dict, gates, errors
def test_from_module_copies_and_state_dict_round_trip():
    mha, smha = make(batch_first=True, kdim=6, vdim=10)
    for (n1, p1), (n2, p2) in zip(sorted(mha.named_parameters()), sorted(smha.named_parameters())):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    assert smha.batch_first and smha.kdim == 6 and smha.vdim == 10
    # nn.MultiheadAttention -> Sparse and back, strictly
    fresh = SparseMultiheadAttention(E, H, batch_first=True, kdim=6, vdim=10)
    fresh.load_state_dict(mha.state_dict())
    back = nn.MultiheadAttention(E, H, batch_first=True, kdim=6, vdim=10)
    back.load_state_dict(fresh.state_dict())
    for (_, p1), (_, p2) in zip(sorted(mha.named_parameters()), sorted(back.named_parameters())):
        assert torch.equal(p1, p2)
    assert set(SparseMultiheadAttention(E, H).state_dict()) == set(nn.MultiheadAttention(E, H).state_dict())
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        SparseMultiheadAttention.from_module(nn.Linear(3, 3))


def test_learned_gates():
    for gate in ("hard_concrete", "threshold"):
        smha = SparseMultiheadAttention(E, H, batch_first=True, gate=gate)
        q, _, _ = inputs(True)
        out = smha(q, q, q, need_weights=False)[0]
        out.sum().backward()
        p = smha.gate.log_alpha if gate == "hard_concrete" else smha.gate_scores
        assert p.grad is not None and torch.isfinite(p.grad).all()
    # a callable gate (a per-sample router), combined with a per-call head_mask
    router = nn.Linear(E, H)
    mha, _ = make(batch_first=True)
    smha = SparseMultiheadAttention.from_module(
        mha, gate=lambda x: sparse_ops.gates.ste_threshold(router(x.mean(-2))))
    q, _, _ = inputs(True)
    hm = torch.tensor([True, True, False, True])
    out = smha(q, q, q, need_weights=False, head_mask=hm)[0]
    g = sparse_ops.gates.ste_threshold(router(q.mean(-2))) * hm
    torch.testing.assert_close(out, reference(mha, q, q, q, g), **tol(F32))
    out.sum().backward()
    assert router.weight.grad is not None
    # a module gate is registered: its parameters are the module's
    smha2 = SparseMultiheadAttention(E, H, gate=nn.Sequential(nn.Linear(E, H), nn.Sigmoid()))
    assert any(n.startswith("gate.") for n, _ in smha2.named_parameters())
    with pytest.raises(ValueError, match="gate"):
        SparseMultiheadAttention(E, H, gate="nope")


def test_bad_head_masks():
    _, smha = make(batch_first=True)
    q, _, _ = inputs(True)
    with pytest.raises(ValueError, match="head_mask"):
        smha(q, q, q, head_mask=torch.ones(B, H + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="head_mask"):
        smha(q, q, q, head_mask=torch.ones(B + 1, H, dtype=torch.bool))
    with pytest.raises(ValueError, match="head_mask"):
        smha(q, q, q, head_mask=torch.ones(1, B, H, dtype=torch.bool))
    with pytest.raises(TypeError, match="head_mask"):
        smha(q, q, q, head_mask=torch.ones(B, H, dtype=torch.int64))
    with pytest.raises(TypeError, match="head_mask"):
        smha(q, q, q, head_mask=[True] * H)
    with pytest.raises(ValueError, match="attn_mask"):
        smha(q, q, q, attn_mask=torch.zeros(S + 1, S, dtype=torch.bool), head_mask=masks()["bool_H"])
    with pytest.raises(ValueError, match="key_padding_mask"):
        smha(q, q, q, key_padding_mask=torch.zeros(B, S + 1, dtype=torch.bool), head_mask=masks()["bool_H"])


@pytest.mark.parametrize("mask", ["shared", "per_sample"])
def test_torch_compile_matches_eager(mask):
    """torch.compile runs the module (graph breaks allowed where the grouping depends on the
    mask's values) and gives eager's output and gradients."""
    torch._dynamo.reset()
    _, smha = make(batch_first=True)
    q, k, v = inputs(True)
    m = torch.tensor([True, False, True, True]) if mask == "shared" else \
        torch.tensor([[True, False, True, False], [False, False, False, True], [True, True, True, True]])
    out = smha(q, k, v, need_weights=False, head_mask=m)[0]
    g_eager = torch.autograd.grad(out.sum(), [q, smha.in_proj_weight, smha.out_proj.weight])
    compiled = torch.compile(smha)
    out_c = compiled(q, k, v, need_weights=False, head_mask=m)[0]
    torch.testing.assert_close(out_c, out, **tol(F32))
    g_c = torch.autograd.grad(out_c.sum(), [q, smha.in_proj_weight, smha.out_proj.weight])
    for a, b in zip(g_c, g_eager):
        torch.testing.assert_close(a, b, **tol(F32))


def test_grouping_pays_by_sequence_length_and_gradients():
    """Half of 12 heads per sample, every head in the batch's union: grouped per sample only for
    long enough sequences (from 64 tokens at this keep), as measured (attention_paths.grouping_pays)."""
    on = torch.zeros(4, 12, dtype=torch.bool)
    for b in range(4):
        on[b, torch.arange(6) * 2 + b % 2] = True
    assert on.any(0).all()
    for learn in (False, True):
        assert not attention_paths.grouping_pays(on, 48, learn)
        assert attention_paths.grouping_pays(on, 64, learn) and attention_paths.grouping_pays(on, 128, learn)
    on3 = on & (torch.arange(12) < 6)  # 3 heads per sample, union of 6: grouping saves less
    assert not attention_paths.grouping_pays(on3, 48, False) and attention_paths.grouping_pays(on3, 64, False)
