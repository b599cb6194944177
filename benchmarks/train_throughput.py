"""Training throughput of the default study's presets through core.train (DeepSpeed, 1 process, fp32).

    python -m benchmarks.train_throughput [--models DiT-P/2 DiT-T/2 ...] [--batch 128] [--steps 40] [--compile]

Prints images/s and achieved FLOP/s (6 flops per forward multiply-add: forward + backward, a multiply-add counted as 2)
against this machine's fp32 matmul peak, measured in the same run before and after the models (the higher of the two
counts). A model's figure is its best window of 10 steps after the first (which holds the warm-up and, compiled, the
compilation). --compile trains each model a second time with `train.compile` (torch.compile), right after the eager run.
"""
import argparse
import logging
import tempfile

from benchmarks.machine import describe, matmul_peak_tflops
from core.train import Callbacks, TrainConfig, train

WINDOW = 10  # steps per measured window


class BestWindow(Callbacks):
    """Keeps the metrics of the fastest log window but the first (which includes the warm-up)."""

    def __init__(self):
        self.windows, self.metrics = 0, {}

    def on_log(self, trial, metrics):
        self.windows += 1
        if self.windows > 1 and metrics["images_per_s"] > self.metrics.get("images_per_s", 0):
            self.metrics = metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["DiT-P/2", "DiT-P/4", "DiT-N/2", "DiT-N/4", "DiT-T/2",
                                                        "DiT-T/4", "DiT-M/2"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="a multiple of the 10-step window")
    parser.add_argument("--compile", action="store_true", help="also train each model compiled")
    args = parser.parse_args()
    if args.steps < 2 * WINDOW:
        parser.error(f"--steps must be at least {2 * WINDOW}: the first {WINDOW}-step window is warm-up")
    logging.disable(logging.WARNING)
    first_peak = matmul_peak_tflops()
    rows = []
    for name in args.models:
        for compiled in (False, True) if args.compile else (False,):
            best = BestWindow()
            cfg = TrainConfig(model=name, dataset="digits", batch_size=args.batch, max_steps=args.steps, lr=1e-3,
                              ema_decay=0.999, zero_stage=0, log_every=WINDOW, ckpt_every=10 ** 9,
                              val_batch=0, num_workers=0, compile=compiled)
            with tempfile.TemporaryDirectory() as out:
                train(cfg, out, callbacks=best)
            rows.append((name, "compiled" if compiled else "eager", best.metrics))
    last_peak = matmul_peak_tflops()
    peak = max(first_peak, last_peak)  # the stricter of the two: the machine's speed drifts during a run
    print(f"machine: {describe()}")
    print(f"fp32 matmul peak (2048² matmul, this run, before / after the models): {first_peak * 1e3:.1f} / "
          f"{last_peak * 1e3:.1f} GFLOP/s")
    print(f"{'model':9} {'mode':8} {'batch':>5} {'images/s':>9} {'GFLOP/s':>8} {'% of peak':>9}")
    for name, mode, m in rows:
        gflops = m["achieved_tflops"] * 1e3
        print(f"{name:9} {mode:8} {args.batch:5d} {m['images_per_s']:9.1f} {gflops:8.1f} "
              f"{100 * gflops / (peak * 1e3):8.1f}%")


if __name__ == "__main__":
    main()
