"""A DiT's fp32 CPU linears through oneDNN and through torch's BLAS (MKL), forward and both gradients, on this CPU.

    python -m benchmarks.linear_library [--models DiT-T/2 DiT-M/2] [--batch 64] [--threads 1] [--rounds 20]

core.linear multiplies on oneDNN where it decides, at import, that the CPU prefers it (`cpu_prefers_onednn`: an
AVX-512 CPU that is not Intel's), and on F.linear (MKL) everywhere else. The rule is a fact about CPUs that holds only
as far as it is measured: limited to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2` for oneDNN's kernels, `ATEN_CPU_CAPABILITY=avx2`
for torch's and for the rule), a Zen 5 EPYC runs oneDNN's kernels faster than MKL's, while the AVX2 EPYC of
benchmarks/README.md ran MKL's faster. This times both on the products one training step
of each model makes (every block's qkv, attention projection, MLP and adaLN linears; the patch embedding, the
timestep MLP and the final layer are left out), each forward and backward as core.linear computes it (oneDNN with its
transposed copies; F.linear under autograd), and prints the faster library beside the one the rule picks here.
Best of the rounds, per shape, interleaved.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

import core.linear
from benchmarks.flags import positive_int, preset
from benchmarks.machine import describe
from core.host_memory import hold_freed_memory
from core.models import model_config


def block_products(cfg, batch):
    """(rows, in, out, count per step) of a DiT's block linears at a batch size."""
    d, depth = cfg["hidden_size"], cfg["depth"]
    rows = batch * (cfg["input_size"] // cfg["patch_size"]) ** 2
    hidden = int(d * cfg["mlp_ratio"])
    return [(rows, d, 3 * d, depth), (rows, d, d, depth), (rows, d, hidden, depth), (rows, hidden, d, depth),
            (batch, d, 6 * d, depth)]


def forward_backward(linear, rows, fan_in, fan_out):
    """A closure: one product forward and backward (input, weight and bias gradients) through `linear`."""
    x = torch.randn(rows, fan_in, requires_grad=True)
    w = (torch.randn(fan_out, fan_in) * fan_in ** -0.5).requires_grad_()
    b = torch.zeros(fan_out, requires_grad=True)
    g = torch.randn(rows, fan_out)

    def run():
        x.grad = w.grad = b.grad = None
        linear(x, w, b).backward(g)
    return run


def interleaved_best_seconds(runs, rounds):
    """Each closure's best time over the rounds, the closures interleaved round by round."""
    best = [float("inf")] * len(runs)
    for run in runs:
        run()  # warm-up: oneDNN's primitive, the allocator's buffers
    for _ in range(rounds):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=preset, default=["DiT-T/2", "DiT-M/2"])
    parser.add_argument("--batch", type=positive_int, default=64, help="images a step (64: a default-study trial's)")
    parser.add_argument("--threads", type=positive_int, default=1, help="1: as a study's trial trains, one core each")
    parser.add_argument("--rounds", type=positive_int, default=20)
    args = parser.parse_args()
    if core.linear._onednn_matmul is None:
        raise SystemExit("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise): nothing to compare")
    torch.set_num_threads(args.threads)
    hold_freed_memory()  # as a trial does
    rule = "oneDNN" if core.linear.ONEDNN_PREFERRED else "MKL"
    print(f"machine: {describe()}")
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        print(f"oneDNN limited to ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}")
    print(f"{args.threads} thread(s), batch {args.batch}; core.linear's rule picks {rule} on this CPU; forward and "
          f"backward of each product, GFLOP/s (best of {args.rounds} rounds)")
    print(f"{'model':8} {'rows × in → out':>20} {'a step':>6} {'oneDNN':>8} {'MKL':>8} {'faster':>7}")
    libraries = {"oneDNN": core.linear._OneDNNLinear.apply, "MKL": F.linear}
    for name in args.models:
        cfg = model_config(name)
        totals = dict.fromkeys(libraries, 0.0)
        for rows, fan_in, fan_out, count in block_products(cfg, args.batch):
            seconds = dict(zip(libraries, interleaved_best_seconds(
                [forward_backward(f, rows, fan_in, fan_out) for f in libraries.values()], args.rounds)))
            flops = 6 * rows * fan_in * fan_out  # three products, a multiply-add 2 flops
            for lib in libraries:
                totals[lib] += count * seconds[lib]
            print(f"{name:8} {f'{rows} × {fan_in} → {fan_out}':>20} {count:6d} "
                  f"{flops / seconds['oneDNN'] / 1e9:8.1f} {flops / seconds['MKL'] / 1e9:8.1f} "
                  f"{min(seconds, key=seconds.get):>7}")
        faster = min(totals, key=totals.get)
        print(f"{name:8} a step's block products: oneDNN {totals['oneDNN'] * 1e3:.1f} ms, MKL {totals['MKL'] * 1e3:.1f} "
              f"ms; {faster} {max(totals.values()) / min(totals.values()):.2f}× faster"
              f" ({'as the rule picks' if faster == rule else 'the rule picks the other'})")


if __name__ == "__main__":
    main()
