"""The CUDA kernels (csrc/cuda) on a GPU: gated_ffn decode and gathered paths, weight-gradient
scatter, and the row ops of skip_layer, against the reference. Skipped without a CUDA device
(CI has none; the GPU machine runs them), and without CUDA kernels in the build."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparse_ops
from sparse_ops import backend

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if not backend.has_kernel("gated_ffn", "CUDA"):
    pytest.skip("sparse_ops._C was built without CUDA kernels (FORCE_CUDA=1 to build them)",
                allow_module_level=True)

DEV = "cuda"


def make(N, d=40, F=77, w2t=False, glu=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(DEV).requires_grad_()
    return t(N, d), {"w1": t(F, d), "w2": t(F, d) if w2t else t(d, F), "w3": t(F, d) if glu else None,
                     "b1": t(F), "b2": t(d)}


def run(backend_name, x, p, active, gate, w2t, **kw):
    return sparse_ops.gated_ffn(x, p["w1"], p["w2"], active, b1=p["b1"], b2=p["b2"], w3=p["w3"], gate=gate,
                                w2_transposed=w2t, backend=backend_name, **kw)


@pytest.mark.parametrize("N", [1, 4, 16, 40])
@pytest.mark.parametrize("w2t", [False, True])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("form", ["none", "idx", "bool", "per_row", "gate", "off"])
def test_gated_ffn_cuda_matches_reference(N, w2t, glu, form):
    x, p = make(N, w2t=w2t, glu=glu)
    g = torch.Generator().manual_seed(1)
    active = {"idx": torch.tensor([0, 5, 9, 76]), "bool": torch.rand(77, generator=g) > 0.5,
              "per_row": torch.rand(N, 77, generator=g) > 0.5,
              "off": torch.zeros(77, dtype=torch.bool)}.get(form)
    active = active.to(DEV) if active is not None else None
    gate = None
    if form == "gate":
        gate = (torch.rand(77, generator=g, dtype=torch.float64) *
                (torch.rand(77, generator=g) > 0.3)).to(DEV).requires_grad_()
    out = run("cuda", x, p, active, gate, w2t)
    ref = run("torch", x, p, active, gate, w2t)
    torch.testing.assert_close(out, ref)
    params = [x] + [v for v in p.values() if v is not None] + ([gate] if gate is not None else [])
    gy = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, gy), torch.autograd.grad(ref, params, gy)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N", [4, 64])
def test_gated_ffn_cuda_low_precision(dtype, N):
    x, p = make(N, d=256, F=512, w2t=True, dtype=dtype)
    m = (torch.rand(512, generator=torch.Generator().manual_seed(2)) > 0.5).to(DEV)
    out = run("cuda", x, p, m, None, True)
    ref = run("torch", x.double(), {k: (v.double() if v is not None else None) for k, v in p.items()}, m, None, True)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_planted_nan_cuda():
    x, p = make(4, w2t=True, glu=True)
    m = (torch.rand(77, generator=torch.Generator().manual_seed(3)) > 0.5).to(DEV)
    with torch.no_grad():
        for k in ("w1", "w3", "w2"):
            p[k][~m] = float("nan")
    out = run("cuda", x, p, m, None, True)
    grads = torch.autograd.grad(out.sum(), [x, p["w1"], p["w2"]])
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def test_rows_cuda_match_cpu():
    x = torch.randn(9, 3, 5, dtype=torch.float64)
    idx = torch.tensor([4, -1, 0, 8])
    src = torch.randn(4, 3, 5, dtype=torch.float64)
    gate = torch.rand(4, dtype=torch.float64)
    for fn, args in ((torch.ops.sparse_ops.gather_rows, (x, idx)),
                     (torch.ops.sparse_ops.scatter_rows, (x, idx, src, gate)),
                     (torch.ops.sparse_ops.scatter_rows, (x, idx, src, None))):
        torch.testing.assert_close(fn(*[a.to(DEV) if a is not None else None for a in args]).cpu(), fn(*args))
    xg, sg, gg = (t.to(DEV).requires_grad_() for t in (x, src, gate))
    y = torch.ops.sparse_ops.scatter_rows(xg, idx.to(DEV), sg, gg)
    assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.sparse_ops.scatter_rows(a, idx.to(DEV), b, c),
                                    [xg, sg, gg])
    assert y.is_cuda


def test_opcheck_cuda():
    x, p = make(4, w2t=True)
    args = (x, p["w1"], p["w2"], p["b1"], p["b2"], None, torch.tensor([1, 2, 30], device=DEV), None, "gelu", True,
            False)
    torch.library.opcheck(torch.ops.sparse_ops.gated_ffn.default, args)


# ---------------------------------------------------------------- gated_ffn: shapes and forms the CPU never sees
class _OpsRan(TorchDispatchMode):
    """Records the names of the sparse_ops ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "sparse_ops":
            self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _ffn_case(case, be):
    """(x, params, active, gate, w2_transposed, dtype) of one GPU finding."""
    g = torch.Generator().manual_seed(7)
    dtype, N, d, F, w2t = torch.float32, 4, 96, 200, True
    if case == "wide_d":
        d = 1536
    elif case == "bf16_w2_dF":
        dtype, N, d, F, w2t = torch.bfloat16, 16, 512, 1024, False
    elif case == "large":
        dtype, N, d, F = torch.bfloat16, 8, 4096, 11008
    x, p = make(N, d=d, F=F, w2t=w2t, glu=case in ("large", "strided_w"), dtype=dtype, seed=3)
    active = (torch.rand(F, generator=g) > 0.5).to(DEV)
    gate = None
    if case == "scalar_gate":
        gate = torch.tensor(0.5, dtype=dtype, device=DEV)
    elif case == "row_gate":
        gate = torch.rand(N, 1, generator=g, dtype=torch.float64).to(dtype).to(DEV).requires_grad_()
    elif case == "strided_w":
        with torch.no_grad():  # w1 [F, d] as the transpose of a [d, F] tensor; w2 likewise
            p["w1"] = p["w1"].detach().t().contiguous().t().requires_grad_()
            p["w2"] = p["w2"].detach().t().contiguous().t().requires_grad_()
        assert not p["w1"].is_contiguous() and not p["w2"].is_contiguous()
    elif case == "masked_rows":
        active = (torch.rand(N, F, generator=g) > 0.5).to(DEV)
        active[1] = False  # a row with every column off: its output is b2 alone
    return x, p, active, gate, w2t, dtype


