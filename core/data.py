"""Training data: the bundled digits, an image folder, pre-encoded latents, and the per-rank batch sampler."""
import hashlib
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, TensorDataset

from core.data_error import DataError
from core.digits import digits_arrays
from core.latents import LatentShards, encode_id, read_meta

SPLITS = ("train", "heldout")


#################################################################################
#                                   Datasets                                    #
#################################################################################

def build_digits(split="train", path=None, image_size=None):
    """scikit-learn's 8×8 digits in memory: a TensorDataset, so `.tensors` is (X (N, 1, 8, 8), Y (N,)).

    No flips: digits are not mirror-symmetric.
    """
    _check_digits_size(image_size)
    images, labels = digits_arrays(split)
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))


def _check_digits_size(image_size):
    if image_size not in (None, 8):
        raise ValueError(f"the digits dataset is 8×8; image_size {image_size} is not supported")


def center_crop(pil_image, image_size):
    """Resize so the short side is image_size, then crop the centre square, as the reference DiT does.

    Halving with a box filter first, while the image is at least twice too large, keeps the final
    bicubic resize from aliasing.
    """
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    left = (pil_image.size[0] - image_size) // 2
    top = (pil_image.size[1] - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))


def image_transform(image_size):
    """PIL image -> float32 (3, image_size, image_size) in [-1, 1], centre-cropped (the mirror is MirroredImages')."""
    # torchvision is imported where image folders need it: it pulls in torch._dynamo, seconds of
    # every trial's start-up that digits and latents do not need.
    from torchvision import transforms

    return transforms.Compose([
        transforms.Lambda(partial(center_crop, image_size=image_size)),  # picklable for DataLoader workers
        transforms.ToTensor(), transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], inplace=True),
    ])


class UnreadableImage(DataError):
    """An image file that cannot be decoded; the message names the file."""


# Formats whose 32-bit grey images PIL makes from 16-bit ones (a PGM's maxval scaled to 65535; a 16-bit PNG before
# Pillow 10.3): their range is 16 bits. Any other's (a 32-bit TIFF) has no set range to scale from.
SIXTEEN_BIT_FORMATS = ("PNG", "PPM")


def _as_16_bit(image):
    """A grey image of 32-bit integers as 16-bit ("I;16"), when its format made it of a 16-bit one."""
    if image.mode != "I" or image.format not in SIXTEEN_BIT_FORMATS:  # floats ("F": a PFM, which PIL calls PPM too)
        raise ValueError(f"PIL mode {image.mode} ({image.format}): 32-bit grey of no set range; "
                         "save it with 8 or 16 bits")
    return Image.fromarray(np.asarray(image).astype(np.uint16))  # (H, W) uint16: "I;16"


def load_image(path):
    """An image file as an RGB PIL image, read where it is needed (no scan up front); UnreadableImage names it."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            if image.mode in ("I", "F"):
                image = _as_16_bit(image)  # 16-bit grey as PIL opens a PGM, or a PNG before Pillow 10.3
            if image.mode.startswith("I;16"):  # 16-bit grey: convert() clips it to 255, near white; scale it down
                image = Image.fromarray((np.asarray(image, np.uint16) >> 8).astype(np.uint8))  # (H, W) uint8: "L"
            return image.convert("RGB")
    # PIL reports a bad file by format and stage: OSError (truncated), SyntaxError (a broken PNG), ValueError,
    # struct.error, DecompressionBombError, ... any of them means this file, named, is not a usable image.
    except UnidentifiedImageError:
        raise UnreadableImage(f"image {path} cannot be read: not an image file PIL can identify") from None
    except Exception as err:  # noqa: BLE001 - see above
        reason = " ".join(f"{type(err).__name__}: {err}".split())  # one line: the worker's message is its last
        raise UnreadableImage(f"image {path} cannot be read: {reason}") from None


class MirroredImages(Dataset):
    """Item j is image j // 2 of an image folder, mirrored when j is odd: the reference's random horizontal flip
    (after the crop), drawn without replacement and a pure function of the sampler's position, so that a resumed
    run and any world size see the same views (core.latents.LatentShards does the same for latents).
    """

    def __init__(self, folder):
        self.folder, self.classes, self.samples = folder, folder.classes, folder.samples

    def __len__(self):
        return 2 * len(self.folder)

    def __getitem__(self, j):
        x, y = self.folder[j // 2]  # (3, H, W)
        return (x.flip(-1) if j % 2 else x), y


def scan_image_folder(path, every_class=True):
    """(classes, [(file, label), ...]) of an ImageNet-style tree, labels in sorted folder order.

    every_class: refuse a class folder without images (a label the model would learn nothing of, yet sample).
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image folder {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"image folder {path} is not a directory")
    try:
        classes, class_to_idx = find_classes(path)
        samples = _class_images(path, class_to_idx, IMG_EXTENSIONS)
    except FileNotFoundError:  # no class folder in it
        loose = loose_images(path)
        if loose:
            held = f"holds {len(loose)} images but no class folders"
        elif any(path.iterdir()):  # files of other kinds (.gif, .npy, ...): "empty" sent users looking for nothing
            held = f"holds no class folders and no images ({', '.join(IMG_EXTENSIONS)})"
        else:
            held = "is empty"
        raise ValueError(f"image folder {path} {held}: it needs one sub-folder of images per class") from None
    except PermissionError as e:  # the folder, or a class folder in it, that this user may not enter
        raise ValueError(f"image folder {path} cannot be read ({e.strerror}: {e.filename})") from None
    if not samples:
        raise ValueError(f"image folder {path} has class folders {classes[:5]} but no images "
                         f"({', '.join(IMG_EXTENSIONS)})")
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if every_class and empty:
        raise ValueError(f"image folder {path}: class folders without images: {empty[:5]}"
                         f"{f' and {len(empty) - 5} more' if len(empty) > 5 else ''}")
    return classes, samples


