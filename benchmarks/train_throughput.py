"""Training throughput of the default study's presets through core.train (DeepSpeed, fp32) against the fp32 peak.

    python -m benchmarks.train_throughput [--models DiT-P/2 DiT-T/2 ...] [--batch 128] [--steps 40] [--compile]
                                          [--processes N]

Prints images/s and achieved FLOP/s (6 flops per forward multiply-add: forward + backward, a multiply-add counted as 2)
against this machine's fp32 matmul peak (the higher of one product on all its threads and one-thread products on
every thread at once, summed: MKL's two-thread product can fall short of two one-thread ones), the best window of
each of two measurements in the same run, before and after the models (the higher of the two counts). A model's figure is its best window of 10 steps after the first (which
holds the warm-up and, compiled, the compilation). --compile trains each model a second time with `train.compile`
(torch.compile), right after the eager run.

--processes N trains N copies of each model at once, each in a process of its own with 1/N of the threads and of the
batch: the way the default study fills a machine (one trial per core, `resources.cpus_per_worker: 1`). The copies
wait for each other after every window; the figure is the best of the windows after the first, each the sum of the
copies' rates over the same steps (which they start together; a faster copy waits at the window's end for the others,
which end it alone for those moments).
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.flags import check_window_steps, positive_int, preset
from benchmarks.machine import describe, matmul_peak_tflops
from core.train import Callbacks, TrainConfig, train

WINDOW = 10  # steps per measured window
# core.train takes a GPU where one is visible: these CPU figures would be a GPU's.
CPU_ONLY = "a CPU benchmark, and core.train would train on the GPU here: run it with CUDA_VISIBLE_DEVICES="


class BestWindow(Callbacks):
    """Keeps the metrics of the fastest log window but the first (which includes the warm-up)."""

    def __init__(self):
        self.windows, self.metrics = 0, {}

    def on_log(self, trial, metrics):
        self.windows += 1
        if self.windows > 1 and metrics["images_per_s"] > self.metrics.get("images_per_s", 0):
            self.metrics = metrics


class SideBySideWindows(Callbacks):
    """Records every window after the first; after each, waits until every copy has reached it, so that window k of
    each copy runs beside window k of the others (lined up after the first only, they drifted apart, and a copy's last
    windows ran partly alone: the best summed window favoured those)."""

    def __init__(self, barrier_dir, copy, copies):
        self.barrier_dir, self.copy, self.copies = Path(barrier_dir), copy, copies
        self.windows = []  # (images/s, TFLOP/s) of each window after the first
        self.seen = 0

    def on_log(self, trial, metrics):
        # Outside the window's time: core.train times each step, not its callbacks.
        if self.seen:  # the first is the warm-up (and compilation) window
            self.windows.append((metrics["images_per_s"], metrics["achieved_tflops"]))
        self.seen += 1
        (self.barrier_dir / f"ready-{self.seen}-{self.copy}").touch()
        while len(list(self.barrier_dir.glob(f"ready-{self.seen}-*"))) < self.copies:
            time.sleep(0.01)


def train_config(name, batch, steps, compiled):
    return TrainConfig(model=name, dataset="digits", batch_size=batch, max_steps=steps, lr=1e-3, ema_decay=0.999,
                       zero_stage=0, log_every=WINDOW, ckpt_every=10 ** 9, val_batch=0, num_workers=0,
                       compile=compiled)


def train_alone(name, batch, steps, compiled):
    """images/s and achieved TFLOP/s of the model's best window, trained in this process."""
    best = BestWindow()
    with tempfile.TemporaryDirectory() as out:
        train(train_config(name, batch, steps, compiled), out, callbacks=best)
    return best.metrics["images_per_s"], best.metrics["achieved_tflops"]


