"""Train the digits FID classifier on the train split, deterministically, and write its weights.

    python -m core.train_digits_classifier [--out core/assets/digits_classifier.safetensors]

The held-out split is used once, after training, to report accuracy; weights below
MIN_ACCURACY are not written. Runs are bitwise reproducible on one machine and torch build
(one thread, deterministic kernels, seeded generators); other CPUs may differ in the last bits.
"""
import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from core.digits import digits_arrays
from core.digits_classifier import WEIGHTS_PATH, DigitsClassifier
from core.writable import write_problem

SEED = 0
EPOCHS = 40
BATCH_SIZE = 50  # 30 steps per epoch over the 1500 training images
LR = 2e-3
WEIGHT_DECAY = 1e-4
MIN_ACCURACY = 0.97
MAX_SEED = 2**64 - 1  # torch.manual_seed's largest; it takes negatives as seed + 2**64, so -1 would repeat this one


@contextlib.contextmanager
def deterministic(seed):
    """Seed torch, use one thread and deterministic kernels; restore the caller's settings on exit."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left untouched
        torch.manual_seed(seed)
        torch.set_num_threads(1)  # reductions split across threads may sum in a different order
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(strict)


def random_shift(x, generator):
    """Shift each image by -1, 0 or +1 pixel along each axis, filling with background (-1); never flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (N, 1, H+2, W+2)
    dy, dx = torch.randint(0, 3, (2, n), generator=generator)  # offsets into the padded image
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]  # (N, 1, H, W)


def train(epochs=EPOCHS, seed=SEED):
    """A DigitsClassifier trained on the train split only, in eval mode."""
    images, labels = (torch.from_numpy(a) for a in digits_arrays("train"))  # (N, 1, 8, 8), (N,)
    with deterministic(seed):
        model = DigitsClassifier()
        generator = torch.Generator().manual_seed(seed)  # shuffling and shifts
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        steps = epochs * -(-len(labels) // BATCH_SIZE)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(labels), generator=generator).split(BATCH_SIZE):
                loss = F.cross_entropy(model(random_shift(images[idx], generator)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, split="heldout"):
    """Top-1 accuracy of a classifier on a digits split."""
    images, labels = (torch.from_numpy(a) for a in digits_arrays(split))
    return (model.eval()(images).argmax(1) == labels).float().mean().item()


def save_weights(model, path, metadata):
    """Write the state dict as safetensors atomically: a temporary file, then a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; this one is package data
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def out_problem(path):
    """Why the weights could not be written to path (a file, its folder created if missing), or None."""
    path = Path(path)
    try:  # Python 3.11's is_dir raises in a folder this user cannot enter
        if path.is_dir():
            return "is a folder; give the file to write"
    except OSError as e:
        return f"cannot be reached ({e.strerror}: {e.filename})"
    return write_problem(path.parent)


def check_arguments(args):
    """Raise ValueError naming the flag whose value cannot work: before training, not after its 15 s."""
    if args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs}: must be an integer >= 1")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed {args.seed}: must be an integer in 0..{MAX_SEED}")
    problem = out_problem(args.out)
    if problem:
        raise ValueError(f"--out {args.out}: {problem}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m core.train_digits_classifier",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(WEIGHTS_PATH), help="safetensors file to write")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    model = train(args.epochs, args.seed)
    train_acc, heldout_acc = accuracy(model, "train"), accuracy(model, "heldout")
    print(f"train accuracy {train_acc:.4f}, held-out accuracy {heldout_acc:.4f}")
    if heldout_acc < MIN_ACCURACY:
        print(f"held-out accuracy below {MIN_ACCURACY}: weights not written", file=sys.stderr)
        return 1
    # One metadata key: safetensors orders several at random, and retraining should give the same bytes.
    metadata = {"trained_by": f"core.train_digits_classifier --seed {args.seed} --epochs {args.epochs}; "
                              f"held-out accuracy {heldout_acc:.4f}; torch {torch.__version__}"}
    save_weights(model, args.out, metadata)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