@pytest.mark.parametrize("be", ["cuda", "triton"])
@pytest.mark.parametrize("case", ["wide_d", "bf16_w2_dF", "scalar_gate", "row_gate", "strided_w", "masked_rows",
                                  "large"])
def test_gated_ffn_gpu_forms(be, case):
    """d > 1024, bf16 with w2 in [d, F], a scalar and an [N, 1] gate, strided weights, a row with every
    column off, and one large bf16 shape (d 4096, F 11008): output and gradients against the reference
    in float64 (the large shape: output only)."""
    x, p, active, gate, w2t, dtype = _ffn_case(case, be)
    out = run(be, x, p, active, gate, w2t)
    p64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in p.items()}
    x64 = x.detach().double().requires_grad_()
    g64 = gate.detach().double().requires_grad_(gate.requires_grad) if gate is not None else None
    ref = run("torch", x64, p64, active, g64, w2t)
    tol = 2e-4 if dtype == torch.float32 else 5e-2

    def close(a, b):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))

    close(out, ref)
    if case == "masked_rows":
        torch.testing.assert_close(out[1].double(), p64["b2"].detach())
    if case == "large":
        return
    ins = [x] + [v for v in p.values() if v is not None] + ([gate] if gate is not None and gate.requires_grad else [])
    ins64 = [x64] + [v for v in p64.values() if v is not None] + ([g64] if g64 is not None and g64.requires_grad else [])
    go = torch.randn(ref.shape, dtype=torch.float64, device=DEV)
    for a, b in zip(torch.autograd.grad(out, ins, go.to(dtype)), torch.autograd.grad(ref, ins64, go)):
        close(a, b)


def test_auto_picks_triton_for_decode_on_cuda():
    """auto on CUDA: decode (<= 16 rows) runs the Triton split-K GEMV, more rows the CUDA op (the
    choice sparse_ops.info() reports under auto / cuda decode)."""
    if not backend.usable("triton", "gated_ffn", "cuda")[0]:
        pytest.skip("triton is not usable on this CUDA device")
    for N, want in ((1, "gated_ffn_triton"), (16, "gated_ffn_triton"), (17, "gated_ffn")):
        x, p = make(N, d=64, F=128, w2t=True)
        with torch.no_grad(), _OpsRan() as ran:
            run("auto", x, p, torch.tensor([3, 9, 40], device=DEV), None, True)
        assert ran.names == [want], (N, ran.names)
    assert "triton" in sparse_ops.info()["auto"]["cuda decode"]


