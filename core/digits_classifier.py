"""A small CNN classifier of the 8×8 digits, whose penultimate features define FID on digits.

FID on digits is the Fréchet distance in this network's 64-d penultimate features, not in
Inception-v3's: its values are not comparable to ImageNet FID. The weights are trained by
`python -m core.train_digits_classifier` and shipped in core/assets/.
"""
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_PATH = Path(__file__).resolve().parent / "assets" / "digits_classifier.safetensors"
FEATURE_DIM = 64  # small, so that a few hundred samples estimate the 64×64 FID covariance well
NUM_CLASSES = 10


class DigitsClassifier(nn.Module):
    """conv 1->32->64 (3×3, padded), 2×2 max-pool to 4×4, Linear to 64 features + ReLU, 10-way head."""

    def __init__(self, feature_dim=FEATURE_DIM, num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)
        self.dropout = nn.Dropout(0.25)  # training only: keeps the 64 features from co-adapting
        self.head = nn.Linear(feature_dim, num_classes)

    def forward_features(self, x):
        """(penultimate features (N, 64), logits (N, 10)) of images (N, 1, 8, 8) in [-1, 1]."""
        x = F.relu(self.conv1(x))  # (N, 32, 8, 8)
        x = F.relu(self.conv2(x))  # (N, 64, 8, 8)
        x = F.max_pool2d(x, 2)  # (N, 64, 4, 4)
        features = F.relu(self.fc(x.flatten(1)))  # (N, 64)
        return features, self.head(self.dropout(features))  # (N, 64), (N, 10)

    def forward(self, x):
        return self.forward_features(x)[1]  # (N, 10) logits


def load_digits_classifier(path=WEIGHTS_PATH):
    """The trained classifier in eval mode with frozen weights, read from a safetensors file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"digits classifier weights not found: {path} (train them with `python -m core.train_digits_classifier`)"
        )
    model = DigitsClassifier()
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except Exception as e:  # a truncated file and a foreign state dict raise different errors
        raise ValueError(f"cannot load digits classifier weights {path}: {e}") from e
    return model.requires_grad_(False).eval()
