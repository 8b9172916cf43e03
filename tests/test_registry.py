"""sparse_ops/ops/registry.py and sparse_ops/activations.py: one schema, one fake and one autograd
formula per op, shared by the C++ op and its Triton twin; one activation table."""
import os
import re

import pytest
import torch

import sparse_ops
from sparse_ops import activations
from sparse_ops.ops import registry

OPS = ("gated_ffn", "gated_ffn_backward", "masked_head_attention", "masked_head_attention_backward",
       "gather_rows", "scatter_rows", "scatter_rows_backward")


@pytest.mark.parametrize("name", OPS)
def test_triton_twin_has_the_cpp_schema(name):
    cpp = getattr(torch.ops.sparse_ops, name).default._schema
    twin = registry.triton_op(name)._opoverload._schema
    strip = lambda s: re.sub(r"^sparse_ops::\w+", "", str(s))  # noqa: E731
    assert strip(twin) == strip(cpp)
    exp = name.replace("_backward", "_triton_backward") if name.endswith("_backward") else name + "_triton"
    assert str(twin).startswith(f"sparse_ops::{exp}(")


def test_triton_twin_is_registered_once():
    assert registry.triton_op("gated_ffn") is registry.triton_op("gated_ffn")


@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_run_runs_the_chosen_backend(backend):
    torch.manual_seed(0)
    gpu_triton = backend == "triton" and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    dev = "cuda" if gpu_triton else "cpu"
    x, w1, w2 = torch.randn(3, 8, device=dev), torch.randn(12, 8, device=dev), torch.randn(8, 12, device=dev)
    active = torch.tensor([0, 5, 11], device=dev)
    got = registry.run("gated_ffn", x.device, backend, x, w1, w2, None, None, None, active, None, "gelu", False, False)
    exp = sparse_ops.reference.gated_ffn(x, w1, w2, active)
    torch.testing.assert_close(got, exp)


def test_run_records_a_graph_only_when_needed():
    x, w1, w2 = torch.randn(2, 4), torch.randn(6, 4, requires_grad=True), torch.randn(4, 6)
    args = (None, None, None, None, None, "relu", False, False)
    run = lambda *a, **kw: registry.run("gated_ffn", x.device, "cpp", *a, **kw)  # noqa: E731
    assert run(x, w1, w2, *args).grad_fn is not None
    with torch.no_grad():
        assert run(x, w1, w2, *args).grad_fn is None
    assert run(x, w1.detach(), w2, *args).grad_fn is None
    # A caller's own answer is taken as given (gated_ffn passes its `save`).
    assert run(x, w1, w2, *args, grad=False).grad_fn is None


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_ops.gated_ffn(torch.randn(2, 4), torch.randn(6, 4), torch.randn(4, 6), backend="nope")


def test_activation_table_matches_the_cpp_op():
    # csrc parses the names itself (C++ cannot import the table): same names, same order.
    x, w1, w2 = torch.randn(2, 4), torch.randn(6, 4), torch.randn(4, 6)
    with pytest.raises(RuntimeError) as e:
        torch.ops.sparse_ops.gated_ffn(x, w1, w2, None, None, None, None, None, "tanh", False, False)
    assert re.findall(r"'(\w+)'", str(e.value).split("got")[0]) == list(activations.NAMES)
    for name in activations.NAMES:
        got = sparse_ops.gated_ffn(x, w1, w2, activation=name, backend="cpp")
        exp = torch.nn.functional.linear(activations.forward(name)(x @ w1.t()), w2)
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("name", activations.NAMES)
def test_activation_backward_is_autograds(name):
    pre = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 7, dtype=torch.float64)
    (exp,) = torch.autograd.grad(activations.forward(name)(pre), pre, g)
    torch.testing.assert_close(activations.backward(g, pre.detach(), name), exp)


def test_activation_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"gated_ffn: activation must be one of .*'swish'"):
        sparse_ops.gated_ffn(torch.randn(2, 4), torch.randn(6, 4), torch.randn(4, 6), activation="swish")


def _second_order(f, *inputs):
    (g,) = torch.autograd.grad(f(*inputs).square().sum(), inputs[0], create_graph=True)
    return torch.autograd.grad(g.square().sum(), inputs)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_double_backward_is_refused_naming_the_op(backend):
    # The backward ops have no derivative formula: a second-order gradient must not come out
    # silently wrong (autograd would otherwise treat their outputs as constants, with a warning).
    torch.manual_seed(0)
    D = torch.float64
    x, w1, w2 = (torch.randn(*s, dtype=D, requires_grad=True) for s in ((3, 5), (7, 5), (5, 7)))
    with pytest.raises(RuntimeError, match=r"sparse_ops::gated_ffn(_triton)?_backward: second-order gradients"):
        _second_order(lambda x, w1, w2: sparse_ops.gated_ffn(x, w1, w2, torch.tensor([1, 3]), backend=backend),
                      x, w1, w2)
    q = torch.randn(2, 3, 4, 8, dtype=D, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"sparse_ops::masked_head_attention(_triton)?_backward: second-order"):
        _second_order(lambda q: sparse_ops.masked_head_attention(q, q, q, torch.tensor([True, False, True]),
                                                                 backend=backend), q)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_rows_double_backward_is_exact(backend):
    # gather's backward is scatter_rows, which has its own formula: second order is exact.
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([3, -1, 0])
    assert torch.autograd.gradgradcheck(lambda a: sparse_ops.ops.gather_rows(a, idx, backend), [x])