@pytest.mark.parametrize("be", ["cuda", "triton"])
def test_int64_indices_never_synchronise(be):
    """gated_ffn with int64 active (forward and backward) and the row ops with int64 idx run with
    CUDA's sync debug mode set to error: not one host synchronisation."""
    x, p = make(8, d=64, F=128, w2t=True)
    active = torch.tensor([5, 1, 77, 30], device=DEV)
    xr, src = torch.randn(9, 4, device=DEV), torch.randn(3, 4, device=DEV)
    idx = torch.tensor([4, -1, 0], device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run(be, x, p, active, None, True)
        out.sum().backward()
        if be == "cuda":
            torch.ops.sparse_ops.gather_rows(xr, idx)
            torch.ops.sparse_ops.scatter_rows(xr, idx, src, None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


# ---------------------------------------------------------------- masked_head_attention
# csrc/cuda/heads_kernels.cu (forward) and heads_cuda.cpp (ATen backward) against the reference.
from sparse_ops import reference as R  # noqa: E402

from attention_data import attn_masks, head_masks, qkv  # noqa: E402

D64 = torch.float64
needs_heads = pytest.mark.skipif(not backend.has_kernel("masked_head_attention", "CUDA"),
                                 reason="sparse_ops._C has no CUDA kernel for masked_head_attention")


def mha_cuda(q, k, v, hm, **kw):
    return sparse_ops.masked_head_attention(q, k, v, hm, backend="cuda", **kw)


def mha_qkv(B, H, Tq, Tk, D, dtype=D64, layout="bhtd", seed=0, grad=True):
    return qkv(B, H, Tq, Tk, D, dtype, layout, seed, grad, device=DEV)


def mha_head_masks(B, H, dtype, seed=0):
    return head_masks(B, H, dtype, seed, device=DEV)


def mha_attn_masks(B, H, Tq, Tk, dtype, seed=1):
    return attn_masks(B, H, Tq, Tk, dtype, seed, device=DEV)


def mha_grads(out, ins, go):
    return torch.autograd.grad(out, ins, go)


@needs_heads
@pytest.mark.parametrize("shape", [(3, 4, 7, 13, 5), (2, 3, 37, 20, 16), (2, 2, 5, 70, 33)])
@pytest.mark.parametrize("mask_name", ["bool_BH", "bool_H", "float_BH", "float_H", "float_BH_nonzero",
                                       "all_on", "all_off", "single"])
@pytest.mark.parametrize("am_name", ["none", "key_padding", "bool_full", "float_TqTk", "float_H11Tk"])
@pytest.mark.parametrize("causal", [False, True])
def test_mha_cuda_matches_reference(shape, mask_name, am_name, causal):
    """float64: every head-mask form ([B, H] / [H], bool / float), every attention-mask form, causal,
    Tq != Tk (both ways), several query blocks and key tiles; output and q/k/v/gate gradients."""
    B, H, Tq, Tk, D = shape
    q, k, v = mha_qkv(B, H, Tq, Tk, D)
    hm = mha_head_masks(B, H, D64)[mask_name]
    am = mha_attn_masks(B, H, Tq, Tk, D64)[am_name]
    gated = hm.is_floating_point()
    h1, h2 = hm.clone().requires_grad_(gated), hm.clone().requires_grad_(gated)
    out = mha_cuda(q, k, v, h1, attn_mask=am, is_causal=causal)
    ref = R.masked_head_attention(q, k, v, h2, attn_mask=am, is_causal=causal)
    assert out.is_cuda and out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    run = ((hm != 0) if gated else hm).expand(B, H)
    assert (out.detach()[~run] == 0).all()
    go = torch.randn_like(ref)
    ins1 = [q, k, v] + ([h1] if gated else [])
    ins2 = [q, k, v] + ([h2] if gated else [])
    for a, b in zip(mha_grads(out, ins1, go), mha_grads(ref, ins2, go)):
        torch.testing.assert_close(a, b)


@needs_heads
@pytest.mark.parametrize("D", [32, 64, 80, 128, 7, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
@pytest.mark.parametrize("TqTk", [(33, 45), (1, 300)])
def test_mha_cuda_head_dims_and_dtypes(D, dtype, layout, TqTk):
    """Low precision against a float64 reference: output and gradients (float gate, causal, padding)."""
    B, H = 2, 3
    Tq, Tk = TqTk
    q, k, v = mha_qkv(B, H, Tq, Tk, D, dtype, layout=layout)
    gate = torch.tensor([[0.5, 0.0, 1.5], [1.0, 0.25, 0.0]], dtype=dtype, device=DEV, requires_grad=True)
    pad = torch.ones(B, 1, 1, Tk, dtype=torch.bool, device=DEV)
    pad[1, ..., -3:] = False
    causal = Tq > 1  # decode (Tq = 1): no causal bound, every one of the 300 keys counts
    out = mha_cuda(q, k, v, gate, attn_mask=pad, is_causal=causal)
    assert out.dtype == dtype
    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v, gate)]
    ref = R.masked_head_attention(*ins64, attn_mask=pad, is_causal=causal)
    tol = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]

    def close(a, b):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))

    close(out, ref)
    assert (out.detach()[gate.detach() == 0] == 0).all()
    go = torch.randn(ref.shape, dtype=D64, device=DEV)
    for a, b in zip(mha_grads(out, [q, k, v, gate], go.to(dtype)), mha_grads(ref, ins64, go)):
        close(a, b)


