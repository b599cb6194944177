"""Diffusion Transformer (DiT) with adaLN-Zero conditioning, as in Peebles & Xie (2023).

Parameter names follow the reference implementation so that its released checkpoints load
with strict key matching.
"""
import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.gelu import approx_gelu
from core.layer_norm import LayerNorm
from core.linear import Linear, linear
from core.short_attention import merge_heads, short_attention, split_heads
from core.token_addcmul import token_addcmul


SHORT_SEQUENCE = 16  # tokens; up to this many, CPU attention is written out (see `attention`)


def attention(qkv, num_heads):
    """Softmax attention of fused qkv projections (N, T, 3·D), the timm layout, -> (N, T, D): torch's fused kernel,
    or on CPU for short sequences the reference's (timm's) unfused products (core.short_attention).

    On CPU the fused kernel (flash attention) pays a set-up per image and head that outweighs the products of 16
    or fewer tokens: forward and backward of a block's attention with the reshapes around it, batch 128, on the
    2-core EPYC of benchmarks/README.md: DiT-T/2's 2.22 against 1.93 ms eager and 4.34 against 1.68 compiled,
    DiT-M/2's 4.19 against 3.22 and 5.58 against 3.19; at 64 tokens (the /1 presets) the fused kernel is the
    faster, 23.97 against 27.45 ms. GPUs always take the fused kernel.
    """
    if qkv.device.type == "cpu" and qkv.shape[1] <= SHORT_SEQUENCE:
        return short_attention(qkv, num_heads)
    return merge_heads(F.scaled_dot_product_attention(*split_heads(qkv, num_heads)))  # (N, T, D)


def modulate(x, shift, scale):
    """Apply an adaLN shift and scale, given per image, to every token."""
    return token_addcmul(shift, 1 + scale, x)  # (N, T, D), one fused kernel


#################################################################################
#               Embedding layers for patches, timesteps and class labels        #
#################################################################################

