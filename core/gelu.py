"""The reference DiT's GELU (tanh-approximated), computed on CPU as x·σ(2u), the same function.

0.5·x·(1 + tanh(u)) = x·σ(2u), u = √(2/π)·(x + 0.044715·x³). torch's vectorised CPU `tanh` is several times
slower than its `sigmoid` (1024×640 floats, one thread, on the AVX2 EPYC of benchmarks/README.md: `tanh` 2.52 ms,
`sigmoid` 0.83), in aten's GELU kernels and in inductor's alike. So on CPU:
- compiled, the sigmoid form, which inductor fuses into one kernel (DiT-T/2, per block: 0.84 against 1.30 ms
  forward, 0.49 against 0.97 backward);
- eager fp32, `SigmoidFormGELU`, which keeps σ(2u) for a backward of in-place passes: four passes forward, four
  back, one fresh buffer each way beside the output (DiT-T/2's GELU at batch 64, `python -m benchmarks.gelu`, on
  the AVX-512 EPYC, medians: 0.32 against aten's 0.71 ms forward, 0.29 against 0.82 backward; eager ops under plain
  autograd would save every intermediate and take longer than aten's kernels).
GPUs, and other dtypes in eager mode (autocast), keep aten's tanh kernel; compiled on CPU, every dtype takes the
sigmoid form (inductor computes a bf16 kernel's pointwise ops in fp32).
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_A = 0.044715
_SCALE = 2 * (2 / torch.pi) ** 0.5  # 2u = _SCALE·(x + _A·x³)
# addcmul's 0-dim base: the constant term of a polynomial in x, in the same pass. In float64 on the CPU whatever the
# defaults at import: a 0-dim operand takes x's dtype (fp32 stays fp32), and a float64 x gets the constant whole.
_SCALE_T = torch.tensor(_SCALE, dtype=torch.float64, device="cpu")


class SigmoidFormGELU(torch.autograd.Function):
    """y = x·σ(2u); saves σ(2u) (one more tensor of x's size than aten's GELU) for an element-wise backward."""

    @staticmethod
    def forward(ctx, x):
        s = torch.addcmul(_SCALE_T, x, x, value=_SCALE * _A)  # _SCALE·(1 + _A·x²), x·x without a pass of its own
        s.mul_(x).sigmoid_()  # σ(2u)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    @once_differentiable  # its passes write in place (out=), which autograd cannot differentiate again
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        # dy/dx = s + s(1 - s)·x·d(2u)/dx, in one fresh buffer: in a training step a fresh buffer costs more than a
        # pass over one already written (the GELU's are the step's widest). s(1 - s) in one kernel, sigmoid's own
        # derivative, and before x: it is 0 where s saturates, so that a large x meets 0, not inf (x³ overflows).
        d = torch.addcmul(_SCALE_T, x, x, value=3 * _SCALE * _A)  # d(2u)/dx
        torch.ops.aten.sigmoid_backward.grad_input(d, s, grad_input=d)
        torch.addcmul(s, d, x, out=d)  # s + d·x in one pass, in place (out= may be an input it fully overlaps)
        return d.mul_(grad)


def approx_gelu(x):
    """The reference's GELU, tanh-approximated: on CPU as x·σ(2u) (see the module's docstring)."""
    if x.device.type == "cpu":
        if torch.compiler.is_compiling():
            return x * torch.sigmoid(_SCALE * (x + _A * x * x * x))
        if x.dtype == torch.float32:
            return SigmoidFormGELU.apply(x)
    return F.gelu(x, approximate="tanh")