@needs_heads
@pytest.mark.parametrize("dtype", [D64, torch.float32, torch.float16, torch.bfloat16])
def test_mha_cuda_matches_cpu_op(dtype):
    """Every returned tensor (out, pairs, out_c, lse) as the CPU op returns it, layouts included."""
    B, H, Tq, Tk, D = 2, 3, 9, 12, 16
    q, k, v = mha_qkv(B, H, Tq, Tk, D, dtype, layout="bthd", grad=False)
    gate = torch.tensor([[0.5, 0.0, 1.5], [1.0, 0.25, 0.0]], dtype=dtype, device=DEV)
    pad = torch.ones(B, 1, 1, Tk, dtype=torch.bool, device=DEV)
    pad[0, ..., -4:] = False
    op = torch.ops.sparse_ops.masked_head_attention
    for hm in (gate, gate != 0):
        gpu = op(q, k, v, hm, pad, True, 0.3, False)
        cpu = op(q.cpu(), k.cpu(), v.cpu(), hm.cpu(), pad.cpu(), True, 0.3, False)
        tol = 1e-5 if dtype in (D64, torch.float32) else 2e-2
        for a, b in zip(gpu, cpu):
            assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
            torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)
        assert gpu[0].stride() == torch.empty_like(q).stride()
        assert gpu[3].dtype == (dtype if dtype in (D64, torch.float32) else torch.float32)


@needs_heads
def test_mha_cuda_gradcheck():
    B, H, Tq, Tk, D = 2, 3, 5, 6, 4
    q, k, v = mha_qkv(B, H, Tq, Tk, D)
    on = torch.tensor([[True, False, True], [False, True, True]], device=DEV)
    pad = torch.ones(B, 1, 1, Tk, dtype=torch.bool, device=DEV)
    pad[1, ..., -2:] = False
    assert torch.autograd.gradcheck(lambda q, k, v: mha_cuda(q, k, v, on, attn_mask=pad), [q, k, v])
    assert torch.autograd.gradcheck(lambda q, k, v: mha_cuda(q, k, v, on, is_causal=True), [q, k, v])
    gate = (torch.rand(B, H, dtype=D64, device=DEV) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, g: mha_cuda(q, k, v, g), [q, k, v, gate])
    shared = (torch.rand(H, dtype=D64, device=DEV) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, g: mha_cuda(q, k, v, g, is_causal=True), [q, k, v, shared])
    gz = torch.tensor([[0.7, 0.0, 1.2], [0.0, 0.9, 0.4]], dtype=D64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, g: mha_cuda(q, k, v, g, dense_grad=True), [q, k, v, gz])


@needs_heads
def test_mha_cuda_skipped_gate_gradient():
    B, H, T, D = 2, 3, 5, 4
    q, k, v = mha_qkv(B, H, T, T, D, grad=False)
    gz = torch.tensor([[0.7, 0.0, 1.2], [0.0, 0.9, 0.4]], dtype=D64, device=DEV)
    go = torch.randn(B, H, T, D, dtype=D64, device=DEV)
    want = (go * torch.nn.functional.scaled_dot_product_attention(q, k, v)).sum((2, 3))
    for dense in (False, True):
        g = gz.clone().requires_grad_()
        (mha_cuda(q, k, v, g, dense_grad=dense) * go).sum().backward()
        torch.testing.assert_close(g.grad, want if dense else torch.where(gz != 0, want, torch.zeros((), device=DEV)))


