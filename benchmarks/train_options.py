"""The study file's training options, each measured: bf16 autocast, torch.compile, AdamW kernel, activation checkpointing, ZeRO stage.

    python -m benchmarks.train_options [--model DiT-T/2] [--batch 128] [--steps 40]
    python -m benchmarks.train_options --latents      # precomputed latents vs encoding with the VAE on the fly

Each configuration trains through core.train (DeepSpeed, one process; the baseline is the default
study's: fp32, ZeRO stage 0, fused AdamW) in a process of its own, so its peak resident memory (ru_maxrss) is its own; images/s is the last log window's (the
first holds compilation and warm-up). --latents times what a training step's data costs per image
either way: reading a pre-encoded latent, or encoding a 256×256 image with a VAE of Stable
Diffusion's architecture (diffusers' AutoencoderKL, random weights: the cost does not depend on them).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.flags import positive_int, preset
from benchmarks.machine import describe

OPTIONS = {  # name: TrainConfig fields the study's train section sets
    "fp32, ZeRO-0, fused AdamW (baseline)": {},
    "bf16 autocast": {"precision": "bf16"},
    "torch.compile": {"compile": True},
    "torch's default AdamW (not fused)": {"fused_adamw": False},
    "activation checkpointing": {"grad_checkpointing": True},
    "ZeRO stage 2": {"zero_stage": 2},
}


def child(model, batch, steps, options):
    """Runs in a subprocess: train and print the last window's metrics as JSON."""
    import logging

    from core.train import Callbacks, TrainConfig, train

    class Last(Callbacks):
        metrics = {}

        def on_log(self, trial, metrics):
            Last.metrics = metrics

    logging.disable(logging.WARNING)
    cfg = TrainConfig(model=model, dataset="digits", batch_size=batch, max_steps=steps, lr=1e-3, ema_decay=0.999,
                      **{"zero_stage": 0, "log_every": steps // 2, "ckpt_every": 10 ** 9, "val_batch": 0,
                         "num_workers": 0, **options})
    with tempfile.TemporaryDirectory() as out:
        train(cfg, out, callbacks=Last())
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"images_per_s": Last.metrics["images_per_s"], "loss": Last.metrics["train_loss"],
                      "peak_mib": peak_mib}))


def measure(model, batch, steps, options):
    """(images/s, final loss, peak RSS in MiB) of one configuration, in a fresh process."""
    code = (f"from benchmarks.train_options import child; child({model!r}, {batch}, {steps}, "
            f"{options!r})")
    # No GPU for it: core.train would take one, and these are the CPU's figures (its host memory the peak RSS).
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if proc.returncode:
        return None, None, f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["images_per_s"], result["loss"], result["peak_mib"]


def run_options(args):
    print(f"{'option':36} {'images/s':>9} {'vs fp32':>8} {'peak RSS MiB':>13} {'loss at end':>12}")
    base = None
    for name, options in OPTIONS.items():
        speed, loss, peak = measure(args.model, args.batch, args.steps, options)
        if speed is None:
            print(f"{name:36} {'—':>9}   ({peak})")
            continue
        base = base or speed
        print(f"{name:36} {speed:9.1f} {speed / base:7.2f}× {peak:13.0f} {loss:12.4f}")


def run_latents(args):
    import torch
    from diffusers import AutoencoderKL

    from core.latents import encode_images

    # Stable Diffusion's VAE architecture (sd-vae-ft-ema's config), random weights.
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=256).eval()
    images = torch.rand(args.vae_batch, 3, 256, 256) * 2 - 1  # (N, 3, 256, 256)
    with torch.no_grad():
        encode_images(vae, images[:1], [0])  # warm-up
        start = time.perf_counter()
        latents = encode_images(vae, images, list(range(args.vae_batch)))
        encode_s = (time.perf_counter() - start) / args.vae_batch
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "latents.pt"
        torch.save(latents.repeat(64, *([1] * (latents.dim() - 1))).clone(), path)  # (64·N, ...)
        start = time.perf_counter()
        for _ in range(5):
            loaded = torch.load(path, weights_only=True)
        read_s = (time.perf_counter() - start) / (5 * len(loaded))
    print(f"VAE encode, 256×256 → 32×32×4, batch {args.vae_batch}: {encode_s * 1e3:8.1f} ms per image (and its mirror)")
    print(f"read a pre-encoded latent (from a file of {len(loaded)}):       {read_s * 1e6:8.1f} µs per image (and its mirror)")
    print(f"on-the-fly encoding costs {encode_s / read_s:,.0f}× reading the latent, paid again every epoch")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=preset, default="DiT-T/2")
    parser.add_argument("--batch", type=positive_int, default=128)
    parser.add_argument("--steps", type=positive_int, default=40)
    parser.add_argument("--latents", action="store_true", help="time latents vs VAE encoding instead")
    parser.add_argument("--vae-batch", type=positive_int, default=4)
    args = parser.parse_args()
    if args.steps < 2 or args.steps % 2:
        parser.error("--steps must be even and at least 2: the speed is that of the second half's log window (an "
                     "odd count left it one step)")
    print(f"machine: {describe()}")
    if args.latents:
        run_latents(args)
    else:
        print(f"model {args.model}, global batch {args.batch}, {args.steps} steps, DeepSpeed, one process")
        run_options(args)


if __name__ == "__main__":
    main()