def train_side_by_side(name, batch, steps, compiled, processes):
    """images/s and achieved TFLOP/s of `processes` copies trained at once, each on 1/processes of the machine."""
    threads = max(1, torch.get_num_threads() // processes)
    with tempfile.TemporaryDirectory() as barrier:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        copies = [subprocess.Popen([sys.executable, "-m", "benchmarks.train_throughput", "--copy-of", barrier,
                                    str(i), str(processes), "--models", name, "--batch", str(batch // processes),
                                    "--steps", str(steps)] + (["--compile"] if compiled else []),
                                   env=env)
                  for i in range(processes)]
        while any(copy.poll() is None for copy in copies):
            if any(copy.returncode for copy in copies):  # the others would wait for it at the barrier
                for copy in copies:
                    copy.kill()
            time.sleep(0.1)
        if any(copy.returncode for copy in copies):
            raise SystemExit(f"a copy of {name} failed (exit statuses {[c.returncode for c in copies]})")
        runs = [json.loads((Path(barrier) / f"windows-{i}.json").read_text()) for i in range(processes)]
    # Window k of every copy: the same steps after the barrier, so (nearly) the same seconds of wall time.
    side_by_side = [tuple(map(sum, zip(*windows))) for windows in zip(*runs)]  # (images/s, TFLOP/s) summed
    return max(side_by_side)  # the best window, as train_alone reports


def run_copy(barrier_dir, copy, copies, name, batch, steps, compiled):
    """One of train_side_by_side's copies: writes its windows to BARRIER_DIR/windows-COPY.json."""
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    windows = SideBySideWindows(barrier_dir, copy, copies)
    with tempfile.TemporaryDirectory() as out:
        train(train_config(name, batch, steps, compiled), out, callbacks=windows)
    (Path(barrier_dir) / f"windows-{copy}.json").write_text(json.dumps(windows.windows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=preset, default=["DiT-P/2", "DiT-P/4", "DiT-N/2", "DiT-N/4",
                                                                     "DiT-T/2", "DiT-T/4", "DiT-M/2"],
                        metavar="MODEL")
    parser.add_argument("--batch", type=positive_int, default=128, help="images per step, over all processes")
    parser.add_argument("--steps", type=positive_int, default=40, help="a multiple of the 10-step window")
    parser.add_argument("--compile", action="store_true", help="also train each model compiled")
    parser.add_argument("--processes", type=positive_int, default=1,
                        help="train this many copies at once, each with 1/N of the threads and of the batch "
                             "(the default study's layout: one trial per core)")
    parser.add_argument("--copy-of", nargs=3, metavar=("BARRIER_DIR", "COPY", "COPIES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_window_steps(parser, args.steps, WINDOW)
    if args.batch % args.processes:
        parser.error(f"--processes must divide --batch ({args.batch})")
    if torch.cuda.is_available():  # against the CPU's peak
        parser.error(f"{CPU_ONLY}; benchmarks.gpu_train measures a GPU")
    logging.disable(logging.WARNING)
    if args.copy_of:
        barrier_dir, copy, copies = args.copy_of
        return run_copy(barrier_dir, int(copy), int(copies), args.models[0], args.batch, args.steps, args.compile)
    print(f"machine: {describe()}", flush=True)  # first: a run that fails on the way still says where
    threads = torch.get_num_threads()
    first_peak = matmul_peak_tflops(copies=threads)
    rows = []
    for name in args.models:
        for compiled in (False, True) if args.compile else (False,):
            if args.processes == 1:
                images_per_s, tflops = train_alone(name, args.batch, args.steps, compiled)
            else:
                images_per_s, tflops = train_side_by_side(name, args.batch, args.steps, compiled, args.processes)
            rows.append((name, "compiled" if compiled else "eager", images_per_s, tflops))
    last_peak = matmul_peak_tflops(copies=threads)
    peak = max(first_peak, last_peak)  # the stricter of the two: the machine's speed drifts during a run
    products = f"{threads} threads, or {threads} one-thread products at once" if threads > 1 else "1 thread"
    print(f"fp32 matmul peak (2048² matmul, {products}, best window, this run, before / after the models): "
          f"{first_peak * 1e3:.1f} / {last_peak * 1e3:.1f} GFLOP/s")
    layout = (f"{args.processes} copies side by side, {max(1, threads // args.processes)} thread(s) "
              f"and batch {args.batch // args.processes} each" if args.processes > 1 else "one process")
    print(f"training: {layout}")
    print(f"{'model':9} {'mode':8} {'batch':>5} {'images/s':>9} {'GFLOP/s':>8} {'% of peak':>9}")
    for name, mode, images_per_s, tflops in rows:
        print(f"{name:9} {mode:8} {args.batch:5d} {images_per_s:9.1f} {tflops * 1e3:8.1f} "
              f"{100 * tflops / peak:8.1f}%")


if __name__ == "__main__":
    main()
