"""Run by every rank of tests/test_evaluate.py's torchrun test: one collective evaluation, rank 0 writes its result.

    torchrun --nproc_per_node 2 tests/evaluate_worker.py OUT_JSON CACHE_DIR
"""
import json
import sys

import torch
import torch.distributed as dist

from core.evaluate import EvalConfig, evaluate
from core.models import DiT_models

CONFIG = EvalConfig(num_samples=50, num_steps=5, guided_channels=None, batch_size=16, grid_images_per_class=2)


def jittered_model():
    """An untrained DiT-P/2 with every weight jittered, so that its samples differ from image to image."""
    torch.manual_seed(0)
    model = DiT_models["DiT-P/2"]().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def main(out_json, cache_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = EvalConfig(**{**CONFIG.__dict__, "cache_dir": cache_dir})
    result = evaluate(jittered_model(), cfg, dataset="digits", device="cpu", rank=rank, world_size=world,
                      grid_path=out_json + ".png")
    everyone = [None] * world
    dist.all_gather_object(everyone, result)
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump({"world_size": world, "results": everyone}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
