"""core.gelu's CPU GELU (x·σ(2u)) against aten's tanh GELU: one block's GELU, and whole eager training steps.

    python -m benchmarks.gelu [--models DiT-T/2 ...] [--batch 64] [--threads 1] [--rounds 30]

The GELU alone runs on the model's own shape (batch × tokens × 4·width floats, its input fresh from a linear, as in
the model), forward and backward; the training steps (forward, backward, fused AdamW on random digits-shaped inputs)
are one model whose MLPs switch between the two forms, interleaved round by round, two steps a round. Best and
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
from core.gelu import approx_gelu
from core.models import DiT, model_config

FORMS = {"aten": lambda x: F.gelu(x, approximate="tanh"), "core": approx_gelu}


def gelu_times(form, rows, width, rounds):
    """Best and median ms of the GELU's forward and its backward on (rows, 4·width) floats."""
    h, w = torch.randn(rows, width), torch.randn(4 * width, width) * width ** -0.5
    forward, backward = [], []
    for _ in range(rounds):
        x = F.linear(h, w).requires_grad_()  # (rows, 4·width)
        start = time.perf_counter()
        y = form(x)
        middle = time.perf_counter()
        y.backward(torch.ones_like(y))
        forward.append(middle - start)
        backward.append(time.perf_counter() - middle)
    return [(min(t) * 1e3, statistics.median(t) * 1e3) for t in (forward, backward)]


def step_times(name, batch, rounds):
    """Best and median ms of a training step with each form, interleaved in one model."""
    form = {"name": "core"}
    core.models.approx_gelu = lambda x: FORMS[form["name"]](x)  # the MLPs look the GELU up at each call
    try:
        cfg = model_config(name)
        torch.manual_seed(0)
        step = make_step(DiT(**cfg), lambda m, x, t, y: m(x, t, y), batch, cfg, torch.device("cpu"))
        times = {k: [] for k in FORMS}
        for k in FORMS:
            form["name"] = k
            step()
        for r in range(rounds):
            for k in (FORMS if r % 2 else reversed(list(FORMS))):
                form["name"] = k
                start = time.perf_counter()
                step()
                step()
                times[k].append((time.perf_counter() - start) / 2)
    finally:
        core.models.approx_gelu = approx_gelu
    return {k: (min(t) * 1e3, statistics.median(t) * 1e3) for k, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["DiT-P/2", "DiT-N/2", "DiT-T/2", "DiT-M/2"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="1: as a study's trial trains, one core each")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {describe()}")
    print(f"batch {args.batch}; ms, best / median of {args.rounds} rounds")
    print(f"{'model':8} {'form':5} {'GELU forward':>14} {'GELU backward':>14} {'training step':>16}")
    for name in args.models:
        cfg = model_config(name)
        rows = args.batch * (cfg["input_size"] // cfg["patch_size"]) ** 2
        steps = step_times(name, args.batch, args.rounds)
        for k, form in FORMS.items():
            (fb, fm), (bb, bm) = gelu_times(form, rows, cfg["hidden_size"], args.rounds)
            sb, sm = steps[k]
            print(f"{name:8} {k:5} {fb:6.2f} / {fm:5.2f} {bb:6.2f} / {bm:5.2f} {sb:7.1f} / {sm:6.1f}")


if __name__ == "__main__":
    main()
