"""scikit-learn's bundled 8×8 handwritten digits with the project's fixed train / held-out split."""
import numpy as np

HELDOUT_SIZE = 297  # 1500 training images, 297 held out
SPLIT_SEED = 0


def digits_arrays(split):
    """(images, labels) of a split: float32 (N, 1, 8, 8) in [-1, 1] and int64 (N,).

    The split is a fixed permutation of the 1797 images, stratified by nothing but the seed, so
    every process and every run sees the same two sets.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"digits split must be 'train' or 'heldout', got {split!r}")
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0) * 2.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    idx = order[HELDOUT_SIZE:] if split == "train" else order[:HELDOUT_SIZE]
    idx = np.sort(idx)
    return images[idx, None], labels[idx]
