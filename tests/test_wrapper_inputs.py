"""The public wrappers on inputs that reach no kernel: meta tensors, mixed devices, None weights."""
import warnings

import pytest
import torch

import sparse_ops


def meta(*s, **kw):
    return torch.empty(*s, device="meta", **kw)


def test_gated_ffn_refuses_a_weight_on_another_device():
    # A meta w1 sent a CPU x to the fake kernel, which returned uninitialised CPU memory.
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"gated_ffn: w1 must be on x's device \(cpu\); got meta"):
        sparse_ops.gated_ffn(x, meta(7, 5), torch.randn(5, 7))
    with pytest.raises(ValueError, match=r"gated_ffn: gate must be on x's device"):
        sparse_ops.gated_ffn(x, torch.randn(7, 5), torch.randn(5, 7), gate=meta(7))


def test_gated_ffn_refuses_a_missing_weight():
    with pytest.raises(TypeError, match=r"gated_ffn: w2 must be a torch.Tensor; got NoneType"):
        sparse_ops.gated_ffn(torch.randn(3, 5), torch.randn(7, 5), None)


@pytest.mark.parametrize("active", [None, "idx", "bool", "per_row"])
def test_meta_inputs_give_meta_outputs(active):
    a = {None: None, "idx": torch.tensor([1, 4], device="meta"), "bool": meta(7, dtype=torch.bool),
         "per_row": meta(2, 3, 7, dtype=torch.bool)}[active]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no kernel for meta: the reference computes shapes
        y = sparse_ops.gated_ffn(meta(2, 3, 5), meta(7, 5), meta(5, 7), a)
        o = sparse_ops.masked_head_attention(meta(2, 3, 4, 8), meta(2, 3, 6, 8), meta(2, 3, 6, 8),
                                             meta(2, 3, dtype=torch.bool))
    assert y.device.type == "meta" and y.shape == (2, 3, 5)
    assert o.device.type == "meta" and o.shape == (2, 3, 4, 8)


@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_repeated_or_out_of_range_indices_refused_on_every_backend(backend):
    x, w1, w2 = torch.randn(2, 4), torch.randn(6, 4), torch.randn(4, 6)
    for bad in ([1, 1], [0, 6], [-1]):
        with pytest.raises((ValueError, RuntimeError), match="active indices must be (distinct|in)"):
            sparse_ops.gated_ffn(x, w1, w2, torch.tensor(bad), backend=backend)


def test_triton_gradients_contiguous_like_the_fake():
    # The op's fake promises contiguous weight gradients whatever the weights' strides; opcheck
    # compares the real kernel's against it.
    from sparse_ops.ops import registry
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(5, 7, dtype=torch.float64).t().requires_grad_()   # [7, 5], strided
    w2 = torch.randn(5, 7, dtype=torch.float64).t().requires_grad_()   # [7, 5] transposed layout, strided
    args = (x, w1, w2, None, None, None, torch.tensor([0, 4, 6]), None, "silu", True, False)
    torch.library.opcheck(registry.triton_op("gated_ffn"), args)
