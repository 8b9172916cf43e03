"""Straight-through gates: hard 0/1 (or exactly-zero) values forward, a surrogate gradient backward.

Their outputs can be passed straight to the ops as `gate=`: a unit whose gate is exactly 0
is skipped (never computed), and the gradient reaching the gate flows back to the scores
through the surrogate.

- ste_threshold(scores, threshold=0.): 1 where score > threshold, else 0; backward: sigmoid'.
- ste_topk(scores, k, dim=-1): 1 for the k largest scores along dim, else 0; backward: softmax'.
- HardConcrete(shape): L0 gates (Louizos et al. 2018; used by CoFi): stretched, clamped
  concrete samples in training, deterministic in eval; exact zeros are common, so the
  skipped units are real; `l0_penalty()` is the expected number of open gates.
- gumbel_gate(logits, tau): a hard Gumbel-sigmoid sample with straight-through gradient.

Model-level gates (what `sparse_ops.patch(model, gate=...)` attaches to each layer):
- UnitGate(kind, n, keep=None): the learned gate of one layer's n units of one kind, shared by
  every input: "hard_concrete", "threshold" or "topk" (exactly round(keep * n) units on).
  Calling it gives this forward's values [n] (exact zeros are skipped units); `expected()` the
  expected fraction on, differentiable in the gate's parameters.
- FFNRouter(d, F, keep, rank): an input-dependent gate for FFN columns (a Deja Vu-style low-rank
  predictor on the FFN's input): per row (token), the round(keep * F) columns with the largest
  predicted scores run. Fitted to the dense model's own activations (sparse_ops.fit_routers).
- SampleRouter(d, n, keep): an input-dependent gate per sample, from the mean over tokens of a
  layer's input: the round(keep * n) heads (n = H) or FFN columns (n = F) with the highest scores,
  or, n = 1, whether the layer runs (score > 0; its keep fraction is learned, as a threshold gate's).
- LayerGates: a layer's gates by kind ("heads", "ffn", "layer"); a child module of the layer,
  so its parameters are in model.parameters() and state_dict (keys `...sparse_gates.<kind>.*`).
- keep_fractions(model): expected fraction of (row, unit) pairs computed per kind, as
  sparse_ops.stats counts them (heads and FFN columns of a layer scaled by its layer gate).
- budget_loss(model, heads=, ffn=, layers=): CoFi's Lagrangian penalty towards target keep
  fractions, with multipliers that learn by gradient ascent under any minimising optimizer.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn


def _positive(fn: str, name: str, value) -> None:
    """value must be a finite number > 0 (NaN and inf fail: `value <= 0` alone lets NaN through)."""
    # 0 < value < inf rather than math.isfinite, which torch.compile cannot trace.
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < math.inf
    if not ok:
        raise ValueError(f"{fn}: {name} must be a finite number > 0; got {value!r}")


def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    # Forward value: hard (exact 0/1). Gradient: that of soft.
    return hard.detach() + (soft - soft.detach())


def ste_threshold(scores: torch.Tensor, threshold: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
    """Hard gate 1[scores > threshold] with the gradient of sigmoid((scores - threshold) / temperature)."""
    _positive("ste_threshold", "temperature", temperature)
    soft = torch.sigmoid((scores - threshold) / temperature)
    hard = (scores > threshold).to(scores.dtype)
    return _straight_through(hard, soft)


def topk_mask(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """bool, True at the k largest scores along `dim` (no gradient)."""
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        out.scatter_(dim, scores.detach().topk(k, dim=dim).indices, True)
    return out


def ste_topk(scores: torch.Tensor, k: int, dim: int = -1, temperature: float = 1.0) -> torch.Tensor:
    """Hard gate: 1 for the k largest scores along `dim`, else 0; gradient of softmax(scores / T) * k."""
    n = scores.shape[dim]
    if not 0 <= k <= n:
        raise ValueError(f"ste_topk: k must be in [0, {n}] (size of dim {dim}); got {k}")
    _positive("ste_topk", "temperature", temperature)
    hard = topk_mask(scores, k, dim).to(scores.dtype)
    soft = torch.softmax(scores / temperature, dim=dim) * k
    return _straight_through(hard, soft)


def gumbel_gate(logits: torch.Tensor, tau: float = 1.0, hard: bool = True) -> torch.Tensor:
    """Gumbel-sigmoid sample; hard=True gives exact 0/1 forward with the soft sample's gradient."""
    _positive("gumbel_gate", "tau", tau)
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    if not hard:
        return soft
    return _straight_through((soft > 0.5).to(logits.dtype), soft)


