"""core.layer_norm: the group-norm forward is nn.LayerNorm's function and gradient, and is taken on CPU."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.layer_norm import LayerNorm
from op_names import OpNames  # tests/, on pytest's path


@pytest.mark.parametrize("shape, offset", [
    ((64, 16, 160), 0.0),  # DiT-T/2's tokens at batch 64
    ((8, 4, 96), 3.0),  # a /4 model's, off-centre
    ((5, 7), -2.0),  # plain rows
    ((3, 1, 1), 0.0),  # one feature: normalised to 0
])
def test_layer_norm_gives_torchs_values_and_gradient(shape, offset):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 2 + offset
    grad = torch.randn(*shape)
    norm = LayerNorm(shape[-1], elementwise_affine=False, eps=1e-6)
    ours = x.clone().requires_grad_()
    with OpNames() as ops:
        out = norm(ours)
        out.backward(grad)
    assert "aten::native_group_norm" in ops.names and "aten::native_layer_norm_backward" in ops.names
    assert "aten::native_layer_norm" not in ops.names
    ref = x.double().requires_grad_()
    want = F.layer_norm(ref, (shape[-1],), eps=1e-6)
    want.backward(grad.double())
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), want.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(6, 4, 48)[:, :, :32],  # rows apart: the reshape is a copy
    lambda: torch.randn(32, 5).t(),  # transposed
    lambda: torch.randn(32),  # one token
    lambda: torch.randn(1, 32).expand(3, 32),  # one row seen three times
])
def test_layer_norm_takes_any_layout(make):
    torch.manual_seed(0)
    leaf = make().requires_grad_()
    grad = torch.randn(*leaf.shape[::-1]).t() if leaf.dim() == 2 else torch.randn(*leaf.shape)  # 2-D: transposed
    norm = LayerNorm(32, elementwise_affine=False, eps=1e-6)
    out = norm(leaf)
    out.backward(grad)
    ref = leaf.detach().double().requires_grad_()
    want = F.layer_norm(ref, (32,), eps=1e-6)
    want.backward(grad.double())
    torch.testing.assert_close(out.double(), want.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=0, atol=1e-5)


def test_layer_norm_refuses_another_width_as_torchs_does():
    norm = LayerNorm(16, elementwise_affine=False, eps=1e-6)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        norm(torch.randn(3, 8))
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*, 16\], but got input of size\[\]"):
        norm(torch.tensor(1.0))


def test_layer_norm_is_nn_layer_norm_elsewhere():
    x = torch.randn(4, 6, 32)
    affine = LayerNorm(32, eps=1e-6)  # with weight and bias: torch's own
    with OpNames() as ops:
        out = affine(x)
    assert "aten::native_group_norm" not in ops.names
    torch.testing.assert_close(out, nn.functional.layer_norm(x, (32,), affine.weight, affine.bias, 1e-6))
    plain = LayerNorm(32, elementwise_affine=False, eps=1e-6)
    with OpNames() as ops:
        assert plain(x.double()).dtype == torch.float64  # other dtypes: torch's
    assert "aten::native_group_norm" not in ops.names
    with torch.autocast("cpu", dtype=torch.bfloat16), OpNames() as ops:
        plain(x)
    assert "aten::native_group_norm" not in ops.names
    assert plain.state_dict() == {} and isinstance(plain, nn.LayerNorm)  # the reference's keys, none
