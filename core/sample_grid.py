"""A PNG grid of samples, one row per class, written atomically."""
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

MIN_CELL = 32  # 8×8 digits are enlarged (nearest) to be visible
PADDING = 2


def grid_size(num_classes, per_class, image_size):
    """(width, height) in pixels of the grid of num_classes rows × per_class images of image_size."""
    cell = image_size * max(1, MIN_CELL // image_size) + PADDING
    return per_class * cell + PADDING, num_classes * cell + PADDING


def save_grid(images, per_class, path):
    """uint8 images (rows × per_class, C, H, W), row-major, as a PNG at path (written to a temporary, then renamed)."""
    scale = max(1, MIN_CELL // images.shape[-1])
    x = images.float() / 255  # (N, C, H, W) in [0, 1]
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")  # (N, C, sH, sW)
    grid = make_grid(x, nrow=per_class, padding=PADDING)  # (3, rows * cell + pad, per_class * cell + pad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with torch.no_grad():
        save_image(grid, tmp, format="png")
    os.replace(tmp, path)
    return path
