"""The real images FID is measured against: the reference set and the held-out set of the noise floor.

Each set is a Dataset of uint8 (3, H, W) images plus an `identity`: everything that determines its
images (source, path, a fingerprint of the files or pixels, size, subset), from which core.fid
derives the name its features are cached under, so that a changed dataset gets a new cache entry.
"""
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

SUBSET_SEED = 0  # a fixed subset, shared by every trial and evaluation of a study
LOAD_CHUNK = 1024  # images a folder set decodes at once, in threads


@dataclass
class RealImages:
    """Real images as uint8 (3, H, W) items, and what determines them."""

    dataset: Dataset
    identity: dict
    description: str

    def __len__(self):
        return len(self.dataset)


def to_uint8(images):
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, C, H, W) in [0, 255], rounded to nearest (half to even: the
    reference's clamp(127.5x + 128) truncation differs only at exact halves); torch-fidelity takes uint8 as given."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class UInt8Images(Dataset):
    """uint8 images (N, 1 or 3, H, W) as the RGB (3, H, W) items torch-fidelity reads; grey is repeated."""

    def __init__(self, images):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].expand(3, -1, -1)  # (3, H, W)


class FolderImages(Dataset):
    """Image files centre-cropped to image_size (as the training data are), decoded lazily in threaded chunks.

    torch-fidelity reads the set in order in one process (save_cpu_ram), so decoding a chunk with
    a thread pool (PIL releases the GIL) is what keeps a 50K-image reference from taking an hour.
    Nothing is read when the features are already cached.
    """

    def __init__(self, files, image_size):
        self.files, self.image_size = list(files), image_size
        self._start, self._chunk = None, None

    def __len__(self):
        return len(self.files)

    def _load(self, file):
        from core.data import center_crop, load_image

        # load_image, as training reads: a corrupt file is an UnreadableImage naming it, not PIL's traceback.
        return pil_to_tensor(center_crop(load_image(file), self.image_size))  # (3, S, S) uint8

    def __getitem__(self, i):
        if self._start is None or not self._start <= i < self._start + len(self._chunk):
            self._start = i - i % LOAD_CHUNK
            with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
                self._chunk = list(pool.map(self._load, self.files[self._start:self._start + LOAD_CHUNK]))
        return self._chunk[i - self._start]


def folder_fingerprint(root, files):
    """A digest of every file's relative path, size and modification time: adding or changing a file changes it."""
    lines = []
    for f in files:
        st = os.stat(f)
        lines.append(f"{os.path.relpath(f, root)}\t{st.st_size}\t{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _subset(n_total, max_images):
    """Indices of a fixed random subset of at most max_images, in their original order."""
    if max_images is None or n_total <= max_images:
        return torch.arange(n_total)
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(n_total, generator=generator)[:max_images].sort().values


def digits_images(split, max_images=None):
    """The digits split (all of it, or a fixed subset of max_images) in memory."""
    from core.digits import digits_arrays

    images = to_uint8(torch.from_numpy(digits_arrays(split)[0]))  # (N, 1, 8, 8)
    keep = _subset(len(images), max_images)
    images = images[keep]
    identity = dict(source="digits", split=split, count=len(images), subset_seed=SUBSET_SEED,
                    pixels=hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16])
    return RealImages(UInt8Images(images), identity, f"digits {split} split ({len(images)} images)")


def real_image_files(path):
    """The image files of a folder of real images, in a fixed order: an ImageNet-style tree (class sub-folders, as
    core.data reads it), or a flat folder of images (ImageNet's validation images as distributed; hidden folders
    beside them, a notebook's or a NAS's, do not make it a tree). FID uses no labels."""
    from core.data import loose_images, scan_image_folder

    root = Path(path)
    try:
        loose = loose_images(root)
        tree = any(e.is_dir() and not e.name.startswith(".") for e in root.iterdir())
    except OSError:  # missing, not a folder, unreadable: scan_image_folder names which
        loose, tree = [], True
    if loose and not tree:
        return [str(f) for f in loose]
    _, samples = scan_image_folder(root, every_class=False)
    return [file for file, _ in samples]


def folder_images(path, image_size, max_images=None):
    """The images of a folder (real_image_files), or a fixed subset of max_images, at image_size."""
    if image_size is None:
        raise ValueError(f"the real images in {path} need an image_size to be cropped to")
    root = Path(path).expanduser().resolve()
    every = real_image_files(root)
    files = [every[i] for i in _subset(len(every), max_images).tolist()]
    if len(files) < 2:  # one image has no covariance: torch-fidelity's LinAlgError, which names no folder
        raise ValueError(f"{root} holds {len(files)} image(s); FID's statistics need at least 2 real images")
    identity = dict(source="folder", path=str(root), count=len(files), of=len(every), subset_seed=SUBSET_SEED,
                    image_size=image_size, files=folder_fingerprint(root, files))
    return RealImages(FolderImages(files, image_size), identity, f"{root} ({len(files)} of {len(every)} images)")


def reference_images(dataset, data_path=None, image_size=None, reference=None, max_images=None):
    """The reference set: the `reference` folder if given, else the training data (digits: the train split)."""
    if reference is not None:
        return folder_images(reference, image_size, max_images)
    if dataset == "digits":
        return digits_images("train", max_images)
    if dataset == "imagefolder":
        return folder_images(data_path, image_size, max_images)
    raise ValueError(f"FID on the {dataset!r} dataset needs eval.reference: a folder of the real training "
                     "images (e.g. the ImageNet train folder the latents were encoded from)")


def heldout_images(dataset, image_size=None, heldout=None, max_images=None):
    """The held-out set of the noise floor: the `heldout` folder if given, digits' held-out split, else None."""
    if heldout is not None:
        return folder_images(heldout, image_size, max_images)
    if dataset == "digits":
        return digits_images("heldout", max_images)
    return None
