"""Sampling and training on the CPU with glibc's own malloc thresholds against core.host_memory's, process by process.

    python -m benchmarks.host_memory [--model DiT-T/2] [--pairs 3] [--samples 500] [--steps 60]

Whether glibc's dynamic thresholds hand a step's tensors back to the OS (and the next step faults them in afresh)
depends on the order of a process's first allocations: it differs between fresh processes, not within one. So each
measurement is a fresh process on one thread, alternating between glibc's own thresholds and the held ones: sampling
the default study's evaluation (DDIM-25, batch 256, --samples images) and then core.train's steps at its batch (64),
with each part's minor page faults.
"""
import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.flags import positive_int, preset
from benchmarks.machine import describe
from core.host_memory import users_settings

MODES = ("glibc", "held")
BATCH, WINDOW = 64, 10  # core.train's batch (the default study's) and its log window


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(mode, name, samples, steps):
    """{sample_images_per_s, sample_faults, train_step_ms, train_faults} of this process, in `mode`."""
    from core import host_memory
    from core.evaluate import EvalConfig, generate, sample_plan
    from core.models import DiT, model_config
    from core.train import Callbacks, TrainConfig, train

    if mode == "glibc":
        host_memory.held = True  # as if set: hold_freed_memory leaves glibc's thresholds as they are
    torch.set_num_threads(1)
    cfg = EvalConfig(num_samples=samples, num_steps=25, batch_size=256)
    model = DiT(**model_config(name)).eval()
    labels, seeds = sample_plan(cfg, model.config["num_classes"])
    start_faults, start = faults(), time.perf_counter()
    generate(model, cfg, labels, seeds, device="cpu")
    result = {"sample_images_per_s": samples / (time.perf_counter() - start), "sample_faults": faults() - start_faults}

    class Steps(Callbacks):
        """The training seconds, steps and page faults from the first log (after the warm-up window) to the last."""

        def __init__(self):
            self.first = self.last = None  # (step, train_time_s, page faults)

        def on_log(self, trial, metrics):
            self.last = (metrics["step"], metrics["train_time_s"], faults())
            self.first = self.first or self.last

    logging.disable(logging.WARNING)
    record = Steps()
    with tempfile.TemporaryDirectory() as out:
        train(TrainConfig(model=name, dataset="digits", batch_size=BATCH, max_steps=steps, lr=1e-3, zero_stage=0,
                          log_every=WINDOW, ckpt_every=10 ** 9, val_batch=0, num_workers=0), out, callbacks=record)
    (step_0, seconds_0, faults_0), (step_1, seconds_1, faults_1) = record.first, record.last
    result.update(train_step_ms=1e3 * (seconds_1 - seconds_0) / (step_1 - step_0), train_faults=faults_1 - faults_0)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=preset, default="DiT-T/2")
    parser.add_argument("--pairs", type=positive_int, default=3, help="fresh processes per mode, alternating")
    parser.add_argument("--samples", type=positive_int, default=500)
    parser.add_argument("--steps", type=positive_int, default=60, help=f"at least {2 * WINDOW}")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2 * WINDOW:
        parser.error(f"--steps must be at least {2 * WINDOW}: the first {WINDOW} are warm-up")
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.samples, args.steps)))
        return
    drop = {*users_settings(os.environ), "LD_PRELOAD"}  # glibc's malloc as it starts, or as held
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # core.train would take a GPU: this is about the CPU's host memory
    print(f"machine: {describe()}")
    print(f"{args.model}, one thread: sampling {args.samples} images (DDIM-25, batch 256), then {args.steps} steps of "
          f"core.train (batch {BATCH}, the first {WINDOW} not counted); a fresh process each")
    print(f"{'run':>3} {'thresholds':10} {'sample img/s':>12} {'faults':>9} {'train ms/step':>13} {'faults':>9}")
    for i in range(args.pairs):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            out = subprocess.run([sys.executable, "-m", "benchmarks.host_memory", "--child", mode, "--model",
                                  args.model, "--samples", str(args.samples), "--steps", str(args.steps)],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"the {mode} process failed (exit status {out.returncode}):\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.splitlines()[-1])
            print(f"{i + 1:3d} {mode:10} {r['sample_images_per_s']:12.1f} {r['sample_faults']:9d} "
                  f"{r['train_step_ms']:13.1f} {r['train_faults']:9d}")


if __name__ == "__main__":
    main()
