"""Gflops, parameters and training compute in the paper's convention (one multiply-add = one flop)."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

TIMESTEP_FREQUENCIES = 256  # TimestepEmbedder's sinusoid width


def gflops_from_config(input_size, patch_size, in_channels, hidden_size, depth, mlp_ratio=4.0, learn_sigma=True,
                       **_):
    """Forward Gflops per image from the architecture alone: every matmul and the two attention products.

    Elementwise work (norms, activations, softmax) is not counted, as in the paper; nor is the VAE.
    """
    t = (input_size // patch_size) ** 2  # tokens
    d = hidden_size
    c_out = in_channels * 2 if learn_sigma else in_channels
    mlp = int(d * mlp_ratio)
    per_block = (
        t * d * 3 * d  # qkv
        + 2 * t * t * d  # q·kᵀ and attn·v
        + t * d * d  # attention output projection
        + 2 * t * d * mlp  # fc1, fc2
        + d * 6 * d  # adaLN modulation, once per image
    )
    embed = t * in_channels * patch_size ** 2 * d + TIMESTEP_FREQUENCIES * d + d * d
    final = d * 2 * d + t * d * patch_size ** 2 * c_out
    return (depth * per_block + embed + final) / 1e9


def gflops(model):
    """Forward Gflops per image of a DiT (paper convention), from its config."""
    return gflops_from_config(**model.config)


def measure_gflops(model):
    """Forward Gflops per image counted by torch's FlopCounterMode (its flops / 2).

    The math attention backend is forced so the attention products appear as countable matmuls
    whatever the device; the model may live on the meta device, which makes this instant.
    """
    cfg = model.config
    device = next(model.parameters()).device
    x = torch.zeros(1, cfg["in_channels"], cfg["input_size"], cfg["input_size"], device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, t, y)
    return counter.get_total_flops() / 2 / 1e9


def params(model):
    """Parameter count, including the frozen positional embedding (as the paper counts)."""
    return sum(p.numel() for p in model.parameters())


def training_compute(gflops_per_image, batch_size, steps):
    """Training compute in Gflops as the paper defines it: forward Gflops × batch × steps × 3."""
    return gflops_per_image * batch_size * steps * 3


def train_flop_per_image(gflops_per_image):
    """True floating-point operations to train on one image (forward + backward, a multiply-add = 2)."""
    return gflops_per_image * 1e9 * 3 * 2
