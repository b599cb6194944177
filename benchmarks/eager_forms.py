"""core's eager CPU forms against the torch ops they stand in for, in whole training steps.

    python -m benchmarks.eager_forms [--models DiT-T/2 ...] [--forms gelu attention ...] [--batch 64] [--threads 1]
                                     [--rounds 40]

One model per preset trains (forward, backward, fused AdamW on random digits-shaped inputs) with the named forms
switched round by round between core's (core.gelu, core.short_attention, core.layer_norm, core.transpose) and the
plain torch ops the reference computes (aten's tanh GELU, timm's unfused attention under autograd, aten's layer norm,
aten's transposed copy for the weight gradients), interleaved in one process, three steps a round, the last two
timed: across processes this box's spread is larger than the difference. Best and median of the rounds.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import core.layer_norm
import core.linear
import core.models
from benchmarks.flags import positive_int, preset
from benchmarks.machine import describe
from benchmarks.train_step import make_step
from core.models import DiT, model_config
from core.short_attention import unfused_attention


TORCH_FORMS = {"gelu": lambda x: F.gelu(x, approximate="tanh"), "attention": unfused_attention,
               "layer_norm": nn.LayerNorm.forward, "transpose": lambda x: x.t().contiguous()}
CORE_FORMS = {"gelu": core.models.approx_gelu, "attention": core.models.attention,
              "layer_norm": core.layer_norm.LayerNorm.forward, "transpose": core.linear.transposed}


def use(forms):
    """Point the model's modules at a set of forms (they look them up at each call); unnamed ones are core's."""
    forms = {**CORE_FORMS, **forms}
    core.models.approx_gelu = forms["gelu"]
    core.models.attention = forms["attention"]
    core.layer_norm.LayerNorm.forward = forms["layer_norm"]
    core.linear.transposed = forms["transpose"]


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


def parse_step_arguments(description, models, rounds, forms=None):
    """The command line both eager-form benchmarks take (--forms where `forms` names them); sets torch's threads and
    prints the machine."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", type=preset, default=models)
    if forms:
        parser.add_argument("--forms", nargs="+", default=forms, choices=forms, help="the forms to switch")
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--threads", type=positive_int, default=1, help="1: as a study's trial trains, one core each")
    parser.add_argument("--rounds", type=positive_int, default=rounds)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {describe()}")
    return args


def main():
    args = parse_step_arguments(__doc__.splitlines()[0], ["DiT-P/2", "DiT-N/2", "DiT-T/2", "DiT-T/4", "DiT-M/2"], 40,
                                forms=list(TORCH_FORMS))
    torch_forms = {k: TORCH_FORMS[k] for k in args.forms}
    print(f"batch {args.batch}, {args.threads} thread(s), torch's forms of {', '.join(args.forms)}; training step ms, "
          f"best / median of {args.rounds} rounds")
    print(f"{'model':8} {'torch forms':>15} {'core forms':>15} {'speed-up (median)':>18}")
    for name in args.models:
        times = step_times(name, args.batch, args.rounds, {"torch": torch_forms, "core": CORE_FORMS})
        (tb, tm), (cb, cm) = times["torch"], times["core"]
        print(f"{name:8} {tb:6.1f} / {tm:6.1f} {cb:6.1f} / {cm:6.1f} {tm / cm:17.2f}×")


if __name__ == "__main__":
    main()
