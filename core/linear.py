"""A Linear layer whose fp32 CPU products run on oneDNN where torch's BLAS would leave half the vector width idle.

torch's x86 wheels multiply fp32 matrices with MKL, and MKL runs its AVX-512 kernels only on Intel CPUs: on
an AVX-512 AMD CPU it falls back to AVX2 and reaches half the machine's peak (195 against oneDNN's 428 GFLOP/s
for a 2048² product on the 2-core EPYC of benchmarks/README.md). oneDNN, which torch also ships, dispatches on
the instruction set alone. So on such CPUs core's linears call oneDNN's fp32 matmul for the forward product and
both backward products; everywhere else (GPUs, Intel and AVX2 CPUs, autocast, other dtypes) they are F.linear.
The arithmetic is the same fp32 (oneDNN's default math mode never down-converts); only the summation order
differs, as it does between any two BLAS libraries. torch's own switch, `torch.backends.mkldnn.flags(enabled=False)`,
turns it off: F.linear everywhere, e.g. for results bit-identical between an AMD and an Intel node.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

from core.transpose import transposed

# (X, W, B, "none", [], "") -> X @ W^T + B; absent from torch builds without oneDNN, which keep F.linear.
_onednn_matmul = getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def cpu_prefers_onednn():
    """Whether this CPU has AVX-512 that MKL will not use: not an Intel CPU (MKL's kernels dispatch on the vendor)."""
    if _onednn_matmul is None or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return False
    return vendor != "GenuineIntel"


ONEDNN_PREFERRED = cpu_prefers_onednn()  # decided once, at import: torch.compile traces a constant


@torch.library.custom_op("core::onednn_matmul", mutates_args=())
def _compilable_matmul(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """oneDNN's product as an op inductor calls as is: it lowers mkldnn's own op only for constant (frozen) weights."""
    return _onednn_matmul(x, w, b, "none", [], "")


@_compilable_matmul.register_fake
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0])


def _matmul(x, w, b=None):
    """x @ w^T + b through oneDNN; x (M, K), w (N, K) -> (M, N)."""
    if torch.compiler.is_compiling():
        return _compilable_matmul(x, w, b)
    return _onednn_matmul(x, w, b, "none", [], "")  # the custom op's dispatch would add 6 µs a call in eager mode


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with all three products (forward, input and weight gradients) on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        ctx.save_for_backward(x2, weight)
        ctx.input_shape = x.shape
        ctx.has_bias = bias is not None
        y = _matmul(x2, weight, bias)  # (M, N)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable  # oneDNN's product has no derivative of its own: a second one would be zero, silently
    def backward(ctx, grad_y):
        x2, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (M, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(g, weight.t()).view(ctx.input_shape)  # (M, K)
        if ctx.needs_input_grad[1]:
            # g^T x, (N, K). oneDNN's first operand must be row-major: a transposed copy of g (M·N floats), or of x
            # (M·K) for (x^T g)^T, whose (K, N) result is laid out as the parameter's (N, K) (N·K more): the fewer
            # floats copied (x for a block's wide linears, g for the adaLN's, whose M is the batch alone).
            # Made here rather than inside the op, so that torch.compile writes it as a vectorised tiled transpose
            # (compiled DiT-M/2 step, batch 128: 367 against 408 ms median); eager, core.transpose's copies, where
            # aten's are scalar (autograd would lay the result out with aten's when it first sets the gradient).
            m, n, k = g.shape[0], g.shape[1], x2.shape[1]
            compiling = torch.compiler.is_compiling()
            copy = (lambda a: a.t().contiguous()) if compiling else transposed
            if m * k + n * k < m * n:
                grad_w = _matmul(copy(x2), g.t())  # (K, N)
                grad_w = grad_w.t() if compiling else transposed(grad_w)  # (N, K)
            else:
                grad_w = _matmul(copy(g), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)  # (N,)
        return grad_x, grad_w, grad_b


def linear(x, weight, bias=None):
    """F.linear, through oneDNN for fp32 CPU tensors on CPUs that prefer it (see the module docstring)."""
    # An empty batch stays with F.linear: oneDNN cannot build the backward's products of a zero-length dimension.
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and ONEDNN_PREFERRED and torch.backends.mkldnn.enabled
            and x.numel() > 0):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose product goes through `linear`."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def _onednn_matmul_flop(x_shape, w_shape, *args, out_shape=None, **kwargs):
    """FlopCounterMode's count of oneDNN's product, like its count of aten.mm (a multiply-add is 2 flops)."""
    m, k = x_shape
    return 2 * m * k * w_shape[0]


if _onednn_matmul is not None:
    register_flop_formula(_onednn_matmul)(_onednn_matmul_flop)