@needs_heads
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mha_cuda_planted_nan(dtype):
    """NaN planted in the q/k/v of pairs that are off reaches neither the output nor any gradient."""
    B, H, T, D = 2, 3, 6, 64
    q, k, v = mha_qkv(B, H, T, T, D, dtype, grad=False)
    on = torch.tensor([[True, False, True], [False, True, False]], device=DEV)
    for t in (q, k, v):
        t[~on] = float("nan")
    for hm in (on, on.to(dtype) * 0.5):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        g = hm.clone().requires_grad_(hm.is_floating_point())
        out = mha_cuda(qq, kk, vv, g, is_causal=True)
        assert torch.isfinite(out).all() and (out[~on] == 0).all()
        out.float().sum().backward()
        for t in (qq, kk, vv):
            assert torch.isfinite(t.grad).all() and (t.grad[~on] == 0).all()
        if g.requires_grad:
            assert torch.isfinite(g.grad).all() and (g.grad[~on] == 0).all()


@needs_heads
def test_mha_cuda_fully_masked_row_and_empty():
    B, H, Tq, Tk, D = 1, 2, 4, 5, 8
    q, k, v = mha_qkv(B, H, Tq, Tk, D)
    am = torch.ones(Tq, Tk, dtype=torch.bool, device=DEV)
    am[2] = False  # query 2 sees no key: output 0, finite gradients
    out = mha_cuda(q, k, v, torch.ones(H, dtype=torch.bool, device=DEV), attn_mask=am)
    assert (out[:, :, 2] == 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    q, k, v = mha_qkv(0, 4, 7, 9, 8)
    out = mha_cuda(q, k, v, torch.ones(0, 4, dtype=torch.bool, device=DEV))
    assert out.shape == (0, 4, 7, 8)
    out.sum().backward()
    q, k, v = mha_qkv(2, 3, 0, 5, 8, grad=False)
    assert mha_cuda(q, k, v, torch.ones(3, dtype=torch.bool, device=DEV)).shape == (2, 3, 0, 8)
    q, k, v = mha_qkv(1, 1, 2, 2, 264, grad=False)
    with pytest.raises(RuntimeError, match=r"head dim D must be at most 256"):
        mha_cuda(q, k, v, torch.ones(1, dtype=torch.bool, device=DEV))


@needs_heads
def test_mha_cuda_opcheck():
    B, H, Tq, Tk, D = 2, 3, 5, 7, 8
    q, k, v = mha_qkv(B, H, Tq, Tk, D, torch.float32)
    on = torch.tensor([[True, False, True], [False, True, True]], device=DEV)
    gate = torch.tensor([[0.5, 0.0, 1.5], [1.0, 0.25, 0.0]], device=DEV, requires_grad=True)
    pad = torch.ones(B, 1, 1, Tk, dtype=torch.bool, device=DEV)
    pad[0, ..., -2:] = False
    op = torch.ops.sparse_ops.masked_head_attention.default
    for hm, am, causal, dg in ((on, None, False, False), (on, pad, True, False), (gate, None, False, False),
                               (gate, pad, False, True), (torch.ones(H, dtype=torch.bool, device=DEV), None, True, False),
                               (torch.zeros(B, H, dtype=torch.bool, device=DEV), None, False, False)):
        torch.library.opcheck(op, (q, k, v, hm, am, causal, None, dg))


def test_seven_two_four_masks_through_semi_structured_matmul():
    """Seven's final 2:4 masks made physical (Seven.to_semi_structured): the linears then run
    torch's semi-structured sparse matmul, and the model's output equals the masked dense one's
    (float16)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("torch's semi-structured sparse matmul needs sm_80 or newer")
    from sparse_ops.pruning import Seven
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, 8)).to(DEV)
    p = Seven(model, 0.5, steps=2, granularity="2:4")
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(64, 128, device=DEV)).square().mean().backward()
        p.step()
    model.half()
    x = torch.randn(64, 128, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        ref = model(x)
    assert p.to_semi_structured() == ["0.weight", "2.weight"]
    assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
