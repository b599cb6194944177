"""Softmax attention over a few tokens on CPU, from the fused qkv projection, with one copy each way per pass.

For up to 16 tokens torch's fused CPU kernel pays a set-up per image and head that outweighs the products
(core.models.attention), so these are the reference's (timm's) unfused products. Under plain autograd those take
a copy of q, k, v and the output each way: matmul copies its strided operands, and the split into heads has the
permute, stack and clone of its backward. Here one copy lays q, k, v out head by head (none where that layout is
already a view: one image or one head), the products read them in place (k transposed as a view, the scale in the
product), and the backward writes the three gradients into one buffer and permutes it back once (DiT-T/2's block,
batch 64, one thread: 380 against 443 µs forward, 590 against 730 backward, on the AVX-512 EPYC of
benchmarks/README.md). Compiled or under autocast, the same products as plain ops, which inductor fuses.
"""
import torch
from torch.autograd.function import once_differentiable


class _ShortAttention(torch.autograd.Function):
    """softmax(q k^T / √d) v for each head; qkv (N, T, 3·D) in the timm layout (3, H, d) -> (N, T, D)."""

    @staticmethod
    def forward(ctx, qkv, num_heads):
        n, t, _ = qkv.shape
        heads = _timm_heads(qkv, num_heads)
        dh = heads.shape[-1]
        heads = heads.reshape(3, n * num_heads, t, dh)  # (3, NH, T, d): the one copy of the forward
        q, k, v = heads.unbind(0)  # each (NH, T, d)
        unused = q.new_empty(()).expand(n * num_heads, t, t)  # baddbmm with beta=0 neither reads nor propagates it
        probs = torch.baddbmm(unused, q, k.transpose(1, 2), beta=0, alpha=dh ** -0.5).softmax(-1)  # (NH, T, T)
        ctx.save_for_backward(heads, probs)
        ctx.num_heads = num_heads
        out = torch.bmm(probs, v)  # (NH, T, d)
        return merge_heads(out.view(n, num_heads, t, dh))  # (N, T, D)

    @staticmethod
    @once_differentiable  # the products write into one buffer (out=), which autograd cannot differentiate again
    def backward(ctx, grad):
        heads, probs = ctx.saved_tensors
        q, k, v = heads.unbind(0)
        n, t, d = grad.shape
        num_heads = ctx.num_heads
        dh = d // num_heads
        grad = grad.reshape(n, t, num_heads, dh).transpose(1, 2).reshape(n * num_heads, t, dh)  # (NH, T, d)
        # (3, NH, T, d), contiguous: q's, k's and v's gradients, permuted back in one copy
        grad_heads = heads.new_empty(heads.shape)
        grad_q, grad_k, grad_v = grad_heads.unbind(0)
        torch.bmm(probs.transpose(1, 2), grad, out=grad_v)
        grad_scores = torch._softmax_backward_data(torch.bmm(grad, v.transpose(1, 2)), probs, -1, probs.dtype)
        grad_scores.mul_(dh ** -0.5)  # (NH, T, T): the scale once here, not on both products
        torch.bmm(grad_scores, k, out=grad_q)
        torch.bmm(grad_scores.transpose(1, 2), q, out=grad_k)
        grad_qkv = grad_heads.view(3, n, num_heads, t, dh).permute(1, 3, 0, 2, 4).reshape(n, t, 3 * d)
        return grad_qkv, None


def _timm_heads(qkv, num_heads):
    """Fused projections (N, T, 3·D) in the timm layout (3, H, d) as a view (3, N, H, T, d)."""
    n, t, three_d = qkv.shape
    return qkv.reshape(n, t, 3, num_heads, three_d // (3 * num_heads)).permute(2, 0, 3, 1, 4)


def split_heads(qkv, num_heads):
    """The timm layout's q, k, v, each (N, H, T, d), as views of fused projections (N, T, 3·D)."""
    return _timm_heads(qkv, num_heads).unbind(0)


def merge_heads(x):
    """Heads' outputs (N, H, T, d) back to tokens (N, T, D)."""
    n, h, t, d = x.shape
    return x.transpose(1, 2).reshape(n, t, h * d)


def unfused_attention(qkv, num_heads):
    """The reference's (timm's) attention as plain ops under autograd: (N, T, 3·D) -> (N, T, D)."""
    q, k, v = split_heads(qkv, num_heads)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, H, T, T)
    return merge_heads(scores.softmax(dim=-1) @ v)


def short_attention(qkv, num_heads):
    """Attention of (N, T, 3·D) fused projections -> (N, T, D) as unfused products, for CPU and a few tokens."""
    if not torch.compiler.is_compiling() and not torch.is_autocast_enabled(qkv.device.type):
        return _ShortAttention.apply(qkv, num_heads)
    return unfused_attention(qkv, num_heads)
