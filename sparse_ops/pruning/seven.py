"""SEVEN (Xiao et al. 2024, "Pruning Transformer Model by Reserving Sentinels"): a weight's
importance accumulates |W * g * m_hat / v_hat| over the pruning steps, g = |dL/dW|, m and v the
bias-corrected first and second moments of g (alpha1, alpha2), so weights whose gradients are
large but noisy ("sentinels" of the loss surface) are not mistaken for important ones. The kept
fraction follows a cubic schedule from 1 down to `keep`; one global threshold across the pruned
weights; pruned weights stay pruned.

Granularities:
  "unstructured"   element by element (the paper's); gives no speedup on dense kernels.
  "2:4"            2 of every 4 consecutive inputs per output row (the N:M pattern of sparse tensor
                   cores); the mask is fixed at the last pruning step from the accumulated scores.
  "column", "head", "layer" (or a tuple of them): the same element scores summed per FFN column,
                   attention head (GQA: a KV group's k/v rows shared by its heads) or layer, one
                   threshold per kind across layers; the unit masks feed sparse_ops.set_masks and
                   pruning.compact, which is where the speedup comes from.
"""
from __future__ import annotations

import torch

from .. import patching
from ._arch import arch, parts

STRUCTURED = ("column", "head", "layer")
GRANULARITIES = ("unstructured", "2:4") + STRUCTURED
_UNIT_KEY = {"column": "ffn", "head": "heads", "layer": "layers"}


def _number(name, value, ok, text):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"sparse_ops.pruning.Seven: {name} must be {text}; got {value!r}")


