"""The reference DiT's GELU (tanh-approximated), computed on CPU as x·σ(2u), the same function.

0.5·x·(1 + tanh(u)) = x·σ(2u), u = √(2/π)·(x + 0.044715·x³). torch's vectorised CPU `tanh` is several times
slower than its `sigmoid` (1024×640 floats, one thread, on the AVX2 EPYC of benchmarks/README.md: `tanh` 2.52 ms,
`sigmoid` 0.83), in aten's GELU kernels and in inductor's alike. So on CPU:
- compiled, the sigmoid form, which inductor fuses into one kernel (DiT-T/2, per block: 0.84 against 1.30 ms
  forward, 0.49 against 0.97 backward);
- eager fp32, `SigmoidFormGELU`, which keeps σ(2u) for a backward of in-place passes (DiT-T/2's GELU at batch 64,
  `python -m benchmarks.gelu`: 2.05 against aten's 2.82 ms forward, 2.02 against 3.58 backward; eager ops under
  plain autograd would save every intermediate and take longer than aten's kernels).
GPUs, and other dtypes (autocast), keep aten's tanh kernel.
"""
import torch
import torch.nn.functional as F

_A = 0.044715
_SCALE = 2 * (2 / torch.pi) ** 0.5  # 2u = _SCALE·(x + _A·x³)


class SigmoidFormGELU(torch.autograd.Function):
    """y = x·σ(2u); saves σ(2u) (one more tensor of x's size than aten's GELU) for an element-wise backward."""

    @staticmethod
    def forward(ctx, x):
        s = x * x
        s.mul_(_SCALE * _A).add_(_SCALE).mul_(x).sigmoid_()  # σ(2u)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        # dy/dx = s + s(1 - s)·x·d(2u)/dx, in one buffer (a fresh one costs page faults). s(1 - s) comes before x so
        # that it is 0 where x³ may have overflowed, not 0·inf.
        d = x * x
        d.mul_(3 * _SCALE * _A).add_(_SCALE).mul_(s)  # s·d(2u)/dx
        d.addcmul_(d, s, value=-1).mul_(x).add_(s)
        return d.mul_(grad)


def approx_gelu(x):
    """The reference's GELU, tanh-approximated: on CPU as x·σ(2u) (see the module's docstring)."""
    if x.device.type == "cpu":
        if torch.compiler.is_compiling():
            return x * torch.sigmoid(_SCALE * (x + _A * x * x * x))
        if x.dtype == torch.float32:
            return SigmoidFormGELU.apply(x)
    return F.gelu(x, approximate="tanh")
