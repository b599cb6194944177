"""The DiT's LayerNorm (no affine), computed forward on CPU by torch's group-norm kernel: one group per token.

A group norm of one group over (tokens, D, 1) normalises each token's D features, the same function with the same
eps and biased variance, and torch's CPU kernel for it takes half the time of its layer-norm kernel on the DiT's
shapes (DiT-T/2's tokens at batch 64, (64, 16, 160), one thread on the AVX-512 EPYC of benchmarks/README.md: 59
against 119 µs). Its backward is the slower one (408 against 170 µs forward and backward), so the backward is
aten's layer-norm backward, from the mean and 1/σ the group norm returns (once differentiable, as core.gelu's GELU:
the trainer never differentiates twice). Compiled, under autocast, on GPUs, with an affine and for inputs of another
width (whose error is nn.LayerNorm's), nn.LayerNorm as it is.
"""
import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable


class _GroupNormForward(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) over the last dim: group norm forward, layer norm backward."""

    @staticmethod
    def forward(ctx, x, eps):
        d = x.shape[-1]
        rows = x.reshape(-1, d, 1)  # (tokens, D, 1): one group of D features per token
        y, mean, rstd = torch.native_group_norm(rows, None, None, rows.shape[0], d, 1, 1, eps)  # mean, rstd (tokens, 1)
        stats_shape = (*x.shape[:-1], 1)  # layer norm's
        ctx.save_for_backward(x, mean.view(stats_shape), rstd.view(stats_shape))
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, mean, rstd = ctx.saved_tensors
        grad_x, _, _ = torch.ops.aten.native_layer_norm_backward(grad, x, [x.shape[-1]], mean, rstd, None, None,
                                                                  [True, False, False])
        return grad_x, None


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same arguments, same state dict) whose CPU fp32 forward without affine is a group norm's."""

    def forward(self, x):
        if (x.device.type == "cpu" and x.dtype == torch.float32 and not self.elementwise_affine
                and len(self.normalized_shape) == 1 and x.dim() and x.shape[-1] == self.normalized_shape[0]
                and x.numel() and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")):
            return _GroupNormForward.apply(x, self.eps)
        return super().forward(x)
