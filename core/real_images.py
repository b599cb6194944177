"""The real images FID is measured against: the reference set and the held-out set of the noise floor.

Each set is a Dataset of uint8 (3, H, W) images plus an `identity`: everything that determines its
images (source, path, a fingerprint of the files or pixels, size, subset), from which core.fid
derives the name its features are cached under, so that a changed dataset gets a new cache entry.

The reference may instead be an .npz of FID statistics, laid out as ADM's reference batches
(VIRTUAL_imagenet256_labeled.npz): `mu` (D,) and `sigma` (D, D) of the real set's features and,
optionally, `arr_0`, real images (N, H, W, 3) uint8 for KID and precision / recall
(ReferenceStatistics).
"""
import hashlib
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

SUBSET_SEED = 0  # a fixed subset, shared by every trial and evaluation of a study
LOAD_CHUNK = 1024  # images a folder set decodes at once, in threads
STATISTICS = ("mu", "sigma")  # the arrays of an .npz of FID statistics (ADM's key names)
STATISTICS_IMAGES = "arr_0"  # its optional real images, (N, H, W, 3) uint8
# What eval.reference is for latents, which have no real images of their own.
LATENT_REFERENCE = ("a folder of the real training images (e.g. the ImageNet train folder the latents were encoded "
                    "from), or an .npz of their FID statistics (ADM's reference batch, "
                    "VIRTUAL_imagenet256_labeled.npz)")


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
    if not tree:  # listed, with neither: scan_image_folder's words ("one sub-folder per class") are a training set's
        from torchvision.datasets.folder import IMG_EXTENSIONS

        raise ValueError(f"image folder {root} holds no images ({', '.join(IMG_EXTENSIONS)}), loose or in "
                         "sub-folders")
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


