"""masked_head_attention: reference equality, gradients (STE gates, dense_grad), opcheck,
torch.compile, errors, and proof that pairs that are off are never computed."""
import pytest
import torch
import torch.nn.functional as F

import sparse_ops
from sparse_ops import reference as R
from sparse_ops.ops.heads import masked_head_attention as mha

from attention_data import attn_masks, check_off_pairs_untouched, head_masks, qkv

D64 = torch.float64


def check_close(a, b, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("mask_name", ["bool_BH", "bool_H", "float_BH", "float_H", "float_BH_nonzero",
                                       "all_on", "all_off", "single"])
@pytest.mark.parametrize("am_name", ["none", "key_padding", "bool_full", "float_TqTk", "float_H11Tk"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_fwd_bwd(dtype, mask_name, am_name, causal):
    B, H, D = 3, 4, 5
    Tq, Tk = (13, 7) if causal else (7, 13)  # is_causal needs Tq >= Tk
    q, k, v = qkv(B, H, Tq, Tk, D, dtype, grad=True)
    hm = head_masks(B, H, dtype)[mask_name]
    am = attn_masks(B, H, Tq, Tk, dtype)[am_name]
    gated = hm.is_floating_point()
    h1 = hm.clone().requires_grad_(gated)
    h2 = hm.clone().requires_grad_(gated)
    out = mha(q, k, v, h1, attn_mask=am, is_causal=causal)
    ref = R.masked_head_attention(q, k, v, h2, attn_mask=am, is_causal=causal)
    check_close(out, ref, dtype)
    go = torch.randn_like(ref)
    ins = [q, k, v] + ([h1] if gated else [])
    ins2 = [q, k, v] + ([h2] if gated else [])
    for a, b in zip(torch.autograd.grad(out, ins, go), torch.autograd.grad(ref, ins2, go)):
        check_close(a, b, dtype)
    # Pairs that are off: exact zeros in the output and the q/k/v gradients.
    run = (hm != 0) if gated else hm
    off = ~run.expand(B, H)
    assert (out.detach()[off] == 0).all()


def test_matches_plain_sdpa_times_mask():
    """The issue's reference: F.scaled_dot_product_attention(...) * m[..., None, None]."""
    B, H, T, D = 2, 3, 16, 32
    q, k, v = qkv(B, H, T, T, D)
    m = torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 1.0]])
    pad = torch.ones(B, 1, 1, T, dtype=torch.bool)
    pad[1, ..., -5:] = False
    for am, causal in ((None, True), (pad, False)):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=am, is_causal=causal) * m[..., None, None]
        check_close(sparse_ops.masked_head_attention(q, k, v, m, attn_mask=am, is_causal=causal), ref,
                    torch.float32)


@pytest.mark.parametrize("D", [32, 64, 80, 128, 5, 7])
@pytest.mark.parametrize("T", [7, 13, 64])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_head_dims_and_layouts(D, T, layout):
    B, H = 2, 3
    q, k, v = qkv(B, H, T, T + 3, D, layout=layout)
    hm = head_masks(B, H, torch.float32)["bool_BH"]
    check_close(mha(q, k, v, hm, scale=0.3), R.masked_head_attention(q, k, v, hm, scale=0.3), torch.float32)


@pytest.mark.parametrize("Tq,Tk,causal,am_kind", [
    (130, 1100, False, "bool"),    # 3 query blocks x 3 key blocks: online-softmax rescaling
    (1030, 1030, True, "float"),   # causal across key blocks, per-head additive mask
    (600, 513, True, "pad_front"), # rows fully masked by padding + causality (0 out, 0 grad)
    (1, 600, False, "none"),       # decode: one query row
])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_many_query_and_key_blocks(Tq, Tk, causal, am_kind, layout):
    """The CPU forward tiles queries by 64 and keys by 512 (online softmax across key blocks)."""
    B, H, D = 2, 3, 12
    q, k, v = qkv(B, H, Tq, Tk, D, D64, layout=layout, grad=True)
    hm = head_masks(B, H, D64)["float_BH"].requires_grad_()
    g = torch.Generator().manual_seed(3)
    am = None
    if am_kind == "bool":
        am = torch.rand(B, 1, Tq, Tk, generator=g) > 0.2
        am[0, 0, 3] = False  # one fully masked query row
    elif am_kind == "float":
        am = torch.randn(1, H, 1, Tk, generator=g, dtype=D64)
    elif am_kind == "pad_front":
        am = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
        am[0, ..., :40] = False  # with causality, query rows < 40 of sample 0 see no key
    out = mha(q, k, v, hm, attn_mask=am, is_causal=causal)
    hm2 = hm.detach().clone().requires_grad_()
    ref = R.masked_head_attention(q, k, v, hm2, attn_mask=am, is_causal=causal)
    check_close(out, ref, D64)
    go = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, [q, k, v, hm], go), torch.autograd.grad(ref, [q, k, v, hm2], go)):
        check_close(a, b, D64)
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    am32 = am.float() if am is not None and am.is_floating_point() else am
    check_close(mha(q32, k32, v32, hm.detach().float(), attn_mask=am32, is_causal=causal),
                ref.detach().float(), torch.float32)


