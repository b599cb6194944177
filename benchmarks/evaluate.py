"""Evaluation throughput of the default study's presets: sampling images/s, feature extraction + FID time.

    python -m benchmarks.evaluate                       # DiT-P/N/T/M × /2 /4, the default study's FID and sampler

Untrained weights and random images: the cost of sampling and of FID does not depend on what the
images show. Each rate is the best of a few rounds (a shared machine disturbs some of them); the
sampling time of an evaluation is its N + grid images at that rate.
The last column is the share of the default study's wall time (studies/gflops_sweep.yaml, read here: its batch,
last milestone and number of milestones; its FID size, sampler and grid are the defaults) that evaluation would take
against a bare forward/backward/AdamW step: an upper bound, since a real training step also pays for DeepSpeed,
the EMA and logging.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.flags import positive_int, preset
from benchmarks.machine import describe
from benchmarks.train_step import make_step, time_steps
from core.evaluate import EvalConfig, generate, sample_plan
from core.fid import fidelity, resolve_extractor
from core.models import DiT, model_config
from core.real_images import UInt8Images, reference_images
from scaling.study import load_study

PRESETS = [f"DiT-{size}/{patch}" for size in "PNTM" for patch in (2, 4)]
DEFAULT_STUDY = Path(__file__).resolve().parents[1] / "studies" / "gflops_sweep.yaml"
_TRIAL = load_study(DEFAULT_STUDY, check_data=False).trials[0]  # every trial of it trains and evaluates alike
STUDY_BATCH, STUDY_STEPS, STUDY_EVALS = (_TRIAL.train["batch_size"], _TRIAL.milestones[-1], len(_TRIAL.milestones))


def best_seconds(fn, rounds):
    """The fastest of `rounds` calls of fn (the device synchronised around each)."""
    best = float("inf")
    for _ in range(rounds):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best


def sampling_rate(model, cfg, device, rounds):
    """Images/s of sampling one batch of cfg.batch_size images."""
    labels, seeds = sample_plan(cfg, model.config["num_classes"])
    labels, seeds = labels[:cfg.batch_size], seeds[:cfg.batch_size]
    generate(model, cfg, labels[:8], seeds[:8], device=device)  # warm-up
    return len(labels) / best_seconds(lambda: generate(model, cfg, labels, seeds, device=device), rounds)


def fid_seconds(num_samples, reference, cache_root, device, rounds):
    """Seconds to extract N images' features and compute FID, KID, precision / recall and IS (reference cached)."""
    extractor, weights = resolve_extractor("digits")
    images = UInt8Images(torch.randint(0, 256, (num_samples, 1, 8, 8), dtype=torch.uint8))
    return best_seconds(lambda: fidelity(images, reference, extractor=extractor, weights=weights,
                                         cache_root=cache_root, cuda=device.type == "cuda"), rounds)


def train_rate(name, device, rounds, steps=3):
    """Images/s of a bare training step at the study's batch."""
    cfg = model_config(name)
    model = DiT(**cfg).to(device).train()
    step = make_step(model, lambda m, x, t, y: m(x, t, y), STUDY_BATCH, cfg, device)
    step()  # warm-up
    return STUDY_BATCH / min(time_steps(step, steps, device) for _ in range(rounds))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", type=preset, default=PRESETS)
    parser.add_argument("--num-samples", type=positive_int, default=_TRIAL.eval["fid_samples"])
    parser.add_argument("--num-steps", type=positive_int, default=_TRIAL.eval["sampling_steps"])
    parser.add_argument("--batch", type=positive_int, default=256)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = EvalConfig(num_samples=args.num_samples, sampler=_TRIAL.eval["sampler"], num_steps=args.num_steps,
                     batch_size=args.batch, guided_channels=None,
                     grid_images_per_class=_TRIAL.eval["grid_images_per_class"])
    total = cfg.num_samples + cfg.grid_classes * cfg.grid_images_per_class  # images sampled per evaluation
    print(f"machine: {describe()}")
    print(f"FID-{cfg.num_samples} (+{total - cfg.num_samples} grid images), {cfg.sampler.upper()}-{cfg.num_steps}, "
          f"sampling batch {cfg.batch_size}, digits-cnn features, on {device}")

    with tempfile.TemporaryDirectory() as cache:
        reference = reference_images("digits")
        first = fid_seconds(10, reference, cache, device, rounds=1)
        print(f"reference features (1500 training images, once per study): {first:.2f} s")
        fid_s = fid_seconds(cfg.num_samples, reference, cache, device, args.rounds)
        print(f"features + FID, KID, precision / recall, IS of {cfg.num_samples} images: {fid_s:.2f} s "
              f"({cfg.num_samples / fid_s:.0f} images/s)")
        print(f"{'model':9} {'sample img/s':>12} {'sample s':>9} {'eval s':>7} {'train img/s':>11} {'eval share':>10}")
        for name in args.model:
            torch.manual_seed(0)
            model = DiT(**model_config(name)).to(device).eval()
            rate = sampling_rate(model, cfg, device, args.rounds)
            eval_s = total / rate + fid_s
            train_ips = train_rate(name, device, args.rounds)
            train_s = STUDY_STEPS * STUDY_BATCH / train_ips
            share = STUDY_EVALS * eval_s / (train_s + STUDY_EVALS * eval_s)
            print(f"{name:9} {rate:12.0f} {total / rate:9.2f} {eval_s:7.2f} {train_ips:11.0f} {share:10.1%}", flush=True)


if __name__ == "__main__":
    main()
