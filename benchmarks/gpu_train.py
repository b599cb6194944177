"""DiT training speed on one GPU through core.train: images/s, model FLOP utilisation, peak memory.

    python -m benchmarks.gpu_train --models DiT-XL/2 DiT-B/2 --batch 256 --micro-batch 64

Each model runs in configurations side by side in one process:
  reference  fp32 weights, TF32 matmuls, plain AdamW, no compile (how the reference train.py trains)
  bf16       DeepSpeed bf16 (fp32 master weights), ZeRO-2, fused AdamW
  bf16+compile  the same with torch.compile
MFU is achieved model FLOP/s (6 flops per forward multiply-add: forward and backward) over the bf16 dense peak,
measured here with a large matmul in the same run.
"""
import argparse
import gc
import json
import logging
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.flags import positive_int, preset
from benchmarks.machine import describe, matmul_peak_tflops
from core.latents import FORMAT, VIEWS, shard_name
from core.train import Callbacks, TrainConfig, train

CONFIGS = {  # core.train sets TF32 from the precision (core/precision.py): on for tf32 and bf16
    # fused_adamw None is core's default, fused AdamW (core/optim.py): the reference's plain AdamW is False.
    "reference": dict(precision="tf32", zero_stage=0, fused_adamw=False, compile=False),
    "bf16": dict(precision="bf16", zero_stage=2, fused_adamw=True, compile=False),
    "bf16+compile": dict(precision="bf16", zero_stage=2, fused_adamw=True, compile=True),
}


def synthetic_latents(folder, num_images=4096, size=32, channels=4, classes=1000):
    """A latent folder in core.latents' format filled with random latents (speed does not depend on them)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(num_images, len(VIEWS), channels, size, size, generator=g)
    labels = torch.randint(0, classes, (num_images,), generator=g)
    save_file({"latents": latents, "labels": labels, "indices": torch.arange(num_images)},
              str(Path(folder) / shard_name(0)))
    meta = dict(format=FORMAT, num_images=num_images, classes=[str(i) for i in range(classes)],
                latent_shape=[channels, size, size], views=list(VIEWS), scale_factor=0.18215, vae=None,
                image_size=size * 8, seed=0, shards=[{"file": shard_name(0), "num_images": num_images}])
    (Path(folder) / "meta.json").write_text(json.dumps(meta))


class Last(Callbacks):
    def __init__(self):
        self.metrics = {}

    def on_log(self, trial, metrics):
        self.metrics = metrics


def run(model, config, data, batch, micro, steps, peak):
    opts = dict(CONFIGS[config])
    cfg = TrainConfig(model=model, dataset="latents", data_path=str(data), batch_size=batch,
                      grad_accum=batch // micro, max_steps=steps, ema_decay=0.9999, log_every=steps // 2,
                      ckpt_every=10 ** 9, val_batch=0, num_workers=0, peak_tflops=peak, **opts)
    gc.collect()  # the configuration before's engine and states gone (core.train destroys its engine) before the peak
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    last = Last()
    with tempfile.TemporaryDirectory() as out:
        train(cfg, out, callbacks=last)
    m = last.metrics
    return m["images_per_s"], m["achieved_tflops"], m.get("mfu", 0.0), torch.cuda.max_memory_allocated() / 2 ** 30


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=preset, default=["DiT-XL/2", "DiT-B/2"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--batch", type=positive_int, default=256)
    parser.add_argument("--micro-batch", type=positive_int, default=64)
    parser.add_argument("--steps", type=positive_int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no GPU here: this benchmark measures GPU training (benchmarks.train_step measures a CPU)")
    if args.steps < 2 or args.steps % 2:
        parser.error("--steps must be even and at least 2: the throughput is that of the second half (an odd "
                     "count left it one step)")
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or args.batch % args.micro_batch:
        parser.error(f"unknown configs {unknown} (known: {', '.join(CONFIGS)})" if unknown else
                     f"--micro-batch {args.micro_batch} must divide --batch {args.batch}")
    logging.disable(logging.WARNING)
    peak = matmul_peak_tflops(8192, torch.bfloat16, "cuda")
    print(f"machine: {describe()}")
    print(f"bf16 dense peak (8192³ matmul, this run): {peak:.0f} TFLOP/s")
    print(f"{'model':9} {'config':13} {'batch':>5} {'micro':>5} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}")
    with tempfile.TemporaryDirectory() as data:
        synthetic_latents(data)
        for model in args.models:
            base = None
            for config in args.configs:
                ips, tflops, mfu, mem = run(model, config, data, args.batch, args.micro_batch, args.steps, peak)
                base = base or (config, ips)
                print(f"{model:9} {config:13} {args.batch:5d} {args.micro_batch:5d} {ips:8.1f} {tflops:8.1f} "
                      f"{100 * mfu:5.1f}% {mem:8.1f}   ×{ips / base[1]:.2f} vs {base[0]}", flush=True)


if __name__ == "__main__":
    main()
