"""base + factor·tokens with one factor per image, whose backward skips a pass torch's addcmul makes.

torch's derivative of addcmul(self, t1, t2, value) multiplies each operand by `value` before its product with the
gradient (grad · (t2·value)): with value 1, a full pass writing a copy of the (N, T, D) tokens, once in each adaLN
modulation and each gated residual, four times a block. Here the derivative is the same products without it, in the
same order: forward and gradients are bitwise torch's (tests/test_token_addcmul.py), one pass faster. Compiled, it
is plain addcmul, whose derivative inductor fuses anyway. Measured in benchmarks/README.md (train_step).
"""
import torch


class _TokenAddcmul(torch.autograd.Function):
    """y = base + factor·tokens; base (N, D) or (N, T, D), factor (N, D), tokens (N, T, D)."""

    @staticmethod
    def forward(ctx, base, factor, tokens):
        factor = factor.unsqueeze(1)  # (N, 1, D)
        ctx.base_per_image = base.dim() == 2
        ctx.save_for_backward(factor, tokens)
        return torch.addcmul(base.unsqueeze(1) if ctx.base_per_image else base, tokens, factor)  # (N, T, D)

    @staticmethod
    def backward(ctx, grad):
        factor, tokens = ctx.saved_tensors
        grad_base = grad_factor = grad_tokens = None
        if ctx.needs_input_grad[0]:
            grad_base = grad.sum(1) if ctx.base_per_image else grad
        if ctx.needs_input_grad[1]:
            grad_factor = (grad * tokens).sum(1)  # (N, D)
        if ctx.needs_input_grad[2]:
            grad_tokens = grad * factor  # (N, T, D)
        return grad_base, grad_factor, grad_tokens


def token_addcmul(base, factor, tokens):
    """base + factor·tokens, the factor (N, D) broadcast over the tokens (N, T, D); base (N, D) or (N, T, D)."""
    if torch.compiler.is_compiling():
        base = base.unsqueeze(1) if base.dim() == 2 else base
        return torch.addcmul(base, tokens, factor.unsqueeze(1))
    return _TokenAddcmul.apply(base, factor, tokens)