@pytest.mark.parametrize("Tq,Tk,am_kind", [(1100, 130, "none"), (1030, 1030, "float"), (513, 70, "pad_front")])
@pytest.mark.parametrize("mask", ["bool", "gate"])
def test_every_pair_causal(Tq, Tk, am_kind, mask):
    """Every pair on with is_causal: the CPU forward runs its direct kernel (not ATen's flash), the
    backward ATen's flash backward on its lse; both equal the reference, fully masked rows included."""
    B, H, D = 2, 3, 12
    q, k, v = qkv(B, H, Tq, Tk, D, D64, layout="bthd", grad=True)
    g = torch.Generator().manual_seed(4)
    hm = torch.ones(B, H, dtype=torch.bool) if mask == "bool" else \
        (torch.rand(B, H, generator=g, dtype=D64) + 0.5).requires_grad_()
    am = None
    if am_kind == "float":
        am = torch.randn(1, H, 1, Tk, generator=g, dtype=D64)
    elif am_kind == "pad_front":
        am = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
        am[0, ..., :40] = False  # with causality, query rows < 40 of sample 0 see no key
    out = mha(q, k, v, hm, attn_mask=am, is_causal=True)
    hm2 = hm.detach().clone().requires_grad_(hm.requires_grad)
    ref = R.masked_head_attention(q, k, v, hm2, attn_mask=am, is_causal=True)
    check_close(out, ref, D64)
    go = torch.randn_like(ref)
    ins, ins2 = [q, k, v] + ([hm] if hm.requires_grad else []), [q, k, v] + ([hm2] if hm.requires_grad else [])
    for a, b in zip(torch.autograd.grad(out, ins, go), torch.autograd.grad(ref, ins2, go)):
        check_close(a, b, D64)


def test_strided_and_broadcast_inputs():
    """k and v expanded over heads (stride 0) and a non-contiguous q are read correctly."""
    B, H, T, D = 2, 4, 9, 6
    q = torch.randn(B, H, T, 2 * D, dtype=D64)[..., ::2]  # unit stride lost on D
    kv = torch.randn(B, 1, T, D, dtype=D64)
    k, v = kv.expand(B, H, T, D), (kv * 2).expand(B, H, T, D)
    hm = head_masks(B, H, D64)["bool_BH"]
    check_close(mha(q, k, v, hm), R.masked_head_attention(q, k, v, hm), D64)


def test_empty_batch_and_zero_queries():
    q, k, v = qkv(0, 4, 7, 9, 8, grad=True)
    out = mha(q, k, v, torch.ones(0, 4, dtype=torch.bool))
    assert out.shape == (0, 4, 7, 8)
    out.sum().backward()
    q, k, v = qkv(2, 3, 0, 5, 8)
    assert mha(q, k, v, torch.ones(3, dtype=torch.bool)).shape == (2, 3, 0, 8)


