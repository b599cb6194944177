"""A study through the orchestrator on one GPU: Ray Train (NCCL), DeepSpeed bf16 ZeRO-2, MLflow and Parquet.

    python -m benchmarks.gpu_study --models DiT-XL/2 DiT-B/2 --steps 60 --micro-batch 128 [--compile]

`scaling.run` trains the paper's study file (studies/dit_imagenet256.yaml), narrowed with --set to the given
models, one GPU worker per trial and synthetic ImageNet-shaped latents (32×32×4), without FID (the VAE and the
Inception weights are not on a lent machine). After it, in the same run, core.train trains each model directly
with the same configuration (benchmarks.gpu_train's). Prints each model's images/s and MFU both ways (the best log
window after the first; the study's as MLflow holds them), and the trial's start-up and teardown (results.parquet).
--cpu checks the same plumbing on a machine without a GPU (fp32, gloo, small models).
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

import scaling.no_telemetry  # noqa: F401 - first: before MLflow and Ray are imported
import torch

from benchmarks.flags import check_window_steps, positive_int, preset
from benchmarks.gpu_train import CONFIGS, synthetic_latents
from benchmarks.machine import describe, matmul_peak_tflops
from benchmarks.train_throughput import WINDOW, BestWindow
from core.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "studies" / "dit_imagenet256.yaml"


def best_after_first(windows):
    """The fastest window but the first (which holds the warm-up and any compilation), as BestWindow keeps it."""
    return max(windows[1:], key=lambda m: m["images_per_s"])


def train_directly(model, config, data, batch, micro, steps, peak, cpu):
    """core.train in this process: the figure the orchestrator is measured against."""
    opts = dict(CONFIGS[config])
    if cpu:
        opts.update(precision="fp32", zero_stage=0)  # DeepSpeed's bf16 wants a GPU
    cfg = TrainConfig(model=model, dataset="latents", data_path=str(data), batch_size=batch,
                      grad_accum=batch // micro, max_steps=steps, ema_decay=0.9999, log_every=WINDOW,
                      ckpt_every=10 ** 9, val_batch=0, num_workers=0, peak_tflops=peak, **opts)
    best = BestWindow()
    with tempfile.TemporaryDirectory() as out:
        train(cfg, out, callbacks=best)
    if not cpu:
        torch.cuda.empty_cache()  # the next model's run starts on a free GPU
    return best.metrics


def study_overrides(args, data, output, peak):
    """--set items that narrow the paper's study to this check."""
    sizes = sorted({m.split("/")[0] for m in args.models})
    sets = {
        "data.path": str(data), "sweep.model": json.dumps(sizes), "sweep.patch": f"[{args.models[0].split('/')[1]}]",
        "sweep.steps": f"[{args.steps}]", "train.batch_size": args.batch,
        "train.grad_accum": args.batch // args.micro_batch, "train.log_every": WINDOW,
        "train.ckpt_every": args.steps, "train.compile": str(args.compile).lower(), "train.peak_tflops": peak,
        "eval.fid": "false", "eval.vae": "null", "eval.reference": "null", "resources.workers_per_trial": 1,
        "resources.gpus_per_worker": 0 if args.cpu else 1, "resources.cpus_per_worker": args.cpus_per_worker,
        "tracking.mlflow_uri": "null", "output": str(output),
    }
    if args.cpu:
        sets.update({"train.precision": "fp32", "train.zero_stage": 0, "train.val_batch": 16})
    return [f"{k}={v}" for k, v in sets.items()]