@dataclass
class ReferenceStatistics:
    """A reference given as FID statistics read from a file, with the real images it holds (None if none)."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    images: RealImages | None  # arr_0, for KID and precision / recall
    identity: dict
    description: str


class NpzImages(Dataset):
    """An .npz's arr_0, uint8 (N, H, W, 3), as (3, S, S) items centre-cropped to image_size as folder images are.

    The array (2 GB in ADM's ImageNet batch) is read at the first item: not at all when its features are cached.
    """

    def __init__(self, path, count, image_size):
        self.path, self.count, self.image_size = path, count, image_size
        self._images = None

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        from core.data import center_crop

        if self._images is None:
            with np.load(self.path, allow_pickle=False) as npz:
                self._images = npz[STATISTICS_IMAGES]  # (N, H, W, 3) uint8
        image = self._images[i]  # (H, W, 3)
        if self.image_size is not None and image.shape[:2] != (self.image_size, self.image_size):
            return pil_to_tensor(center_crop(Image.fromarray(image), self.image_size))  # (3, S, S)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # (3, H, W)


def is_statistics_file(path):
    """Whether a reference path names an .npz of FID statistics (or any file: folders are image folders)."""
    path = Path(path).expanduser()
    named = path.suffix.lower() == ".npz"
    try:
        return path.is_file() or (named and not path.is_dir())  # a folder named x.npz is a folder
    except OSError:  # in a folder that cannot be entered: statistics_problem or the folder's scan names it
        return named


def statistics_problem(path, dim=None):
    """Why the file at path is not FID statistics of dim-d features (ReferenceStatistics' file), None if it is.

    Reads mu and sigma (32 MB for Inception's 2048-d features) and only the header of arr_0, not its images.
    """
    try:
        _read_statistics(path, dim)
    except ValueError as err:
        return str(err)
    return None


def _read_statistics(path, dim=None):
    """(mu (D,) float64, sigma (D, D) float64, arr_0's number of images or None) of an .npz of FID statistics of
    dim-d features (None: any); a ValueError says what is wrong with the file."""
    path = Path(path).expanduser()
    try:
        exists = path.exists()
    except OSError as err:  # in a folder that cannot be entered
        raise ValueError(f"{path}: {err.strerror or err}") from None
    if not exists:
        raise ValueError(f"{path} does not exist")
    if not zipfile.is_zipfile(path):  # np.load would try other files as pickles, and blame pickling
        raise ValueError(f"{path} is not an .npz (a zip archive of arrays, as numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = npz.files
            stats = {key: np.asarray(npz[key], np.float64) for key in STATISTICS if key in names}  # ADM's: float64
            header = _array_header(npz, STATISTICS_IMAGES) if STATISTICS_IMAGES in names else None
    # A damaged archive or array, or one numpy reads only by unpickling (an object array).
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} cannot be read as an .npz of FID statistics: {' '.join(str(err).split())}") from None
    if missing := [key for key in STATISTICS if key not in stats]:
        raise ValueError(f"{path} holds no {' and no '.join(repr(k) for k in missing)} array (it holds: "
                         f"{', '.join(names) or 'nothing'}); FID statistics are mu (D,) and sigma (D, D)")
    mu, sigma = stats["mu"], stats["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path} holds mu {mu.shape} and sigma {sigma.shape}; FID statistics are mu (D,) and "
                         "sigma (D, D)")
    if dim is not None and len(mu) != dim:
        raise ValueError(f"{path} holds statistics of {len(mu)}-d features; the feature extractor's are {dim}-d")
    for key, values in stats.items():
        if bad := int((~np.isfinite(values)).sum()):
            raise ValueError(f"{path}: {key} holds {bad} value(s) that are not finite (NaN or inf)")
    return mu, sigma, _images_count(path, *header) if header is not None else None


def _array_header(npz, key):
    """(shape, dtype) of an .npz's array from its .npy header, without reading the array (arr_0: 2 GB at 256²)."""
    with npz.zip.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"{key} is stored in .npy format {version[0]}.{version[1]}, which is not read here")
        shape, _, dtype = read(f)
    return shape, dtype


def _images_count(path, shape, dtype):
    """The number of arr_0's images; a ValueError unless they are uint8 (N, H, W, 3), N >= 2."""
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: {STATISTICS_IMAGES} is {dtype} {shape}; its real images must be uint8 (N, H, W, 3)")
    if shape[0] < 2:  # KID and precision / recall, as FID's statistics, need 2
        raise ValueError(f"{path}: {STATISTICS_IMAGES} holds {shape[0]} image(s); at least 2 real images are needed")
    return shape[0]


def reference_statistics(path, dim=None, image_size=None):
    """The FID statistics (mu, sigma of dim-d features) of an .npz, and its arr_0 images (if any) at image_size.

    Identified by the file's digest, not its path: a copy is the same reference, a file rewritten in place another.
    """
    from core.fid import file_digest  # core.fid imports this module

    path = Path(path).expanduser().resolve()
    mu, sigma, count = _read_statistics(path, dim)
    digest = file_digest(path)
    images = None
    if count is not None:
        identity = dict(source="npz", file=digest, array=STATISTICS_IMAGES, count=count, image_size=image_size)
        images = RealImages(NpzImages(path, count, image_size), identity,
                            f"{path} {STATISTICS_IMAGES} ({count} images)")
    against = (f"KID, precision and recall against its {count} images ({STATISTICS_IMAGES})" if images is not None
               else f"no images ({STATISTICS_IMAGES}) for KID, precision and recall")
    return ReferenceStatistics(mu, sigma, images, dict(source="npz", file=digest, path=str(path)),
                               f"FID statistics (mu, sigma of {len(mu)}-d features) from {path}; {against}")


def reference_images(dataset, data_path=None, image_size=None, reference=None, max_images=None, dim=None):
    """The reference set: the `reference` folder if given, else the training data (digits: the train split); or a
    `reference` .npz of FID statistics of dim-d features (ReferenceStatistics; max_images does not apply)."""
    if reference is not None and is_statistics_file(reference):
        return reference_statistics(reference, dim, image_size)
    if reference is not None:
        return folder_images(reference, image_size, max_images)
    if dataset == "digits":
        return digits_images("train", max_images)
    if dataset == "imagefolder":
        return folder_images(data_path, image_size, max_images)
    raise ValueError(f"FID on the {dataset!r} dataset needs eval.reference: {LATENT_REFERENCE}")


def heldout_images(dataset, image_size=None, heldout=None, max_images=None):
    """The held-out set of the noise floor: the `heldout` folder if given, digits' held-out split, else None."""
    if heldout is not None:
        return folder_images(heldout, image_size, max_images)
    if dataset == "digits":
        return digits_images("heldout", max_images)
    return None