class PatchProjection(nn.Conv2d):
    """The reference's stride-p, p×p patch convolution, computed as one matmul over flattened patches; returns tokens.

    On CPU the matmul is faster and gives the same result, while the parameters keep the conv layout (and state
    dict). It is a module of its own, called, rather than its weights used by PatchEmbed: ZeRO-3 gathers a module's
    parameters in hooks around its call, and a resumed run fails its first backward otherwise.
    """

    def forward(self, x):
        n, c, h, w = x.shape
        p = self.kernel_size[0]
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, h, w, C, p, p)
        x = x.reshape(n, (h // p) * (w // p), c * p * p)  # (N, T, C*p*p)
        return linear(x, self.weight.reshape(self.out_channels, -1), self.bias)  # (N, T, D)


class PatchEmbed(nn.Module):
    """Split an image into p×p patches and project each to the model width."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = PatchProjection(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Embed scalar diffusion timesteps: 256-d sinusoids, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Sinusoidal embedding of (possibly fractional) timesteps, cosines first."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding  # (N, dim)

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Embed class labels, with one extra "null" class dropped in for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null class, at random or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                                 DiT blocks                                    #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (the reference's timm layout)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, bias=True)
        self.proj = Linear(dim, dim)

    def forward(self, x):
        return self.proj(attention(self.qkv(x), self.num_heads))  # (N, T, D)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.fc2 = Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(approx_gelu(self.fc1(x)))


class DiTBlock(nn.Module):
    """A transformer block whose norms are modulated by adaLN-Zero (shift, scale, gate)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = token_addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = token_addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """The adaLN-modulated norm and the linear decoder of each token into a patch."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


#################################################################################
#                                   The model                                   #
#################################################################################

class DiT(nn.Module):
    """Diffusion model with a Transformer backbone."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
    ):
        super().__init__()
        check_shape(input_size, patch_size, hidden_size, num_heads, depth, mlp_ratio)
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma,
        )
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.gradient_checkpointing = False  # trade compute for activation memory (set by core.train)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos embedding; a parameter (not a buffer) so state dicts match the reference.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier-uniform linears, sin-cos positions, and zeros for adaLN-Zero and the output."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Initialise the patch projection like a linear layer, not a convolution.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p*p*C) tokens back to (N, C, H, W) images."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, force_drop_ids=None):
        """Predict noise (and the variance interpolation when learn_sigma) for x_t, t, labels y.

        force_drop_ids (1 = use the null label) lets a trainer draw label dropout itself, so that
        it depends on the sample and not on which process holds it.
        """
        size = self.config["input_size"]
        # A wrong layout can keep the token count ((1, 1, 4, 16) for an 8×8 model) and come back silently scrambled.
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, size, size):
            raise ValueError(f"x must be (N, {self.in_channels}, {size}, {size}), got {tuple(x.shape)}")
        x = self.x_embedder(x.to(self.pos_embed.dtype)) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=3):
        """Classifier-free guidance on a batch whose second half carries the null label.

        The reference guides only the first 3 channels (guided_channels=3), which reproduces the
        paper; guided_channels=None guides all of the in_channels noise channels.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        # The combination in fp32, as the reference samples: under bf16 autocast s·(cond - uncond) scales the rounding.
        model_out = self.forward(combined, t, y)
        model_out = model_out.to(torch.promote_types(model_out.dtype, torch.float32))  # bf16 up; fp32, fp64 as they are
        # Never more than the noise channels: the rest are the learned variance, which guidance leaves alone.
        k = self.in_channels if guided_channels is None else min(guided_channels, self.in_channels)
        eps, rest = model_out[:, :k], model_out[:, k:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


class _NoRandomInitOnMeta(torch.overrides.TorchFunctionMode):
    """Skips normal_ on meta tensors, which hold no values: torch's meta normal_ imports torch._dynamo (a CPU-second
    or two, in every process that checks a study). nn.init's is seen here, not the tensor method it calls."""

    SKIPPED = (torch.Tensor.normal_, nn.init.normal_, nn.init.trunc_normal_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            tensor = args[0] if args else kwargs["tensor"]  # nn.init passes it by name
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def meta_dit(**config):
    """A DiT of config on the meta device: its parameters' shapes, no memory and no initialisation."""
    with torch.device("meta"), _NoRandomInitOnMeta():
        return DiT(**config)


# The widest, deepest and widest-MLP DiT a config may ask for: far past any trained (DiT-XL: 1152 wide, 28 deep, ratio
# 4), they keep a size that overflows a tensor's, or a validation that builds thousands of blocks, out.
MAX_HIDDEN_SIZE, MAX_DEPTH, MAX_MLP_RATIO = 65536, 1000, 64
# The largest position table (tokens × hidden_size), 1 GiB in fp32: DiT-XL/2 at 512×512 has 1.2M entries. Its sin-cos
# values are computed on the CPU whenever a model is built (a study's check too, on the meta device): an 8192-pixel
# input asked for tens of GiB there and died out of memory.
MAX_POSITION_ENTRIES = 2 ** 28


def check_shape(input_size, patch_size, hidden_size, num_heads, depth, mlp_ratio):
    """Raise ValueError naming the field when a DiT shape cannot be built."""
    for name, value in (("input_size", input_size), ("patch_size", patch_size), ("hidden_size", hidden_size),
                        ("num_heads", num_heads), ("depth", depth)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value, most in (("hidden_size", hidden_size, MAX_HIDDEN_SIZE), ("depth", depth, MAX_DEPTH)):
        if value > most:
            raise ValueError(f"{name} {value} is past {most}, the most a DiT here may have")
    if not (isinstance(mlp_ratio, (int, float)) and not isinstance(mlp_ratio, bool)
            and math.isfinite(mlp_ratio) and 0 < mlp_ratio <= MAX_MLP_RATIO):
        raise ValueError(f"mlp_ratio must be a finite number in (0, {MAX_MLP_RATIO}], got {mlp_ratio!r}")
    if int(hidden_size * mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio {mlp_ratio} leaves the MLP no hidden units at hidden_size {hidden_size}")
    if input_size % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide input_size {input_size}")
    if hidden_size % num_heads:
        raise ValueError(f"num_heads {num_heads} does not divide hidden_size {hidden_size}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of 4 (2-D sin-cos positions)")
    tokens = (input_size // patch_size) ** 2
    if tokens * hidden_size > MAX_POSITION_ENTRIES:
        raise ValueError(f"input_size {input_size} at patch_size {patch_size} makes {tokens:,} tokens, whose positions "
                         f"at hidden_size {hidden_size} are past {MAX_POSITION_ENTRIES:,} entries, the most a DiT here "
                         "may have")


#################################################################################
#                         Sine/cosine positional embedding                      #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size*grid_size, embed_dim) sin-cos embedding: half the channels for rows, half for columns."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, -1)  # w varies fastest
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed(embed_dim, pos):
    """(M, embed_dim) embedding of positions pos: sines then cosines."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                DiT configs                                    #
#################################################################################

# (depth, hidden_size, num_heads) of each size. S/B/L/XL are the paper's (Table 1); the small ones
# are this project's ladder for CPU studies on 8×8 digits.
PAPER_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
SMALL_SIZES = {"P": (2, 64, 2), "N": (4, 96, 3), "T": (6, 160, 5), "M": (8, 256, 8)}
# Paper models default to 256×256 ImageNet latents; small presets to the 8×8 one-channel digits.
PAPER_DEFAULTS = dict(input_size=32, in_channels=4, num_classes=1000)
SMALL_DEFAULTS = dict(input_size=8, in_channels=1, num_classes=10)


def _make_constructor(depth, hidden_size, num_heads, patch_size, defaults):
    def constructor(**kwargs):
        return DiT(**{**defaults, "depth": depth, "hidden_size": hidden_size, "num_heads": num_heads,
                      "patch_size": patch_size, **kwargs})
    constructor.config = {**defaults, "depth": depth, "hidden_size": hidden_size, "num_heads": num_heads,
                          "patch_size": patch_size}
    return constructor


DiT_models = {}
for _size, (_depth, _width, _heads) in PAPER_SIZES.items():
    for _patch in (2, 4, 8):
        DiT_models[f"DiT-{_size}/{_patch}"] = _make_constructor(_depth, _width, _heads, _patch, PAPER_DEFAULTS)
for _size, (_depth, _width, _heads) in SMALL_SIZES.items():
    for _patch in (1, 2, 4):
        DiT_models[f"DiT-{_size}/{_patch}"] = _make_constructor(_depth, _width, _heads, _patch, SMALL_DEFAULTS)


_DEFAULT_KWARGS = dict(mlp_ratio=4.0, class_dropout_prob=0.1, learn_sigma=True)


def preset_name(size, patch):
    """The registry name of a size ("S", "XL", "T") at a patch; the size's first preset where the registry lacks that
    patch (DiT-P/8): the caller overrides its patch_size, as a study does."""
    name = f"DiT-{size}/{patch}"
    if name in DiT_models:
        return name
    return next(n for n in DiT_models if n.startswith(f"DiT-{size}/"))


def model_config(name, **overrides):
    """The full DiT keyword arguments of a registered name, with overrides applied."""
    if name not in DiT_models:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(DiT_models)}")
    return {**_DEFAULT_KWARGS, **DiT_models[name].config, **overrides}


#################################################################################
#                          Reference checkpoints                                #
#################################################################################

def load_reference_state_dict(path):
    """Read a DiT state dict in the reference layout from .pt/.pth or .safetensors.

    Accepts the released checkpoints (a bare state dict) and the reference trainer's
    checkpoints ({"model", "ema", "opt", "args"}), whose EMA weights are the ones to sample from ("model" without one).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            # The reference trainer saves its argparse.Namespace as "args": allowed by name, nothing else unpickled.
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files raise many different errors
        raise ValueError(f"cannot read DiT checkpoint {path}: {e}") from e
    if isinstance(state, dict):
        state = state.get("ema", state.get("model", state))
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise ValueError(f"DiT checkpoint {path} holds no state dict (a mapping of names to tensors)")
    return {k: v for k, v in state.items() if not k.startswith("fixture.")}