def _class_images(path, class_to_idx, extensions):
    """[(file, label), ...] as torchvision's make_dataset lists them (each class folder walked in sorted order, links
    followed), but a folder that cannot be entered is a PermissionError naming it: its os.walk skips it without a word,
    and a class, or part of one, went missing from training or from FID's reference."""
    def unreadable(err):
        raise err

    samples = []
    for name in sorted(class_to_idx):
        for root, _, files in sorted(os.walk(os.path.join(path, name), followlinks=True, onerror=unreadable)):
            for f in sorted(files):
                file = os.path.join(root, f)
                if f.lower().endswith(extensions):
                    samples.append((file, class_to_idx[name]))
                elif os.path.islink(file):  # the walk lists a link it cannot follow (to a folder not to be entered)
                    try:  # as a file: its PermissionError
                        os.stat(file)
                    except PermissionError:
                        raise
                    except OSError:  # a broken link, no image: passed over, as torchvision does
                        pass
    return samples


def loose_images(path):
    """The image files directly in folder path (not in its sub-folders), in sorted order."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted(p for p in Path(path).iterdir() if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))


def build_imagefolder(split="train", path=None, image_size=None):
    """An ImageNet-style folder (one sub-folder per class), centre-cropped; every image also mirrored when training.

    The held-out set of a folder dataset is another folder: `split` only leaves out the mirrors.
    """
    _require("imagefolder", path, image_size)
    from core.image_folder import ScannedImageFolder

    folder = ScannedImageFolder(str(path), scan_image_folder(path), transform=image_transform(image_size),
                                loader=load_image)
    return MirroredImages(folder) if split == "train" else folder


def build_latents(split="train", path=None, image_size=None, in_memory=None, copies=None):
    """Latent shards written by `python -m scaling.encode_latents`; training items are every image and its mirror.

    See core.latents.LatentShards (in_memory, copies): the train split has 2 items per image, the held-out split one.
    """
    _require("latents", path)
    read_meta(path, image_size=image_size)
    return LatentShards(path, flip=split == "train", in_memory=in_memory, copies=copies)


def _require(name, path, image_size=0):
    if path is None:
        raise ValueError(f"the {name} dataset needs a path")
    if image_size is None:
        raise ValueError(f"the {name} dataset needs an image_size")


DATASETS = {"digits": build_digits, "imagefolder": build_imagefolder, "latents": build_latents}


def build_dataset(name, split="train", path=None, image_size=None, **opts):
    """A Dataset of (x float32 (C, H, W), y int64) items; in-memory ones also expose `.tensors`."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return DATASETS[name](split=split, path=path, image_size=image_size, **opts)


def data_identity(dataset):
    """A 62-bit digest of which items a training dataset holds, for ranks to compare: an image folder's files (their
    names and labels, relative to the folder: not their sizes, a stat of each), a latent set's encode (core.latents'
    encode_id), and nothing for the digits, which ship with scikit-learn."""
    if isinstance(dataset, LatentShards):
        text = dataset.encode
    elif isinstance(dataset, MirroredImages):
        # torchvision joins every file's path onto the folder's root: cut it off (os.path.relpath took 3 µs a file,
        # 4 s of each start of a trial on ImageNet's 1.28M images).
        root = len(os.path.join(os.path.expanduser(dataset.folder.root), ""))  # expanded as torchvision does
        text = "\n".join(f"{file[root:]}\t{label}" for file, label in dataset.samples)
    else:
        return 0
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 2


def training_items(name, num_images):
    """Items in an epoch of a dataset's train split: its images and, but for the digits, their mirrors."""
    return num_images if name == "digits" else 2 * num_images


