"""core.gelu's CPU GELU (x·σ(2u)) against aten's tanh GELU: one block's GELU, and whole eager training steps.

    python -m benchmarks.gelu [--models DiT-T/2 ...] [--batch 64] [--threads 1] [--rounds 30]

The GELU alone runs on the model's own shape (batch × tokens × 4·width floats, its input fresh from a linear, as in
the model), forward and backward; the training steps (forward, backward, fused AdamW on random digits-shaped inputs)
are one model whose MLPs switch between the two forms, interleaved round by round (benchmarks.eager_forms). Best and
median of the rounds.
"""
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.eager_forms import parse_step_arguments, step_times
from core.gelu import approx_gelu
from core.models import model_config

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


def main():
    args = parse_step_arguments(__doc__.splitlines()[0], ["DiT-P/2", "DiT-N/2", "DiT-T/2", "DiT-M/2"], 30)
    print(f"batch {args.batch}; ms, best / median of {args.rounds} rounds")
    print(f"{'model':8} {'form':5} {'GELU forward':>14} {'GELU backward':>14} {'training step':>16}")
    for name in args.models:
        cfg = model_config(name)
        rows = args.batch * (cfg["input_size"] // cfg["patch_size"]) ** 2
        steps = step_times(name, args.batch, args.rounds, {k: {"gelu": form} for k, form in FORMS.items()})
        for k, form in FORMS.items():
            (fb, fm), (bb, bm) = gelu_times(form, rows, cfg["hidden_size"], args.rounds)
            sb, sm = steps[k]
            print(f"{name:8} {k:5} {fb:6.2f} / {fm:5.2f} {bb:6.2f} / {bm:5.2f} {sb:7.1f} / {sm:6.1f}")


if __name__ == "__main__":
    main()
