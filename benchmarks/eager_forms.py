"""core's eager CPU forms (GELU, short attention) against the torch ops they stand in for, in whole training steps.

    python -m benchmarks.eager_forms [--models DiT-T/2 ...] [--batch 64] [--threads 1] [--rounds 40]

One model per preset trains (forward, backward, fused AdamW on random digits-shaped inputs) with its MLPs and
attention switched round by round between core's forms (core.gelu, core.short_attention) and the plain torch ops the
reference computes (aten's tanh GELU, timm's unfused attention under autograd), interleaved in one process, three
steps a round, the last two timed: across processes this box's spread is larger than the difference. Best and
median of the rounds.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import core.models
from benchmarks.machine import describe
from benchmarks.train_step import make_step
from core.models import DiT, model_config
from core.short_attention import unfused_attention


TORCH_FORMS = {"gelu": lambda x: F.gelu(x, approximate="tanh"), "attention": unfused_attention}
CORE_FORMS = {"gelu": core.models.approx_gelu, "attention": core.models.attention}


def use(forms):
    """Point the model's modules at a set of forms (they look them up at each call); unnamed ones are core's."""
    forms = {**CORE_FORMS, **forms}
    core.models.approx_gelu = forms["gelu"]
    core.models.attention = forms["attention"]


def step_times(name, batch, rounds, sets):
    """Best and median ms of a training step with each named set of forms, interleaved in one model."""
    cfg = model_config(name)
    torch.manual_seed(0)
    step = make_step(DiT(**cfg), lambda m, x, t, y: m(x, t, y), batch, cfg, torch.device("cpu"))
    times = {k: [] for k in sets}
    try:
        for forms in sets.values():
            use(forms)
            step()
        for r in range(rounds):
            for k in (sets if r % 2 else reversed(list(sets))):
                use(sets[k])
                step()  # the switch's step: the allocator meets the other forms' buffer sizes
                start = time.perf_counter()
                step()
                step()
                times[k].append((time.perf_counter() - start) / 2)
    finally:
        use(CORE_FORMS)
    return {k: (min(t) * 1e3, statistics.median(t) * 1e3) for k, t in times.items()}


def parse_step_arguments(description, models, rounds):
    """The command line both eager-form benchmarks take; sets torch's threads and prints the machine."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=models)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="1: as a study's trial trains, one core each")
    parser.add_argument("--rounds", type=int, default=rounds)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {describe()}")
    return args


def main():
    args = parse_step_arguments(__doc__.splitlines()[0], ["DiT-P/2", "DiT-N/2", "DiT-T/2", "DiT-T/4", "DiT-M/2"], 40)
    print(f"batch {args.batch}, {args.threads} thread(s); training step ms, best / median of {args.rounds} rounds")
    print(f"{'model':8} {'torch forms':>15} {'core forms':>15} {'speed-up (median)':>18}")
    for name in args.models:
        times = step_times(name, args.batch, args.rounds, {"torch": TORCH_FORMS, "core": CORE_FORMS})
        (tb, tm), (cb, cm) = times["torch"], times["core"]
        print(f"{name:8} {tb:6.1f} / {tm:6.1f} {cb:6.1f} / {cm:6.1f} {tm / cm:17.2f}×")


if __name__ == "__main__":
    main()