def study_windows(output):
    """{model: (best window after the first, start-up s, teardown s, status)} from the study's MLflow and Parquet."""
    from mlflow.tracking import MlflowClient

    from scaling.results import load_results
    from scaling.tracking import default_tracking_uri

    results = load_results(output)
    client = MlflowClient(default_tracking_uri(output))  # the store scaling.run wrote to (tracking.mlflow_uri: null)
    found = {}
    for row in results.itertuples():
        history = {key: {m.step: m.value for m in client.get_metric_history(row.mlflow_run_id, key)}
                   for key in ("images_per_s", "achieved_tflops", "mfu")}
        windows = [{key: history[key].get(step, 0.0) for key in history} for step in sorted(history["images_per_s"])]
        found[row.model] = (best_after_first(windows), row.startup_s, row.teardown_s, row.status)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=preset, default=["DiT-XL/2", "DiT-B/2"])
    parser.add_argument("--batch", type=positive_int, default=256, help="global batch (images per optimizer step)")
    parser.add_argument("--micro-batch", type=positive_int, default=128)
    parser.add_argument("--steps", type=positive_int, default=60)
    parser.add_argument("--compile", action="store_true", help="train.compile (torch.compile) both ways")
    parser.add_argument("--cpus-per-worker", type=positive_int, default=8)
    parser.add_argument("--images", type=positive_int, default=4096, help="synthetic latents to train on")
    parser.add_argument("--cpu", action="store_true", help="check the plumbing without a GPU (fp32, gloo)")
    parser.add_argument("--study-log", help="where scaling.run's output goes (default: a temporary file)")
    args = parser.parse_args()
    check_window_steps(parser, args.steps, WINDOW)
    if args.batch % args.micro_batch:
        parser.error(f"--micro-batch {args.micro_batch} must divide --batch {args.batch}")
    if len({m.split("/")[1] for m in args.models}) > 1:
        parser.error("--models must share one patch size: the study trains the grid of their sizes × patches")
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no GPU here: run with --cpu to check the plumbing")
    logging.disable(logging.WARNING)
    config = "bf16+compile" if args.compile else "bf16"
    if args.cpu:
        # The higher of one product on all threads and one-thread products side by side, as benchmarks.
        # train_throughput measures it: a single two-thread product on a busy box read low (MFU past 100%).
        peak = matmul_peak_tflops(copies=torch.get_num_threads())
        print(f"machine: {describe()}\nfp32 matmul peak (this run): {peak * 1e3:.0f} GFLOP/s")
    else:
        peak = matmul_peak_tflops(8192, torch.bfloat16, "cuda")
        print(f"machine: {describe()}\nbf16 dense peak (8192³ matmul, this run): {peak:.0f} TFLOP/s")
    print(f"configuration: {'fp32, ZeRO-0 (--cpu)' if args.cpu else config + ', ZeRO-2'}, global batch {args.batch}, "
          f"micro-batch {args.micro_batch}, {args.steps} steps, one worker")
    with tempfile.TemporaryDirectory() as tmp:
        data, output = Path(tmp) / "latents", Path(tmp) / "study"
        data.mkdir()
        synthetic_latents(data, num_images=args.images)
        # The study first: it is the part a lent machine checks for the first time, so a failure costs least there.
        sets = [item for s in study_overrides(args, data, output, peak) for item in ("--set", s)]
        started = time.time()
        # Written as it goes (not held in a pipe), so a study that hangs on a lent machine leaves its log behind.
        study_log = Path(args.study_log or Path(tmp) / "study.log")
        with open(study_log, "w") as log:
            proc = subprocess.run([sys.executable, "-m", "scaling.run", str(STUDY), "--no-report", *sets], cwd=REPO,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT)
        wall = time.time() - started
        if proc.returncode != 0:
            print(study_log.read_text()[-9000:])
            sys.exit(f"the study failed (exit {proc.returncode})")
        through_ray = study_windows(output)
        print(f"study done in {wall:.0f} s; now core.train in this process", flush=True)
        direct = {m: train_directly(m, config, data, args.batch, args.micro_batch, args.steps, peak, args.cpu)
                  for m in args.models}
    print(f"study wall time {wall:.0f} s ({len(args.models)} trial(s); Ray start-up, "
          "MLflow and Parquet included)")
    print(f"{'model':9} {'path':12} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'start-up s':>10} {'teardown s':>10}")
    for m in args.models:
        d = direct[m]
        print(f"{m:9} {'core.train':12} {d['images_per_s']:8.1f} {d['achieved_tflops']:8.2f} {100 * d['mfu']:5.1f}%")
        r, startup, teardown, status = through_ray[m]
        print(f"{m:9} {'scaling.run':12} {r['images_per_s']:8.1f} {r['achieved_tflops']:8.2f} {100 * r['mfu']:5.1f}% "
              f"{startup:10.1f} {teardown:10.1f}   status {status}, ×{r['images_per_s'] / d['images_per_s']:.2f} "
              "of core.train")


if __name__ == "__main__":
    main()