def test_gradcheck_float64():
    B, H, Tq, Tk, D = 2, 3, 6, 5, 4
    q, k, v = qkv(B, H, Tq, Tk, D, D64, grad=True)
    on = torch.tensor([[True, False, True], [False, True, True]])
    pad = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    pad[1, ..., -2:] = False
    assert torch.autograd.gradcheck(lambda q, k, v: mha(q, k, v, on, attn_mask=pad), [q, k, v])
    assert torch.autograd.gradcheck(lambda q, k, v: mha(q, k, v, on, is_causal=True), [q, k, v])
    # Gates without zeros: exact gradient everywhere.
    gate = (torch.rand(B, H, dtype=D64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, g: mha(q, k, v, g), [q, k, v, gate])
    shared = (torch.rand(H, dtype=D64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, g: mha(q, k, v, g, is_causal=True), [q, k, v, shared])
    # Gates with zeros: the straight-through gradient is the true one only with dense_grad=True.
    gz = torch.tensor([[0.7, 0.0, 1.2], [0.0, 0.9, 0.4]], dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, g: mha(q, k, v, g, dense_grad=True), [q, k, v, gz])


def test_gate_gradient_of_skipped_pairs():
    B, H, T, D = 2, 3, 5, 4
    q, k, v = qkv(B, H, T, T, D, D64)
    gz = torch.tensor([[0.7, 0.0, 1.2], [0.0, 0.9, 0.4]], dtype=D64)
    go = torch.randn(B, H, T, D, dtype=D64)
    raw = F.scaled_dot_product_attention(q, k, v)
    want = (go * raw).sum((2, 3))
    for dense in (False, True):
        g = gz.clone().requires_grad_()
        (mha(q, k, v, g, dense_grad=dense) * go).sum().backward()
        exp = want if dense else torch.where(gz != 0, want, torch.zeros(()))
        torch.testing.assert_close(g.grad, exp)


def test_opcheck():
    B, H, Tq, Tk, D = 2, 3, 7, 5, 8
    q, k, v = qkv(B, H, Tq, Tk, D, grad=True)
    on = torch.tensor([[True, False, True], [False, True, True]])
    gate = torch.tensor([[0.5, 0.0, 1.5], [1.0, 0.25, 0.0]], requires_grad=True)
    pad = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    pad[0, ..., -2:] = False
    op = torch.ops.sparse_ops.masked_head_attention.default
    for hm, am, causal, dg in ((on, None, False, False), (on, pad, True, False), (gate, None, False, False),
                               (gate, pad, False, True), (torch.ones(H, dtype=torch.bool), None, True, False),
                               (torch.zeros(B, H, dtype=torch.bool), None, False, False)):
        torch.library.opcheck(op, (q, k, v, hm, am, causal, None, dg))


def test_compile_runs_and_matches():
    B, H, T, D = 2, 4, 9, 16
    q, k, v = qkv(B, H, T, T, D, grad=True)
    gate = torch.tensor([[1.0, 0.0, 0.5, 2.0], [0.0, 1.0, 1.0, 0.0]], requires_grad=True)

    def f(q, k, v, g):
        return sparse_ops.masked_head_attention(q, k, v, g, is_causal=True).sum(1)

    cf = torch.compile(f, fullgraph=True)
    out = cf(q, k, v, gate)
    ref = R.masked_head_attention(q, k, v, gate, is_causal=True).sum(1)
    check_close(out, ref, torch.float32)
    out.sum().backward()
    gq = q.grad.clone()
    q.grad = None
    ref.sum().backward()
    check_close(gq, q.grad, torch.float32)


def test_off_pairs_are_never_computed():
    """NaN planted in the q/k/v of pairs that are off reaches neither the output nor any gradient."""
    B, H, T, D = 2, 3, 6, 8
    on = torch.tensor([[True, False, True], [False, True, False]])
    check_off_pairs_untouched(mha, *qkv(B, H, T, T, D), on, (on, on.float() * 0.5))


def test_torch_backend_matches():
    B, H, T, D = 2, 3, 6, 8
    q, k, v = qkv(B, H, T, T, D)
    hm = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])
    check_close(mha(q, k, v, hm, backend="torch"), mha(q, k, v, hm, backend="cpp"), torch.float32)


@pytest.mark.parametrize("args, match", [
    (lambda q, k, v, m: (q[0], k, v, m), r"q must be 4-D"),
    (lambda q, k, v, m: (q, k[:, :2], v, m), r"k must be \[B, H, Tk, D\]"),
    (lambda q, k, v, m: (q, k, v[..., :3], m), r"v must be shaped like k"),
    (lambda q, k, v, m: (q, k.double(), v, m), r"k must have the same dtype as q"),
    (lambda q, k, v, m: (q, k, v, m[:, :2]), r"head_mask must be \[B, H\]"),
    (lambda q, k, v, m: (q, k, v, m.long()), r"head_mask must be bool or floating"),
    (lambda q, k, v, m: (q.long(), k, v, m), r"q must be a floating tensor"),
    (lambda q, k, v, m: (q, k, v, "x"), r"head_mask must be a torch.Tensor"),
])
def test_errors_name_the_argument(args, match):
    q, k, v = qkv(2, 3, 5, 5, 4)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        mha(*args(q, k, v, m))


def test_errors_from_the_op():
    q, k, v = qkv(2, 3, 5, 6, 4)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"attn_mask must be broadcastable to \[B, H, Tq, Tk\]"):
        mha(q, k, v, m, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"attn_mask must be bool or have q's dtype"):
        mha(q, k, v, m, attn_mask=torch.ones(5, 6, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"head_mask must be bool or have q's dtype"):
        torch.ops.sparse_ops.masked_head_attention(q, k, v, m.double(), None, False, None, False)
    with pytest.raises(ValueError, match=r"k must be on the same device as q"):
        mha(q, k.to("meta"), v, m)


@pytest.mark.parametrize("backend", ["cpp", "torch", "triton", "raw op"])
def test_causal_with_fewer_queries_than_keys_is_refused(backend):
    """is_causal is top-left aligned (SDPA's); with Tq < Tk (a KV cache) that would hide the cached
    keys, so every backend and the raw op refuse it, saying what to pass instead."""
    if backend == "triton":
        pytest.importorskip("triton")
    q, k, v = qkv(2, 3, 1, 9, 8)
    on = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises((ValueError, RuntimeError), match=r"is_causal=True needs Tq >= Tk; got Tq = 1 < Tk = 9"
                                                         r".*is_causal=False"):
        if backend == "raw op":
            torch.ops.sparse_ops.masked_head_attention(q, k, v, on, None, True, None, False)
        else:
            mha(q, k, v, on, is_causal=True, backend=backend)
    # decode with a cache: is_causal=False is the right call (the one query sees every key)
    torch.testing.assert_close(mha(q, k, v, on), R.masked_head_attention(q, k, v, on))