def dataset_info(name, path=None, image_size=None):
    """What a model needs to know about a dataset, without loading it: sizes, classes, image count, encode id."""
    # The encode id (core.latents.encode_id) only for latents: an image folder's would take a stat of every image.
    if name == "digits":
        _check_digits_size(image_size)
        _, labels = digits_arrays("train")
        return dict(input_size=8, in_channels=1, num_classes=10, num_images=len(labels), pixel_space=True,
                    encode=None)
    if name == "imagefolder":
        _require(name, path, image_size)
        classes, samples = scan_image_folder(path)
        return dict(input_size=image_size, in_channels=3, num_classes=len(classes), num_images=len(samples),
                    pixel_space=True, encode=None)
    if name == "latents":
        _require(name, path)
        meta = read_meta(path, check_shards=True, image_size=image_size)
        channels, height, _ = meta["latent_shape"]
        return dict(input_size=height, in_channels=channels, num_classes=len(meta["classes"]),
                    num_images=meta["num_images"], pixel_space=False, encode=encode_id(meta))
    raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")


#################################################################################
#                                  Sampling                                     #
#################################################################################

def epoch_seed(seed, epoch):
    """The generator seed of an epoch's order: a hash of (seed, epoch), 64 bits (torch's CPU generator reads 32).

    seed + epoch made seed s + 1 see seed s's orders one epoch later (runs of a seed sweep shared their data
    order), and seed * k + epoch would reuse the seeds of the training noise (core.train.step_randomness).
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8, person=b"dit-data-order").digest()
    return int.from_bytes(digest, "little")


class ShardedBatchSampler:
    """Endless, resumable batches of indices: each global batch is split into disjoint, contiguous rank shards.

    Epoch e is torch.randperm(num_items) seeded by (seed, e) (see epoch_seed); its global batch b is positions
    [b*G, (b+1)*G) of that permutation and rank r takes the r-th 1/world_size of it. So the
    ranks together see exactly what one process with the same global batch sees, and the
    position (epoch, batch) is all it takes to resume, even with another world size.
    """

    def __init__(self, num_items, global_batch, rank=0, world_size=1, seed=0, drop_last=True):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if drop_last and global_batch > num_items:
            raise ValueError(f"global batch {global_batch} is larger than the dataset ({num_items} items)")
        self.num_items, self.global_batch = num_items, global_batch
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.epoch, self.batch = 0, 0
        self.order = "hashed"  # how epochs are seeded (see permutation); a resumed run keeps its checkpoint's
        self._perm_epoch, self._perm = None, None

    @property
    def batches_per_epoch(self):
        full, rest = divmod(self.num_items, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def permutation(self, epoch):
        """The order of the items in an epoch, the same on every rank."""
        if self._perm_epoch != epoch:
            # "seed+epoch": the seeding of checkpoints written before epoch_seed, so that their runs resume exactly.
            seed = epoch_seed(self.seed, epoch) if self.order == "hashed" else self.seed + epoch
            generator = torch.Generator().manual_seed(seed)
            self._perm, self._perm_epoch = torch.randperm(self.num_items, generator=generator), epoch
        return self._perm

    def indices(self, epoch, batch):
        """This rank's item indices of global batch `batch` of `epoch`."""
        global_batch = self.permutation(epoch)[batch * self.global_batch:(batch + 1) * self.global_batch]
        # A short last batch (drop_last=False) is split as evenly as it goes; some ranks may get one less.
        return torch.tensor_split(global_batch, self.world_size)[self.rank].tolist()

    def __iter__(self):
        """Yield index lists from the current position, forever, moving past each batch as it is handed out."""
        while True:
            epoch, batch = self.epoch, self.batch
            self.epoch, self.batch = divmod(epoch * self.batches_per_epoch + batch + 1, self.batches_per_epoch)
            yield self.indices(epoch, batch)

    def seek(self, step):
        """Move to the step-th batch since the start (every epoch has the same number of batches)."""
        self.epoch, self.batch = divmod(step, self.batches_per_epoch)

    def state_dict(self):
        return dict(epoch=self.epoch, batch=self.batch, num_items=self.num_items,
                    global_batch=self.global_batch, seed=self.seed, drop_last=self.drop_last, order=self.order)

    def load_state_dict(self, state):
        for key in ("num_items", "global_batch", "seed", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler has {getattr(self, key)}")
        order = state.get("order", "seed+epoch")  # a state without it was written before epochs were hashed
        if order not in ("hashed", "seed+epoch"):
            raise ValueError(f"sampler state has order={order!r}, not 'hashed' or 'seed+epoch'")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0:
            raise ValueError(f"sampler state has epoch={epoch}, below 0")
        if not 0 <= batch < self.batches_per_epoch:  # a position no run of this sampler reaches
            raise ValueError(f"sampler state has batch={batch}, not one of this sampler's {self.batches_per_epoch} "
                             f"batches an epoch (0..{self.batches_per_epoch - 1})")
        self.order, self._perm_epoch = order, None
        self.epoch, self.batch = epoch, batch