class HardConcrete(nn.Module):
    """L0 gates over `shape` units (Louizos et al., 2018).

    Training: u ~ U(0,1), s = sigmoid((log u - log(1-u) + log_alpha) / beta), stretched to
    (gamma, zeta) and clamped to [0, 1]: many samples are exactly 0 (skipped) or 1.
    Eval: the deterministic gate clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1).
    """

    def __init__(self, shape, init_open: float = 0.9, beta: float = 2.0 / 3.0,
                 gamma: float = -0.1, zeta: float = 1.1):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not 0 < init_open < 1:
            raise ValueError(f"HardConcrete: init_open must be in (0, 1); got {init_open}")
        _positive("HardConcrete", "beta (the temperature)", beta)
        if not (math.isfinite(gamma) and math.isfinite(zeta) and gamma < 0 and zeta > 1):
            raise ValueError(f"HardConcrete: the stretch must have gamma < 0 < 1 < zeta (finite), so that gates "
                             f"reach exactly 0 and 1; got gamma={gamma}, zeta={zeta}")
        if any(not isinstance(n, int) or n <= 0 for n in shape):
            raise ValueError(f"HardConcrete: shape must hold positive ints; got {shape}")
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        self.log_alpha = nn.Parameter(torch.full(shape, math.log(init_open / (1 - init_open))))

    def forward(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp_(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def l0_penalty(self) -> torch.Tensor:
        """Expected number of non-zero gates (differentiable in log_alpha)."""
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return torch.sigmoid(self.log_alpha - shift).sum()


# ----------------------------------------------------------------- model-level gates
GATE_KINDS = ("hard_concrete", "threshold", "topk")
UNIT_KINDS = ("heads", "ffn", "layer")


class UnitGate(nn.Module):
    """One layer's gate over n units of one kind (heads, FFN columns, or the layer itself: n = 1).

    hard_concrete: L0 gates (HardConcrete, CoFi's constants: stretch (-0.1, 1.1), temperature 2/3).
      Training: one sample per forward, shared by the batch (as CoFi samples its masks). Eval:
      deterministic, as CoFi's: the round(expected count) units with the largest log_alpha stay
      on, with the value of their deterministic gate; the others are exactly 0.
    threshold: a learned score per unit; on where score > 0 (ste_threshold: hard 0/1 forward,
      sigmoid gradient). expected(): the fraction on, with the sigmoid's gradient.
    topk: a learned score per unit; exactly round(keep * n) units on (ste_topk). expected() is
      that constant fraction (nothing for a budget to push).
    """

    def __init__(self, kind: str, n: int, keep: float | None = None, init_open: float = 0.9):
        super().__init__()
        if kind not in GATE_KINDS:
            raise ValueError(f"UnitGate: kind must be one of {GATE_KINDS}; got {kind!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"UnitGate: n must be a positive int; got {n!r}")
        self.kind, self.n = kind, n
        if kind == "hard_concrete":
            self.hc = HardConcrete(n, init_open=init_open)
        else:
            # Small distinct scores so that top-k has no ties at the start; threshold gates start on.
            base = 1.0 if kind == "threshold" else 0.0
            self.score = nn.Parameter(base + 1e-3 * torch.randn(n))
        self.k = None
        if kind == "topk":
            keep = 0.5 if keep is None else keep
            if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0.0 <= keep <= 1.0:
                raise ValueError(f"UnitGate: keep must be a fraction in [0, 1] for topk; got {keep!r}")
            self.k = int(round(keep * n))
        elif keep is not None:
            raise ValueError(f"UnitGate: keep is the fixed fraction of a topk gate; a {kind} gate learns its "
                             f"fraction (use budget_loss); got keep={keep!r}")

    def forward(self) -> torch.Tensor:
        if self.kind == "threshold":
            return ste_threshold(self.score)
        if self.kind == "topk":
            return ste_topk(self.score, self.k)
        hc = self.hc
        if self.training:
            return hc()
        # CoFi's deterministic eval: keep the round(E) most open units.
        keep = int(torch.round(hc.l0_penalty().detach()))  # the same count expected() reports
        g = hc()
        hard = torch.zeros_like(g)
        if keep > 0:
            hard[hc.log_alpha.topk(keep).indices] = 1.0
        return g * hard

    def expected(self) -> torch.Tensor:
        """Fraction of the n units on (a 0-dim tensor; differentiable except for topk).

        hard_concrete: the value is the fraction eval keeps, round(E) / n with E = l0_penalty()
        (the expected count of open training samples), and the gradient is that of E / n. So a
        budget counts what inference will compute: a layer gate (n = 1) with E = 0.94 is open in
        eval and counts 1, not 0.94, which would let a heads or FFN budget that the layer's keep
        scales overshoot by 6% at inference.
        """
        if self.kind == "hard_concrete":
            count = self.hc.l0_penalty()
            return _straight_through(torch.round(count.detach()) / self.n, count / self.n)
        if self.kind == "threshold":
            soft = torch.sigmoid(self.score).mean()
            return _straight_through((self.score > 0).to(soft.dtype).mean(), soft)
        return self.score.new_tensor(self.k / self.n)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, n={self.n}" + (f", k={self.k}" if self.k is not None else "")


class FFNRouter(nn.Module):
    """Input-dependent FFN-column gate: a low-rank predictor of which hidden columns matter for
    each row, scores = B (A x) + b with A [rank, d], B [F, rank] (Deja Vu's MLP-sparsity predictor
    has this two-matrix low-rank form). Per row, exactly k = round(keep * F) columns run: the k
    highest scores. It runs before any FFN projection, so the FFN's input projections (up and
    gate in a SwiGLU MLP) and its down projection all run on the k columns only.

    Calling it gives the scores [..., F]. `mask(x)`: bool [..., F], the top-k per row (no
    gradient). `gate(x)`: the same as 0/1 floats with ste_topk's straight-through gradient (the
    router then learns from the model's loss too). `fit_loss(x, labels)`: binary cross-entropy
    against the columns that should run (fit_routers labels each row's top-k columns by the
    magnitude of the dense model's hidden activation). `expected()`: keep, fixed (as topk).

    The cost per row is rank * (d + F) multiply-adds against the FFN's 2 or 3 * d * F: about 4%
    for SmolLM2-135M (d 576, F 1536, rank 64, three projections).
    """

    def __init__(self, d: int, F: int, keep: float = 0.5, rank: int = 64):
        super().__init__()
        for name, v in (("d", d), ("F", F), ("rank", rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"FFNRouter: {name} must be a positive int; got {v!r}")
        if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0.0 <= keep <= 1.0:
            raise ValueError(f"FFNRouter: keep must be a fraction in [0, 1]; got {keep!r}")
        self.d, self.n, self.rank, self.keep = d, F, rank, float(keep)
        self.k = int(round(keep * F))
        self.down = nn.Linear(d, rank, bias=False)
        self.up = nn.Linear(rank, F)

    def _check(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.d:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"FFNRouter: x must be a tensor [..., {self.d}]; got {got}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.up(self.down(x))

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return topk_mask(self(x), self.k)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return ste_topk(self(x), self.k)

    def fit_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(self(x), labels.to(x.dtype))

    def expected(self) -> torch.Tensor:
        return self.up.bias.new_tensor(self.k / self.n)

    def extra_repr(self) -> str:
        return f"d={self.d}, F={self.n}, rank={self.rank}, k={self.k}"


class SampleRouter(nn.Module):
    """Input-dependent gate per sample: scores = W layer_norm(mean over tokens of the layer's
    input) + b, one linear map [n, d] (per sample, not per token: it costs B * d * n multiply-adds
    against the layer's B * T * 12 * d**2 or so). The layer norm (no parameters) makes the scores
    independent of the residual stream's scale, which grows with depth in pre-norm decoders.

    n > 1 (heads, FFN columns): exactly k = round(keep * n) units on per sample, the k highest scores; `gate`
      is ste_topk (0/1 forward, softmax-surrogate gradient); `expected()` is k / n, fixed.
    n == 1 (the layer): the layer runs for a sample where its score > 0; `gate` is ste_threshold
      (sigmoid gradient); keep must be None: the fraction is learned (budget_loss(layers=...)),
      and `expected()` is the fraction of the last forward's samples on, with the sigmoid's
      gradient (call budget_loss after the forward it should count; before any forward, the
      router at a zero input: its bias alone).
    Starts near a static gate: small weights (1e-3 * randn), distinct small biases for heads (no
    top-k ties), bias 1 for a layer (every sample runs at the start, as a threshold gate does).

    `pool(x, valid)` maps a layer input [B, T, d] to the router's input [B, d]: the mean over the
    real tokens (valid: bool [B, T]; the patched layers derive it from the attention mask, so a
    sample's route does not depend on how much padding its batch has), detached: the router
    learns which units to run, and the model's weights get no gradient through its choice, so a
    skipped unit contributes nothing to any gradient. Calling the router on that gives scores [B, n]; `mask(p)` bool [B, n] (a
    layer: [B]); `gate(p)` the straight-through float values, shaped the same.
    """

    def __init__(self, d: int, n: int, keep: float | None = 0.5):
        super().__init__()
        for name, v in (("d", d), ("n", n)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"SampleRouter: {name} must be a positive int; got {v!r}")
        if n == 1:
            if keep is not None:
                raise ValueError(f"SampleRouter: a layer router (n = 1) learns its keep fraction (use budget_loss); "
                                 f"keep must be None; got {keep!r}")
            self.k = None
        else:
            keep = 0.5 if keep is None else keep
            if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0.0 <= keep <= 1.0:
                raise ValueError(f"SampleRouter: keep must be a fraction in [0, 1]; got {keep!r}")
            self.k = int(round(keep * n))
        self.d, self.n = d, n
        self.score = nn.Linear(d, n)
        with torch.no_grad():
            self.score.weight.normal_(0.0, 1e-3)
            self.score.bias.copy_(torch.ones(n) if n == 1 else 1e-3 * torch.randn(n))
        self._last = None  # a layer router's soft fraction on, of the last forward (expected())

    def pool(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """layer_norm of the mean of x [B, T, d] over its tokens (valid: bool [B, T], the real
        tokens; None: all of them), detached."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or x.shape[-1] != self.d:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SampleRouter: a layer input must be a tensor [B, T, {self.d}] (or [B, {self.d}]); "
                             f"got {got}")
        x = x.detach()
        if x.dim() == 2:
            p = x
        elif valid is None:
            p = x.mean(1)
        else:
            if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != x.shape[:2]:
                got = (valid.dtype, tuple(valid.shape)) if isinstance(valid, torch.Tensor) else type(valid).__name__
                raise ValueError(f"SampleRouter: valid must be a bool tensor {tuple(x.shape[:2])} (the real tokens); "
                                 f"got {got}")
            v = valid.to(x.dtype).unsqueeze(-1)
            p = (x * v).sum(1) / v.sum(1).clamp_min(1.0)
        return nn.functional.layer_norm(p.to(self.score.weight.dtype), (self.d,))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self.score(p)

    def mask(self, p: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self(p)
            if self.k is None:
                self._last = (z[:, 0] > 0).to(z.dtype).mean()
                return z[:, 0] > 0
            return topk_mask(z, self.k)

    def gate(self, p: torch.Tensor) -> torch.Tensor:
        z = self(p)
        if self.k is None:
            g = ste_threshold(z[:, 0])
            soft = torch.sigmoid(z[:, 0]).mean()
            self._last = _straight_through(g.detach().mean(), soft)
            return g
        return ste_topk(z, self.k)

    def expected(self) -> torch.Tensor:
        if self.k is not None:
            return self.score.bias.new_tensor(self.k / self.n)
        if self._last is None:  # no forward yet: the router at a zero input (the bias alone)
            b = self.score.bias[0]
            return _straight_through((b > 0).to(b.dtype), torch.sigmoid(b))
        return self._last

    def extra_repr(self) -> str:
        return f"d={self.d}, n={self.n}" + (f", k={self.k}" if self.k is not None else " (layer)")


class LayerGates(nn.Module):
    """A layer's gates by kind (children `heads`, `ffn`, `layer`: a UnitGate, an FFNRouter for
    "ffn" (per token), a SampleRouter (per sample) for any kind, or absent)."""

    def __init__(self, gates: dict):
        super().__init__()
        for kind, g in gates.items():
            ok = (isinstance(g, UnitGate) or (kind == "ffn" and isinstance(g, FFNRouter))
                  or (isinstance(g, SampleRouter) and (g.n == 1) == (kind == "layer")))
            if kind not in UNIT_KINDS or not ok:
                raise ValueError(f"LayerGates: expected UnitGates keyed by {UNIT_KINDS} (or an FFNRouter for 'ffn', "
                                 f"a SampleRouter for 'heads' / 'ffn' / 'layer'); "
                                 f"got {kind!r}: {g!r}")
            self.add_module(kind, g)

    def get(self, kind: str):
        return self._modules.get(kind)


def _layer_gates(model, who):
    found = [m for m in model.modules() if isinstance(m, LayerGates)]
    if not found:
        raise ValueError(f"sparse_ops.gates.{who}: the model has no learned gates; patch it with "
                         f"sparse_ops.patch(model, gate=...)")
    return found


def _expected_keep(model, who):
    """{kind: expected fraction of (row, unit) pairs computed (a 0-dim tensor)} for the kinds that
    have gates; heads and FFN columns of each layer are scaled by the layer's expected keep, as
    sparse_ops.stats counts a skipped sample's units as not computed."""
    per = {"heads": [], "ffn": [], "layers": []}
    for lg in _layer_gates(model, who):
        lay = lg.get("layer")
        e_layer = lay.expected() if lay is not None else None
        if e_layer is not None:
            per["layers"].append(e_layer)
        for kind in ("heads", "ffn"):
            g = lg.get(kind)
            e = g.expected() if g is not None else e_layer  # no unit gate: the layer gate alone
            if g is not None and e_layer is not None:
                e = e * e_layer
            if e is not None:
                per[kind].append(e)
    return {k: torch.stack(v).mean() for k, v in per.items() if v}


def keep_fractions(model) -> dict:
    """{"heads": f, "ffn": f, "layers": f}: the fraction of (row, unit) pairs computed under the
    model's learned gates (floats; None for a kind without gates). For deterministic gates (L0 in
    eval, threshold, top-k) it is what sparse_ops.stats counts in eval; routers report their
    fixed keep (heads) or the last forward's (layers)."""
    e = _expected_keep(model, "keep_fractions")
    return {k: (float(e[k].detach()) if k in e else None) for k in ("heads", "ffn", "layers")}


# budget_loss's default quadratic weight (see its docstring; README "Gate training end to end" has the runs).
BUDGET_PENALTY = 20.0


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class BudgetMultipliers(nn.Module):
    """The Lagrange multipliers of budget_loss, two per kind (lambda1, lambda2), starting at 0.
    They get the negated gradient, so any minimising optimizer that holds them ascends them
    (CoFi trains its multipliers by gradient ascent with a separate optimizer)."""

    def __init__(self):
        super().__init__()
        for kind in ("heads", "ffn", "layers"):
            self.register_parameter(f"{kind}_lambda", nn.Parameter(torch.zeros(2)))

    def pair(self, kind):
        return _ReverseGrad.apply(getattr(self, f"{kind}_lambda"))


def budget_loss(model, *, heads=None, ffn=None, layers=None, step=None, warmup_steps=0,
                penalty=BUDGET_PENALTY) -> torch.Tensor:
    """CoFi's Lagrangian towards target keep fractions: sum over the kinds given of
    lambda1 * (E - t) + (lambda2 + penalty) * (E - t)**2, where E is keep_fractions' expected
    fraction and t the target. The multipliers (model's `sparse_budget` module, made at the first
    call, so build the optimizer after it or add them) ascend while the gates descend.
    warmup_steps > 0: the target moves linearly from 1 (dense) at step 0 to t at step warmup_steps.

    penalty: a fixed weight on the quadratic term (penalty=0 is CoFi's form exactly). Its gradient
    2 * penalty * (E - t) pulls in proportion to the miss from the first step, where lambda2 starts
    at 0 and grows only by (E - t)**2 per step: lambda1 alone integrates the miss and, against
    gates moved by Adam's near-constant steps, overshoots the target and swings around it (measured
    on MiniLM, README "Gate training end to end"); the proportional pull damps that swing. Train the
    multipliers by plain SGD (lr ~0.05, as examples/train_gates.py): each step then moves lambda1 in
    proportion to the miss, where Adam's normalised steps keep winding it up while a whole-unit
    count cannot sit exactly on the target, and the count swings past it.
    """
    targets = {"heads": heads, "ffn": ffn, "layers": layers}
    for k, t in targets.items():
        if t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= t <= 1.0):
            raise ValueError(f"sparse_ops.gates.budget_loss: {k} must be a keep fraction in [0, 1] or None; got {t!r}")
    if isinstance(penalty, bool) or not isinstance(penalty, numbers.Real) or not (math.isfinite(penalty) and penalty >= 0):
        raise ValueError(f"sparse_ops.gates.budget_loss: penalty must be a finite number >= 0; got {penalty!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"sparse_ops.gates.budget_loss: warmup_steps must be an int >= 0; got {warmup_steps!r}")
    if warmup_steps > 0 and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"sparse_ops.gates.budget_loss: with warmup_steps, step must be an int >= 0; got {step!r}")
    e = _expected_keep(model, "budget_loss")
    mult = getattr(model, "sparse_budget", None)
    if mult is None:
        dev = next(model.parameters()).device
        model.sparse_budget = mult = BudgetMultipliers().to(dev)
    frac = 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)
    loss = None
    for k, t in targets.items():
        if t is None:
            continue
        if k not in e:
            raise ValueError(f"sparse_ops.gates.budget_loss: a {k} target was given, but the model has no {k} gates")
        t_now = 1.0 - (1.0 - t) * frac
        lam = mult.pair(k)
        d = e[k] - t_now
        term = lam[0] * d + (lam[1] + penalty) * d * d
        loss = term if loss is None else loss + term
    if loss is None:
        raise ValueError("sparse_ops.gates.budget_loss: give at least one target (heads=, ffn= or layers=)")
    # The multipliers of kinds without a target join with weight 0, so that every parameter gets a
    # gradient (DistributedDataParallel without find_unused_parameters).
    unused = [getattr(mult, f"{k}_lambda") for k, t in targets.items() if t is None]
    return loss + sum(u.sum() for u in unused) * 0.0 if unused else loss


__all__ = ["ste_threshold", "ste_topk", "gumbel_gate", "HardConcrete", "UnitGate", "FFNRouter", "SampleRouter", "LayerGates", "keep_fractions",
           "budget_loss", "BudgetMultipliers", "BUDGET_PENALTY", "GATE_KINDS"]