class Seven:
    """Seven(model, keep, start_step=0, steps=100, alpha1=0.8, alpha2=0.9,
    granularity="unstructured", modules=None). Call .step() after loss.backward() (and the
    optimizer step) of every training step (SEVEN-dyn), or use Seven.pre(...) to prune on a few
    batches before training (SEVEN-pre). .scores and .masks are keyed by parameter name;
    .unit_masks (structured granularities) by kind, for set_masks / compact."""

    def __init__(self, model, keep, start_step=0, steps=100, alpha1=0.8, alpha2=0.9, granularity="unstructured",
                 modules=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"sparse_ops.pruning.Seven: model must be a torch.nn.Module; got {type(model).__name__}")
        _number("keep", keep, lambda x: 0.0 < x <= 1.0, "a fraction in (0, 1]")
        _number("alpha1", alpha1, lambda x: 0.0 <= x < 1.0, "in [0, 1)")
        _number("alpha2", alpha2, lambda x: 0.0 <= x < 1.0, "in [0, 1)")
        for name, v, lo in (("start_step", start_step, 0), ("steps", steps, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"sparse_ops.pruning.Seven: {name} must be an int >= {lo}; got {v!r}")
        kinds = (granularity,) if isinstance(granularity, str) else tuple(granularity) \
            if isinstance(granularity, (tuple, list)) else None
        if not kinds or any(k not in GRANULARITIES for k in kinds) or len(set(kinds)) != len(kinds) or (
                len(kinds) > 1 and any(k not in STRUCTURED for k in kinds)):
            raise ValueError(f"sparse_ops.pruning.Seven: granularity must be one of {GRANULARITIES} or a tuple of "
                             f"{STRUCTURED}; got {granularity!r}")
        self.model, self.keep, self.start_step, self.steps = model, float(keep), start_step, steps
        self.alpha1, self.alpha2 = float(alpha1), float(alpha2)
        self.granularity = granularity
        self.kinds = kinds
        self.structured = kinds[0] in STRUCTURED
        if kinds == ("2:4",) and self.keep != 0.5:
            raise ValueError(f"sparse_ops.pruning.Seven: granularity '2:4' keeps exactly half of the weights; keep must "
                             f"be 0.5; got {keep!r}")
        names = {id(p): n for n, p in model.named_parameters()}
        if self.structured:
            if modules is not None:
                raise ValueError("sparse_ops.pruning.Seven: modules must be None for a structured granularity (it "
                                 "prunes the attention and FFN linears of every transformer layer)")
            self._arch = arch(model, "Seven")
            if "layer" in kinds and getattr(model, "_sparse_patch", None) is None:
                raise ValueError("sparse_ops.pruning.Seven: granularity 'layer' needs a patched model "
                                 "(sparse_ops.patch(model)): a pruned layer is skipped through set_masks, since "
                                 "zeroing its weights does not make it an identity")
            self._parts = [parts(self._arch, layer) for layer in self._arch.layers]
            linears = [m for pt in self._parts for m in (pt["q"], pt["k"], pt["v"], pt["o"], *pt["ffn_in"],
                                                          pt["ffn_out"])]
        else:
            linears = self._pick(model, modules)
        self._w = {}
        for lin in linears:
            n = names.get(id(lin.weight))
            if n is None:
                raise ValueError("sparse_ops.pruning.Seven: modules must belong to the model")
            self._w[n] = lin.weight
        if kinds == ("2:4",):
            for n, w in self._w.items():
                if w.shape[-1] % 4:
                    raise ValueError(f"sparse_ops.pruning.Seven: granularity '2:4' needs in_features divisible by 4; "
                                     f"{n} has {w.shape[-1]}")
        self._acc_dtype = {n: (torch.float64 if w.dtype == torch.float64 else torch.float32) for n, w in self._w.items()}
        z = {n: torch.zeros(w.shape, dtype=self._acc_dtype[n], device=w.device) for n, w in self._w.items()}
        self._m = {n: t.clone() for n, t in z.items()}
        self._v = {n: t.clone() for n, t in z.items()}
        self._score = z
        self._mask = {n: torch.ones(w.shape, dtype=torch.bool, device=w.device) for n, w in self._w.items()}
        self.unit_masks = self._initial_units() if self.structured else None
        self._calls = 0
        self.t = 0
        self._hooks = [w.register_hook(self._grad_hook(n)) for n, w in self._w.items()]

    # ------------------------------------------------------------- set-up
    @staticmethod
    def _pick(model, modules):
        named = dict(model.named_modules())
        if modules is None:
            lins = [m for m in named.values() if isinstance(m, torch.nn.Linear)]
            if len(lins) < 2:
                raise ValueError("sparse_ops.pruning.Seven: the model has fewer than two nn.Linear modules; with "
                                 "modules=None every nn.Linear but the last (the classifier) is pruned")
            return lins[:-1]
        out = []
        for m in modules:
            mod = named.get(m) if isinstance(m, str) else m
            if not isinstance(mod, torch.nn.Linear) or not any(mod is x for x in named.values()):
                raise ValueError(f"sparse_ops.pruning.Seven: modules must name nn.Linear modules of the model (as in "
                                 f"model.named_modules()); {m!r} is not one")
            out.append(mod)
        if not out:
            raise ValueError("sparse_ops.pruning.Seven: modules is empty")
        return out

    def _initial_units(self):
        a = self._arch
        L = len(self._parts)
        dev = self._parts[0]["o"].weight.device
        out = {}
        for k in self.kinds:
            if k == "head":
                out["heads"] = [torch.ones(a.num_heads, dtype=torch.bool, device=dev) for _ in range(L)]
            elif k == "column":
                out["ffn"] = [torch.ones(pt["ffn_out"].weight.shape[1], dtype=torch.bool, device=dev)
                              for pt in self._parts]
            else:
                out["layers"] = torch.ones(L, dtype=torch.bool, device=dev)
        return out

    def _grad_hook(self, name):
        def hook(g):
            return g * self._mask[name]
        return hook

    def remove(self):
        """Detach the gradient hooks (the weights stay as they are)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------- public views
    @property
    def scores(self) -> dict:
        return dict(self._score)

    @property
    def masks(self) -> dict:
        return dict(self._mask)

    @classmethod
    def pre(cls, model, batches, loss_fn, keep, **kwargs):
        """SEVEN-pre: score and prune on `batches` before training; loss_fn(model, batch) -> scalar
        loss. steps = len(batches): the kept fraction reaches `keep` at the last batch. Returns the
        pruner (the model's weights are masked; its gradients are cleared)."""
        batches = list(batches)
        if not batches:
            raise ValueError("sparse_ops.pruning.Seven.pre: batches is empty")
        if not callable(loss_fn):
            raise TypeError(f"sparse_ops.pruning.Seven.pre: loss_fn must be callable (model, batch) -> loss; got "
                            f"{type(loss_fn).__name__}")
        for k in ("steps", "start_step"):
            if k in kwargs:
                raise ValueError(f"sparse_ops.pruning.Seven.pre: {k} is set by the number of batches")
        p = cls(model, keep, start_step=0, steps=len(batches), **kwargs)
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, b).backward()
            p.step()
        model.zero_grad(set_to_none=True)
        return p

    def set_masks(self):
        """Hand the unit masks to sparse_ops.set_masks on the (patched) model: the real speedup."""
        if not self.structured:
            raise ValueError("sparse_ops.pruning.Seven.set_masks: an unstructured or 2:4 mask has no unit masks; use a "
                             "structured granularity ('column', 'head', 'layer')")
        patching.set_masks(self.model, **self.unit_masks)

    def to_semi_structured(self) -> list:
        """Make the final 2:4 masks physical for torch's semi-structured sparse matmul (sparse tensor
        cores, sm_80+): each pruned nn.Linear's weight becomes
        torch.sparse.to_sparse_semi_structured(weight * mask), a frozen parameter, so F.linear runs
        the 2:4 kernel (inference only: the weight gets no gradient; the gradient hooks are removed).
        Needs granularity "2:4" after its last pruning step, and CUDA float16 / bfloat16 weights;
        torch's own error names a weight shape its kernels do not take. Returns the converted
        parameter names. Not yet run on a GPU by this project (no GPU machine so far)."""
        op = "sparse_ops.pruning.Seven.to_semi_structured"
        if self.kinds != ("2:4",):
            raise ValueError(f"{op}: needs granularity '2:4'; this pruner's is {self.granularity!r}")
        if self.t < self.steps:
            raise ValueError(f"{op}: the 2:4 masks are set at the last pruning step; {self.t} of {self.steps} "
                             f"steps have run")
        for n, w in self._w.items():
            if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(f"{op}: torch's semi-structured sparse matmul needs CUDA float16 / bfloat16 weights "
                                 f"(sm_80 or newer); {n} is {w.dtype} on {w.device}")
        from torch.sparse import to_sparse_semi_structured
        owner = {id(m.weight): m for m in self.model.modules() if isinstance(m, torch.nn.Linear)}
        self.remove()
        done = []
        for n, w in self._w.items():
            with torch.no_grad():
                sparse = to_sparse_semi_structured(w.detach() * self._mask[n].to(w.dtype))
            owner[id(w)].weight = torch.nn.Parameter(sparse, requires_grad=False)
            done.append(n)
        return done

    # ------------------------------------------------------------- one pruning step
    def keep_at(self, t: int) -> float:
        """The kept fraction after pruning step t (0-based): keep + (1 - keep)(1 - (t+1)/steps)^3."""
        return self.keep + (1.0 - self.keep) * (1.0 - (t + 1) / self.steps) ** 3

    @torch.no_grad()
    def step(self):
        t = self._calls - self.start_step
        self._calls += 1
        if t < 0:
            return
        if t < self.steps:
            self._accumulate(t)
            r = self.keep_at(t)
            if self.kinds == ("2:4",):
                if t == self.steps - 1:
                    self._two_four()
            elif self.structured:
                self._structured(r)
            else:
                self._unstructured(r)
            self.t = t + 1
        self._apply()

    def _accumulate(self, t):
        a1, a2 = self.alpha1, self.alpha2
        for n, w in self._w.items():
            if w.grad is None:
                raise ValueError(f"sparse_ops.pruning.Seven.step: parameter {n} has no gradient; call step() after "
                                 f"loss.backward()")
            dt = self._acc_dtype[n]
            g = w.grad.detach().to(dt).abs()
            self._m[n].mul_(a1).add_(g, alpha=1.0 - a1)
            self._v[n].mul_(a2).add_(g * g, alpha=1.0 - a2)
            mhat = self._m[n] / (1.0 - a1 ** (t + 1))
            vhat = torch.sqrt(self._v[n] / (1.0 - a2 ** (t + 1))) + 1e-9
            self._score[n].add_((w.detach().to(dt) * g * mhat / vhat).abs())
            self._score[n].masked_fill_(~self._mask[n], 0.0)

    @staticmethod
    def _threshold(flat: torch.Tensor, r: float):
        k = int(r * flat.numel())
        if k <= 0:
            return None
        return flat.kthvalue(flat.numel() - k + 1).values

    def _unstructured(self, r):
        flat = torch.cat([s.flatten().float() if s.dtype != torch.float64 else s.flatten()
                          for s in self._score.values()])
        thr = self._threshold(flat, r)
        for n, s in self._score.items():
            keep = torch.zeros_like(self._mask[n]) if thr is None else s >= thr.to(s.dtype)
            self._mask[n] &= keep

    def _two_four(self):
        for n, s in self._score.items():
            g = s.reshape(*s.shape[:-1], s.shape[-1] // 4, 4)
            top = g.topk(2, dim=-1).indices
            m = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True)
            self._mask[n] &= m.reshape(s.shape)

    # ------------------------------------------------------------- structured
    def _unit_scores(self, pt):
        """{"heads": [H], "ffn": [F], "layers": []} summed element scores of one layer's units."""
        a = self._arch
        sc = {k: self._score[self._name(pt[k])] for k in ("q", "k", "v", "o")}
        H, Hkv, dh = a.num_heads, a.num_kv_heads, a.head_dim
        heads = sc["q"].reshape(H, dh, -1).sum((1, 2)) + sc["o"].reshape(-1, H, dh).sum((0, 2))
        kv = (sc["k"] + sc["v"]).reshape(Hkv, dh, -1).sum((1, 2))
        heads = heads + kv.repeat_interleave(H // Hkv) / (H // Hkv)
        ffn = self._score[self._name(pt["ffn_out"])].sum(0)
        for lin in pt["ffn_in"]:
            ffn = ffn + self._score[self._name(lin)].sum(1)
        layer = sum(self._score[self._name(m)].sum() for m in (pt["q"], pt["k"], pt["v"], pt["o"], *pt["ffn_in"],
                                                              pt["ffn_out"]))
        return {"heads": heads, "ffn": ffn, "layers": layer}

    def _name(self, lin):
        if not hasattr(self, "_names"):
            self._names = {id(w): n for n, w in self._w.items()}
        return self._names[id(lin.weight)]

    def _structured(self, r):
        per_layer = [self._unit_scores(pt) for pt in self._parts]
        for kind in self.kinds:
            key = _UNIT_KEY[kind]
            if key == "layers":
                s = torch.stack([u["layers"] for u in per_layer]).masked_fill(~self.unit_masks["layers"], 0.0)
                thr = self._threshold(s, r)
                self.unit_masks["layers"] = self.unit_masks["layers"] & (
                    torch.zeros_like(s, dtype=torch.bool) if thr is None else s >= thr)
                continue
            ss = [u[key].masked_fill(~m, 0.0) for u, m in zip(per_layer, self.unit_masks[key])]
            thr = self._threshold(torch.cat(ss), r)
            self.unit_masks[key] = [m & (torch.zeros_like(m) if thr is None else s >= thr)
                                    for m, s in zip(self.unit_masks[key], ss)]
        self._element_masks()

    def _element_masks(self):
        a = self._arch
        H, Hkv, dh = a.num_heads, a.num_kv_heads, a.head_dim
        for i, pt in enumerate(self._parts):
            if "heads" in self.unit_masks:
                hm = self.unit_masks["heads"][i]
                rows = hm.repeat_interleave(dh)
                self._mask[self._name(pt["q"])] &= rows[:, None]
                self._mask[self._name(pt["o"])] &= rows[None, :]
                group = hm.reshape(Hkv, H // Hkv).any(1).repeat_interleave(dh)
                for k in ("k", "v"):
                    self._mask[self._name(pt[k])] &= group[:, None]
            if "ffn" in self.unit_masks:
                cm = self.unit_masks["ffn"][i]
                for lin in pt["ffn_in"]:
                    self._mask[self._name(lin)] &= cm[:, None]
                self._mask[self._name(pt["ffn_out"])] &= cm[None, :]

    def _apply(self):
        with torch.no_grad():
            for n, w in self._w.items():
                m = self._mask[n]
                if not bool(m.all()):
                    w.mul_(m.to(w.dtype))
        if self.structured and "layers" in self.unit_masks:
            patching.set_masks(self.model, layers=self.unit_masks["layers"])
