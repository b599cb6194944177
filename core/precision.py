"""A trial's precision: what fp32, tf32 and bf16 mean for its products and its autocast.

- fp32: fp32 weights and IEEE fp32 products everywhere (matrix products and convolutions).
- tf32: fp32 weights, products on a GPU's TF32 tensor cores: how the reference DiT trains and samples
  (its train.py and sample_ddp.py turn TF32 on). A CPU has no TF32: there it computes what fp32 does.
- bf16: DeepSpeed's bf16 weights under bf16 autocast, fp32 master weights in the optimizer; what runs outside
  the autocast in fp32 (the VAE's decode of the samples) takes TF32 as under tf32.
FID's features are extracted in IEEE fp32 whatever the precision (ieee_products): the real images' are cached and
shared by every trial of a study.
"""
import contextlib

PRECISIONS = ("fp32", "tf32", "bf16")  # torch is imported where used: scaling.study reads these before torch is wanted


def autocast_dtype_for(precision):
    """The dtype a trial's forward passes autocast to, None for none."""
    import torch

    return torch.bfloat16 if precision == "bf16" else None


@contextlib.contextmanager
def ieee_products():
    """TF32 off inside (IEEE fp32 products and convolutions on a GPU), the switches as they were after."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def use_precision(precision):
    """Set this process's TF32 switches for precision: off for fp32, on for the others.

    Set both ways every time: a Ray worker process trains one trial after another. The legacy switches, not
    torch.backends.*.fp32_precision: mixing the two makes torch.get_float32_matmul_precision(), which inductor
    reads, raise. They leave CPU products alone (oneDNN's own setting is untouched).
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32  # torch's default is on: fp32 means IEEE convolutions too (the VAE's)
