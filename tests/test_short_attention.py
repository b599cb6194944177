"""core.short_attention: the reference's unfused attention products, with a backward of fewer copies."""
import pytest
import torch

from core.short_attention import _ShortAttention, short_attention

N, T, H, HEAD_DIM = 4, 16, 3, 8


def timm_attention(qkv, num_heads):
    """The reference's (timm's) attention as plain ops under autograd: split into heads, scale, products."""
    n, t, three_d = qkv.shape
    q, k, v = qkv.reshape(n, t, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    probs = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return (probs @ v).transpose(1, 2).reshape(n, t, three_d // 3)


def test_values_and_gradients_are_the_references():
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(N, T, 3 * H * HEAD_DIM, generator=g, requires_grad=True)
    grad = torch.randn(N, T, H * HEAD_DIM, generator=g)
    y = short_attention(qkv, H)
    assert type(y.grad_fn).__name__ == "_ShortAttentionBackward" and y.shape == (N, T, H * HEAD_DIM)
    (ours,) = torch.autograd.grad(y, qkv, grad)
    want = timm_attention(qkv, H)
    (theirs,) = torch.autograd.grad(want, qkv, grad)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("images, tokens, heads", [(2, 5, 2), (1, 4, 2), (3, 16, 1), (1, 1, 1)],
                         ids=["images and heads", "one image", "one head", "one token"])
def test_backward_is_the_derivative_of_the_forward(images, tokens, heads):
    # One image or one head: the head-by-head layout is a view of qkv, not a copy.
    qkv = torch.randn(images, tokens, 3 * heads * 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                      requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _ShortAttention.apply(x, heads), (qkv,))


def test_under_autocast_the_plain_products():
    qkv = torch.randn(N, T, 3 * H * HEAD_DIM, generator=torch.Generator().manual_seed(2), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = short_attention(qkv, H)
        want = timm_attention(qkv, H)
    assert type(y.grad_fn).__name__ != "_ShortAttentionBackward" and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)
    (ours,) = torch.autograd.grad(y.float().square().sum(), qkv)
    (theirs,) = torch.autograd.grad(want.float().square().sum(), qkv)
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def test_any_layout_of_input_and_gradient():
    """A strided qkv (a slice) and an expanded gradient (a sum's) go through the same products."""
    wide = torch.randn(N, T, 4 * H * HEAD_DIM, generator=torch.Generator().manual_seed(3), requires_grad=True)
    qkv = wide[..., : 3 * H * HEAD_DIM]  # not contiguous
    short_attention(qkv, H).sum().backward()  # the gradient arrives expanded from a scalar
    ours = wide.grad.clone()
    wide.grad = None
    timm_attention(qkv, H).sum().backward()
    torch.testing.assert_close(ours, wide.grad, rtol=1e-5, atol=1e-6)
