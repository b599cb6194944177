"""Images/s of one DiT training step (forward, backward, AdamW): core's DiT vs diffusers' DiTTransformer2DModel.

    python -m benchmarks.train_step --model DiT-M/2 --batch 128

Both models have the same width, depth, heads and patch and the same optimizer (core.optim's, what
a trial trains with); the runs are interleaved in one process so that the machine's state affects
both alike.
"""
import argparse
import time

import torch
from diffusers import DiTTransformer2DModel

from benchmarks.flags import positive_int, preset
from benchmarks.machine import describe
from core.host_memory import hold_freed_memory
from core.models import DiT, model_config
from core.optim import build_optimizer


def diffusers_twin(cfg):
    """diffusers' DiT of the same size as a core config (diffusers counts the null class in num_embeds)."""
    return DiTTransformer2DModel(
        num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        in_channels=cfg["in_channels"], out_channels=cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1),
        num_layers=cfg["depth"], sample_size=cfg["input_size"], patch_size=cfg["patch_size"],
        num_embeds_ada_norm=cfg["num_classes"], norm_eps=1e-6,
    )


def make_step(model, forward, batch, cfg, device):
    """A closure running one forward/backward/AdamW step on fixed random inputs."""
    if torch.device(device).type == "cpu":
        hold_freed_memory()  # as a trial does; else the speed hangs on where glibc's thresholds settle (host_memory)
    opt = build_optimizer(model, lr=1e-4)
    c, s = cfg["in_channels"], cfg["input_size"]
    x = torch.randn(batch, c, s, s, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, cfg["num_classes"], (batch,), device=device)

    def step():
        out = forward(model, x, t, y)
        loss = out.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def time_steps(step, n, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", type=preset, default=["DiT-P/2", "DiT-N/2", "DiT-T/2", "DiT-M/2"])
    parser.add_argument("--batch", type=positive_int, default=128)
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="also time core's DiT under torch.compile (the study's train.compile option)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {describe()}")
    print(f"{'model':10} {'batch':>5} {'core img/s':>11} {'diffusers img/s':>16} {'ratio':>6}"
          + (f" {'compiled img/s':>14} {'ratio':>6}" if args.compile else ""))
    for name in args.model:
        cfg = model_config(name)
        torch.manual_seed(0)
        core = DiT(**cfg).to(device).train()
        theirs = diffusers_twin(cfg).to(device).train()
        steps = {
            "core": make_step(core, lambda m, x, t, y: m(x, t, y), args.batch, cfg, device),
            "diffusers": make_step(theirs, lambda m, x, t, y: m(x, t, y, return_dict=False)[0], args.batch, cfg,
                                   device),
        }
        if args.compile:
            compiled = torch.compile(DiT(**cfg).to(device).train())
            steps["core compiled"] = make_step(compiled, lambda m, x, t, y: m(x, t, y), args.batch, cfg, device)
        for s in steps.values():
            s()  # warm-up
        best = {k: float("inf") for k in steps}
        for _ in range(args.rounds):  # interleaved; the best round of each is the least disturbed
            for k, s in steps.items():
                best[k] = min(best[k], time_steps(s, args.steps, device))
        core_ips, their_ips = args.batch / best["core"], args.batch / best["diffusers"]
        line = f"{name:10} {args.batch:5d} {core_ips:11.1f} {their_ips:16.1f} {core_ips / their_ips:6.2f}"
        if args.compile:
            compiled_ips = args.batch / best["core compiled"]
            line += f" {compiled_ips:14.1f} {compiled_ips / their_ips:6.2f}"
        print(line)


if __name__ == "__main__":
    main()
