"""sparse_ops.gates: straight-through gates (forward values, surrogate gradients, errors)
and their use as `gate=` of sparse_ops.gated_ffn (equality with the reference op, gradients
reaching the scores / log_alpha, and a short training run).

All randomness is seeded; gradients are compared in float64.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import sparse_ops
from sparse_ops import reference as R
from sparse_ops.gates import HardConcrete, gumbel_gate, ste_threshold, ste_topk

D64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=D64, scale=1.0):
    return (torch.randn(*shape, generator=gen(seed), dtype=D64) * scale).to(dtype)


def grad_of(out, inp, go):
    (g,) = torch.autograd.grad(out, inp, go)
    return g


# ------------------------------------------------------------------ ste_threshold
@pytest.mark.parametrize("dtype", [torch.float32, D64, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0.0, 0.3, -0.5])
def test_ste_threshold_forward_is_exact_binary(dtype, threshold):
    s = randn(4, 6, seed=1, dtype=dtype)
    s[0, 0] = threshold          # a score equal to the threshold is not "above" it: gate 0
    s[0, 1] = threshold + 0.25   # and one safely above: gate 1
    out = ste_threshold(s, threshold)
    assert out.dtype == dtype and out.shape == s.shape
    assert torch.equal(out, (s > threshold).to(dtype))
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert out[0, 0].item() == 0.0 and out[0, 1].item() == 1.0


def test_ste_threshold_forward_exact_with_grad_and_temperature():
    # With requires_grad and T != 1 the value must still be exactly 0/1 (not hard + soft - soft
    # rounding to something else), so gated_ffn sees exact zeros.
    s = randn(50, seed=2, scale=3.0).requires_grad_()
    out = ste_threshold(s, 0.1, temperature=0.37)
    assert out.requires_grad
    assert torch.equal(out.detach(), (s.detach() > 0.1).to(D64))


@pytest.mark.parametrize("threshold", [0.0, 0.4])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_ste_threshold_backward_is_sigmoid_gradient(threshold, temperature):
    s = randn(3, 5, seed=3, scale=2.0).requires_grad_()
    go = randn(3, 5, seed=4)
    got = grad_of(ste_threshold(s, threshold, temperature), s, go)
    exp = grad_of(torch.sigmoid((s - threshold) / temperature), s, go)
    torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-14)
    # and the closed form sigma'(z) / T, so the comparison does not only mirror the code
    sig = torch.sigmoid((s.detach() - threshold) / temperature)
    torch.testing.assert_close(got, go * sig * (1 - sig) / temperature, rtol=1e-12, atol=1e-14)
    assert (got != 0).all()      # also for the units whose gate is 0


@pytest.mark.parametrize("temperature", [0.0, -1.0, -1e-9])
def test_ste_threshold_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        ste_threshold(torch.zeros(3), 0.0, temperature)


# ------------------------------------------------------------------ ste_topk
def topk_mask(s, k, dim):
    """1 at the k largest along dim, computed by ranking (not topk), for distinct scores."""
    rank = s.argsort(dim=dim, descending=True).argsort(dim=dim)
    return (rank < k).to(s.dtype)


@pytest.mark.parametrize("dim", [-1, 0, 1])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_ste_topk_forward_k_largest(dim, k, dtype):
    s = randn(5, 6, seed=5, dtype=dtype)
    out = ste_topk(s, k, dim=dim)
    assert out.dtype == dtype and out.shape == s.shape
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert (out.sum(dim=dim) == k).all()
    assert torch.equal(out, topk_mask(s, k, dim))
    # every selected score beats every unselected one in its slice
    sel_min = torch.where(out.bool(), s, torch.full_like(s, math.inf)).amin(dim=dim)
    rest_max = torch.where(out.bool(), torch.full_like(s, -math.inf), s).amax(dim=dim)
    assert (sel_min > rest_max).all()


def test_ste_topk_dim0_differs_from_dim_minus1():
    s = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    assert torch.equal(ste_topk(s, 1, dim=0), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    assert torch.equal(ste_topk(s, 1, dim=-1), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.equal(ste_topk(s, 2, dim=1), torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]))


@pytest.mark.parametrize("dim", [-1, 0])
def test_ste_topk_k_zero_and_k_n(dim):
    s = randn(4, 7, seed=6).requires_grad_()
    n = s.shape[dim]
    assert torch.equal(ste_topk(s, 0, dim=dim).detach(), torch.zeros(4, 7, dtype=D64))
    assert torch.equal(ste_topk(s, n, dim=dim).detach(), torch.ones(4, 7, dtype=D64))
    # k=0: the surrogate softmax * 0 has zero gradient
    g0 = grad_of(ste_topk(s, 0, dim=dim), s, randn(4, 7, seed=7))
    assert torch.equal(g0, torch.zeros_like(g0))


@pytest.mark.parametrize("dim", [-1, 0])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
@pytest.mark.parametrize("k", [1, 3])
def test_ste_topk_backward_is_softmax_gradient(dim, temperature, k):
    s = randn(4, 5, seed=8).requires_grad_()
    go = randn(4, 5, seed=9)
    got = grad_of(ste_topk(s, k, dim=dim, temperature=temperature), s, go)
    exp = grad_of(torch.softmax(s / temperature, dim=dim) * k, s, go)
    torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-14)
    # closed form: k/T * p * (go - sum(go * p))
    p = torch.softmax(s.detach() / temperature, dim=dim)
    closed = k / temperature * p * (go - (go * p).sum(dim=dim, keepdim=True))
    torch.testing.assert_close(got, closed, rtol=1e-10, atol=1e-13)
    # the softmax is along `dim`: along that dim the gradient sums to 0
    torch.testing.assert_close(got.sum(dim=dim), torch.zeros_like(got.sum(dim=dim)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim, k", [(-1, -1), (-1, 8), (0, 5), (0, -3), (1, 100)])
def test_ste_topk_bad_k(dim, k):
    s = torch.zeros(4, 7)
    with pytest.raises(ValueError, match=r"\bk\b"):
        ste_topk(s, k, dim=dim)


def test_ste_topk_k_bound_uses_dim():
    s = torch.zeros(4, 7)
    ste_topk(s, 7, dim=-1)            # fine: 7 along dim -1
    with pytest.raises(ValueError, match=r"\bk\b"):
        ste_topk(s, 7, dim=0)         # only 4 along dim 0


@pytest.mark.parametrize("temperature", [0.0, -2.0])
def test_ste_topk_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        ste_topk(torch.zeros(3, 4), 1, temperature=temperature)


# ------------------------------------------------------------------ gumbel_gate
@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0])
def test_gumbel_gate_hard_values(dtype, tau):
    logits = randn(64, seed=10, dtype=dtype, scale=2.0)
    torch.manual_seed(0)
    out = gumbel_gate(logits, tau, hard=True)
    assert out.dtype == dtype and out.shape == logits.shape
    assert set(out.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_gumbel_gate_soft_values(tau):
    logits = randn(4, 16, seed=11, scale=2.0)
    torch.manual_seed(1)
    out = gumbel_gate(logits, tau, hard=False)
    assert out.dtype == D64 and out.shape == logits.shape
    assert ((out > 0) & (out < 1)).all()
    assert len(out.unique()) == out.numel()     # a continuous sample, not 0/1


def test_gumbel_gate_seeded_and_random():
    logits = torch.zeros(200, dtype=D64)
    torch.manual_seed(2)
    a = gumbel_gate(logits, hard=False)
    torch.manual_seed(2)
    b = gumbel_gate(logits, hard=False)
    c = gumbel_gate(logits, hard=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_gumbel_gate_hard_is_threshold_of_soft_sample(tau):
    logits = randn(3, 20, seed=12)
    torch.manual_seed(3)
    hard = gumbel_gate(logits, tau, hard=True)
    torch.manual_seed(3)
    soft = gumbel_gate(logits, tau, hard=False)
    assert torch.equal(hard, (soft > 0.5).to(D64))


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_gumbel_gate_straight_through_gradient(tau):
    logits = randn(3, 10, seed=13).requires_grad_()
    go = randn(3, 10, seed=14)
    torch.manual_seed(4)
    got = grad_of(gumbel_gate(logits, tau, hard=True), logits, go)
    torch.manual_seed(4)
    soft = gumbel_gate(logits, tau, hard=False)
    exp = grad_of(soft, logits, go)
    torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-14)
    # d soft / d logits = soft (1 - soft) / tau
    sd = soft.detach()
    torch.testing.assert_close(got, go * sd * (1 - sd) / tau, rtol=1e-10, atol=1e-14)
    assert (got != 0).all()


def test_gumbel_gate_open_probability_is_sigmoid_of_logit():
    # P(logit + Logistic noise > 0) = sigmoid(logit), for any tau
    logits = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0], dtype=D64)
    torch.manual_seed(5)
    for tau in (0.5, 2.0):
        samples = gumbel_gate(logits.expand(20000, 5), tau, hard=True)
        torch.testing.assert_close(samples.mean(0), torch.sigmoid(logits), rtol=0, atol=0.015)


@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_gumbel_gate_saturates(dtype, tau):
    torch.manual_seed(6)
    big = torch.full((500,), 60.0, dtype=dtype)
    assert torch.equal(gumbel_gate(big, tau, hard=True), torch.ones_like(big))
    assert torch.equal(gumbel_gate(-big, tau, hard=True), torch.zeros_like(big))
    soft_hi = gumbel_gate(big, tau, hard=False)
    soft_lo = gumbel_gate(-big, tau, hard=False)
    # |logistic noise| <= log((1 - 1e-6) / 1e-6) < 14 after the clamp of u
    bound = torch.sigmoid(torch.tensor((60.0 - 14.0) / tau, dtype=D64)).item()
    assert (soft_hi >= bound - 1e-6).all() and (soft_lo <= 1 - bound + 1e-6).all()


@pytest.mark.parametrize("tau", [0.0, -0.5])
def test_gumbel_gate_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        gumbel_gate(torch.zeros(3), tau)


# ------------------------------------------------------------------ HardConcrete
def hc_eval_formula(log_alpha, gamma=-0.1, zeta=1.1):
    return torch.clamp(torch.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def hc_with(log_alpha, **kw):
    hc = HardConcrete(tuple(log_alpha.shape), **kw).to(log_alpha.dtype)
    with torch.no_grad():
        hc.log_alpha.copy_(log_alpha)
    return hc


@pytest.mark.parametrize("kw", [{}, {"gamma": -0.2, "zeta": 1.05, "beta": 0.5}])
def test_hard_concrete_eval_deterministic_formula(kw):
    la = torch.tensor([[-6.0, -2.5, -1.0, 0.0], [0.5, 2.0, 2.5, 8.0]], dtype=D64)
    hc = hc_with(la, **kw).eval()
    a, b = hc(), hc()
    assert torch.equal(a, b)
    gz = {k: v for k, v in kw.items() if k in ("gamma", "zeta")}
    torch.testing.assert_close(a, hc_eval_formula(la, **gz), rtol=1e-14, atol=0)
    assert a.dtype == D64 and a.shape == (2, 4)
    assert (a == 0).any() and (a == 1).any() and ((a > 0) & (a < 1)).any()
    # a float64 value spot check (default gamma/zeta): sigmoid(0) * 1.2 - 0.1 = 0.5
    if not kw:
        assert a[0, 3].item() == pytest.approx(0.5, abs=1e-15)
        assert a[0, 0].item() == 0.0 and a[1, 3].item() == 1.0


@pytest.mark.parametrize("init_open", [0.1, 0.5, 0.9])
def test_hard_concrete_init_open(init_open):
    hc = HardConcrete(5, init_open=init_open)
    assert isinstance(hc.log_alpha, torch.nn.Parameter)
    assert [n for n, _ in hc.named_parameters()] == ["log_alpha"]
    torch.testing.assert_close(torch.sigmoid(hc.log_alpha.detach()), torch.full((5,), init_open))
    torch.testing.assert_close(hc.eval()(), torch.full((5,), min(1.0, init_open * 1.2 - 0.1)).clamp(0, 1))


@pytest.mark.parametrize("shape, expect", [(7, (7,)), ((7,), (7,)), ((2, 3), (2, 3)),
                                           ([2, 3], (2, 3)), (torch.Size([4, 1, 2]), (4, 1, 2))])
def test_hard_concrete_shape(shape, expect):
    hc = HardConcrete(shape)
    assert hc.log_alpha.shape == expect
    torch.manual_seed(7)
    assert hc.train()().shape == expect
    assert hc.eval()().shape == expect
    assert hc.l0_penalty().shape == ()


@pytest.mark.parametrize("init_open", [0.0, 1.0, -0.1, 1.5])
def test_hard_concrete_bad_init_open(init_open):
    with pytest.raises(ValueError, match="init_open"):
        HardConcrete(4, init_open=init_open)


def test_hard_concrete_training_samples_in_unit_interval():
    la = randn(4000, seed=15, scale=2.0)
    hc = hc_with(la).train()
    torch.manual_seed(8)
    s = hc()
    assert s.dtype == D64 and ((s >= 0) & (s <= 1)).all()
    # exact zeros and exact ones both occur, and values strictly inside too
    assert (s == 0).sum() > 100 and (s == 1).sum() > 100 and ((s > 0) & (s < 1)).sum() > 100
    # stochastic, reproducible under a seed
    torch.manual_seed(8)
    assert torch.equal(hc(), s)
    assert not torch.equal(hc(), s)


def test_hard_concrete_training_gradient_flows():
    hc = hc_with(torch.zeros(50, dtype=D64)).train()
    torch.manual_seed(9)
    s = hc()
    (g,) = torch.autograd.grad(s.sum(), hc.log_alpha)
    inside = (s > 0) & (s < 1)
    assert inside.any()
    assert (g[inside] > 0).all()           # the gate rises with log_alpha
    assert (g[~inside] == 0).all()         # clamped samples: no gradient


@pytest.mark.parametrize("la, value, min_frac", [(-30.0, 0.0, 1.0), (-10.0, 0.0, 0.99),
                                                  (30.0, 1.0, 1.0), (10.0, 1.0, 0.99)])
def test_hard_concrete_training_saturates(la, value, min_frac):
    hc = hc_with(torch.full((2000,), la, dtype=D64)).train()
    torch.manual_seed(10)
    s = hc()
    assert ((s == 0) | (s == 1) | ((s > 0) & (s < 1))).all()
    assert (s == value).double().mean().item() >= min_frac


@pytest.mark.parametrize("kw", [{}, {"beta": 0.5, "gamma": -0.2, "zeta": 1.05}])
def test_hard_concrete_l0_penalty(kw):
    la = randn(3, 4, seed=16, scale=2.0)
    hc = hc_with(la, **kw)
    beta, gamma, zeta = kw.get("beta", 2 / 3), kw.get("gamma", -0.1), kw.get("zeta", 1.1)
    pen = hc.l0_penalty()
    exp = torch.sigmoid(la - beta * math.log(-gamma / zeta)).sum()
    torch.testing.assert_close(pen, exp, rtol=1e-14, atol=0)
    assert pen.requires_grad
    pen.backward()
    p = torch.sigmoid(la - beta * math.log(-gamma / zeta))
    torch.testing.assert_close(hc.log_alpha.grad, p * (1 - p), rtol=1e-12, atol=0)
    assert (hc.log_alpha.grad > 0).all()


def test_hard_concrete_l0_penalty_is_expected_open_count():
    # l0_penalty() / n = P(training sample != 0), estimated from many samples
    for la in (-1.5, 0.5, 2.0):
        hc = hc_with(torch.full((20000,), la, dtype=D64)).train()
        torch.manual_seed(11)
        frac_open = (hc() != 0).double().mean().item()
        assert frac_open == pytest.approx(hc.l0_penalty().item() / 20000, abs=0.015)


# ------------------------------------------------------------------ gates through gated_ffn
def ffn_params(N=4, d=5, F_=7, seed=20, bias=True):
    g = gen(seed)

    def t(*s):
        return torch.randn(*s, generator=g, dtype=D64)
    x = t(N, d)
    w1, w2 = t(F_, d), t(d, F_)
    b1, b2 = (t(F_), t(d)) if bias else (None, None)
    return x, w1, w2, b1, b2


SCORES = [0.8, -0.3, 1.2, -1.5, 0.4, -0.7, 0.1]   # gates (threshold 0): 1 0 1 0 1 0 1


def dense_active(x, w1, w2, b1, b2, keep, act):
    """The FFN restricted to the columns in `keep`, computed directly."""
    h = sparse_ops.activations.forward(act)(F.linear(x, w1[keep], None if b1 is None else b1[keep]))
    return F.linear(h, w2[:, keep], b2)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("bias", [True, False])
def test_ste_gate_ffn_forward(activation, bias):
    x, w1, w2, b1, b2 = ffn_params(bias=bias)
    scores = torch.tensor(SCORES, dtype=D64, requires_grad=True)
    g = ste_threshold(scores)
    out = sparse_ops.gated_ffn(x, w1, w2, b1=b1, b2=b2, gate=g, activation=activation)
    ref = R.gated_ffn(x, w1, w2, b1=b1, b2=b2, gate=g, activation=activation)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    keep = torch.tensor(SCORES) > 0
    torch.testing.assert_close(out, dense_active(x, w1, w2, b1, b2, keep, activation),
                               rtol=1e-12, atol=1e-12)


def test_ste_gate_ffn_skipped_columns_not_computed():
    # A column whose gate is exactly 0 is skipped: NaN weights there never reach the output.
    x, w1, w2, b1, b2 = ffn_params()
    scores = torch.tensor(SCORES, dtype=D64, requires_grad=True)
    closed = torch.tensor(SCORES) <= 0
    w1n, w2n = w1.clone(), w2.clone()
    w1n[closed] = float("nan")
    w2n[:, closed] = float("nan")
    out = sparse_ops.gated_ffn(x, w1n, w2n, b1=b1, b2=b2, gate=ste_threshold(scores))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, dense_active(x, w1, w2, b1, b2, ~closed, "gelu"),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dense_grad", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("threshold, temperature", [(0.0, 1.0), (0.2, 0.5)])
def test_ste_gate_ffn_gradients(dense_grad, activation, threshold, temperature):
    x, w1, w2, b1, b2 = ffn_params()
    for t in (x, w1, w2, b1, b2):
        t.requires_grad_()
    go = randn(4, 5, seed=21)
    s0 = torch.tensor(SCORES, dtype=D64)
    kw = dict(b1=b1, b2=b2, activation=activation, dense_grad=dense_grad)

    def run(fn):
        scores = s0.clone().requires_grad_()
        out = fn(x, w1, w2, gate=ste_threshold(scores, threshold, temperature), **kw)
        return torch.autograd.grad(out, (scores, x, w1, w2, b1, b2), go)

    got, exp = run(sparse_ops.gated_ffn), run(R.gated_ffn)
    for name, a, b in zip(("scores", "x", "w1", "w2", "b1", "b2"), got, exp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    gs = got[0]

    # Independently: d out / d gate_j (the exact gate gradient, from the reference with a plain
    # leaf gate) times the sigmoid surrogate's derivative.
    open_ = s0 > threshold
    gate = open_.to(D64).requires_grad_()
    (dgate,) = torch.autograd.grad(R.gated_ffn(x, w1, w2, gate=gate, b1=b1, b2=b2,
                                               activation=activation, dense_grad=True), gate, go)
    sig = torch.sigmoid((s0 - threshold) / temperature)
    surrogate = dgate * sig * (1 - sig) / temperature
    torch.testing.assert_close(gs[open_], surrogate[open_], rtol=1e-10, atol=1e-12)
    assert (gs[open_] != 0).all()
    if dense_grad:
        torch.testing.assert_close(gs[~open_], surrogate[~open_], rtol=1e-10, atol=1e-12)
        assert (gs[~open_] != 0).all()
    else:
        assert (gs[~open_] == 0).all()


def test_ste_topk_gate_ffn_gradients():
    # The same through ste_topk: per-row top-k gates ([N, F]).
    x, w1, w2, b1, b2 = ffn_params(N=3)
    go = randn(3, 5, seed=22)
    s0 = randn(3, 7, seed=23)
    for dense_grad in (False, True):
        res = []
        for fn in (sparse_ops.gated_ffn, R.gated_ffn):
            scores = s0.clone().requires_grad_()
            g = ste_topk(scores, 3, dim=-1)
            out = fn(x, w1, w2, b1=b1, b2=b2, gate=g, dense_grad=dense_grad)
            res.append((out.detach(), grad_of(out, scores, go)))
        torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-10, atol=1e-12)
        assert (res[0][1] != 0).all()   # softmax couples each row: every score gets gradient


@pytest.mark.parametrize("dense_grad", [False, True])
@pytest.mark.parametrize("seed", [30, 31])
def test_ste_gate_ffn_sgd_reduces_loss(dense_grad, seed):
    # Target: the FFN with a known subset of its columns. The student's gates start wrong:
    # extra open columns (which the straight-through gradient closes), and with dense_grad a
    # true column that starts closed (only dense_grad gives a closed gate a gradient to reopen).
    # With N=64, d=16 this recovers the subset for every seed tried (0..39, both modes).
    N, d, F_ = 64, 16, 6
    x, w1, w2, _, _ = ffn_params(N=N, d=d, F_=F_, seed=seed, bias=False)
    true_open = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    with torch.no_grad():
        target = dense_active(x, w1, w2, None, None, true_open, "gelu")
    init = [0.3, 0.3, -0.3, 0.3, 0.3, -0.3] if dense_grad else [0.3] * F_
    scores = torch.tensor(init, dtype=D64, requires_grad=True)
    opt = torch.optim.SGD([scores], lr=0.05)

    def loss_fn():
        out = sparse_ops.gated_ffn(x, w1, w2, gate=ste_threshold(scores), dense_grad=dense_grad)
        return ((out - target) ** 2).mean()

    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        first = loss.item() if first is None else first
        opt.step()
    final = loss_fn().item()
    assert first > 0.05
    assert final < 0.5 * first
    assert final < 1e-20                   # the gates found exactly the target's columns
    assert torch.equal(scores.detach() > 0, true_open)


# ------------------------------------------------------------------ HardConcrete through gated_ffn
LOG_ALPHA = [-5.0, -1.0, 3.0, 0.3, -2.6, 1.5, 6.0]   # eval gates: 0, (0,1), 1, (0,1), 0, (0,1), 1


@pytest.mark.parametrize("dense_grad", [False, True])
def test_hard_concrete_eval_gate_ffn(dense_grad):
    N, d, F_ = 3, 5, 7
    x, w1, w2, b1, b2 = ffn_params(N=N, d=d, F_=F_, seed=40)
    go = randn(N, d, seed=41)
    la = torch.tensor(LOG_ALPHA, dtype=D64)
    res = []
    for fn in (sparse_ops.gated_ffn, R.gated_ffn):
        hc = hc_with(la).eval()
        g = hc()
        out = fn(x, w1, w2, b1=b1, b2=b2, gate=g, dense_grad=dense_grad)
        res.append((g.detach(), out.detach(), grad_of(out, hc.log_alpha, go)))
    (g, out, gla), (_, ref, rla) = res
    assert (g == 0).sum() == 2 and (g == 1).sum() == 2 and ((g > 0) & (g < 1)).sum() == 3
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gla, rla, rtol=1e-10, atol=1e-12)
    # the forward is the FFN with hidden column j scaled by g_j (j with g_j = 0 dropped)
    h = F.gelu(F.linear(x, w1, b1)) * g
    torch.testing.assert_close(out, F.linear(h, w2, b2), rtol=1e-12, atol=1e-12)
    # columns whose gate is clamped (to 0 or 1) get no gradient; interior ones do
    inside = (g > 0) & (g < 1)
    assert (gla[inside] != 0).all() and (gla[~inside] == 0).all()


def test_hard_concrete_train_gate_ffn():
    # A training-mode sample (seeded) through the op and through the reference.
    x, w1, w2, b1, b2 = ffn_params(N=3, d=5, F_=7, seed=42)
    go = randn(3, 5, seed=43)
    la = torch.tensor(LOG_ALPHA, dtype=D64)
    res = []
    for fn in (sparse_ops.gated_ffn, R.gated_ffn):
        hc = hc_with(la).train()
        torch.manual_seed(12)
        g = hc()
        out = fn(x, w1, w2, b1=b1, b2=b2, gate=g)
        res.append((g.detach(), out.detach(), grad_of(out, hc.log_alpha, go)))
    (g, out, gla), (g2, ref, rla) = res
    assert torch.equal(g, g2)
    assert (g == 0).any()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gla, rla, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -2.0, "1"])
def test_gate_temperatures_must_be_finite_positive(value):
    """NaN passes `value <= 0`; every temperature is checked to be a finite number > 0."""
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ste_threshold(torch.zeros(3), 0.0, value)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ste_topk(torch.zeros(4), 2, temperature=value)
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        gumbel_gate(torch.zeros(3), value)
    with pytest.raises(ValueError, match="beta"):
        HardConcrete(4, beta=value)


@pytest.mark.parametrize("kw", [dict(gamma=0.1), dict(zeta=0.9), dict(gamma=float("nan")), dict(zeta=float("inf"))])
def test_hard_concrete_stretch_must_reach_0_and_1(kw):
    with pytest.raises(ValueError, match="gamma < 0 < 1 < zeta"):
        HardConcrete(4, **kw)


@pytest.mark.parametrize("shape", [0, (3, 0), (-1,)])
def test_hard_concrete_empty_shape(shape):
    with pytest.raises(ValueError, match="shape must hold positive ints"):
        HardConcrete(shape)


def test_module_constructors_refuse_empty_sizes():
    from sparse_ops.nn import GatedFFN, SkipLayer, TokenRouter
    for args in ((16, 0), (0, 32), (16, -4), (16.0, 32)):
        with pytest.raises(ValueError, match="must be a positive int"):
            GatedFFN(*args)
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        TokenRouter(0, 0.5)
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        SkipLayer(torch.nn.Identity(), gate="learned", d_model=0)
