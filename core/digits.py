"""scikit-learn's bundled 8×8 handwritten digits with the project's fixed train / held-out split."""
import importlib.util
from pathlib import Path

import numpy as np

HELDOUT_SIZE = 297  # 1500 training images, 297 held out
SPLIT_SEED = 0


def bundled_digits():
    """(pixels (1797, 8, 8) in 0..16, labels (1797,)): what sklearn.datasets.load_digits returns.

    Deliberately not load_digits itself: importing sklearn.datasets takes seconds, paid by every
    trial's workers at start-up, while the file it reads (bundled with scikit-learn, no download)
    parses in milliseconds. tests/test_data.py checks both give the same arrays.
    """
    package = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if package is None:
        raise ModuleNotFoundError("the digits dataset is scikit-learn's: pip install scikit-learn")
    table = np.loadtxt(Path(package.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz",
                       delimiter=",")  # (1797, 65): 64 pixels, then the label
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def digits_arrays(split):
    """(images, labels) of a split: float32 (N, 1, 8, 8) in [-1, 1] and int64 (N,).

    The split is a fixed permutation of the 1797 images, stratified by nothing but the seed, so
    every process and every run sees the same two sets.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"digits split must be 'train' or 'heldout', got {split!r}")
    pixels, labels = bundled_digits()
    images = (pixels.astype(np.float32) / 16.0) * 2.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    idx = order[HELDOUT_SIZE:] if split == "train" else order[:HELDOUT_SIZE]
    idx = np.sort(idx)
    return images[idx, None], labels[idx]
