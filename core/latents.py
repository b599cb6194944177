"""Images encoded once by the VAE into latent shards: the encoder (on Ray Data) and the dataset that reads them.

An encoded folder holds shard-00000.safetensors, ... each with `latents` float32 (n, 2, C, h, w)
(the latent of each image and of its mirror image, times the VAE's scale factor), `labels`
int64 (n,) and `indices` int64 (n,) (the image's position in the folder's sorted order), plus a
meta.json written last, so a folder without one is an unfinished encode.
"""
import json
import os
from bisect import bisect_right
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

FORMAT = "dit-scaling-latents/1"
META = "meta.json"
VIEWS = ("image", "hflip")  # the second latent of every image is that of its mirror image


def shard_name(k):
    return f"shard-{k:05d}.safetensors"


#################################################################################
#                            Reading encoded folders                            #
#################################################################################

def read_meta(path, check_shards=False, image_size=None):
    """The meta.json of an encoded folder; with check_shards, also each shard's header against it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"latent folder {path} does not exist")
    meta_file = path / META
    if not meta_file.exists():
        raise FileNotFoundError(f"latent folder {path} has no {META}: "
                                "it is not an encoded folder, or its encode never finished")
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        missing = {"num_images", "classes", "latent_shape", "image_size", "shards"} - meta.keys()
        if missing:
            raise ValueError(f"missing {sorted(missing)}")
        if sum(s["num_images"] for s in meta["shards"]) != meta["num_images"]:
            raise ValueError("shard sizes do not add up to num_images")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{meta_file} is corrupt: {err}") from None
    if image_size is not None and image_size != meta["image_size"]:
        raise ValueError(f"latents in {path} were encoded at image_size {meta['image_size']}, not {image_size}")
    if check_shards:
        for shard in meta["shards"]:
            check_shard(path / shard["file"], shard["num_images"], meta["latent_shape"])
    return meta


def check_shard(file, num_images, latent_shape):
    """Raise unless the shard's header (read without loading the tensors) matches the meta."""
    if not file.exists():
        raise FileNotFoundError(f"latent shard {file} is missing")
    expected = {"latents": [num_images, len(VIEWS), *latent_shape], "labels": [num_images], "indices": [num_images]}
    try:
        with safe_open(file, framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"latent shard {file} is corrupt: {err}") from None
    if shapes != expected:
        raise ValueError(f"latent shard {file} is corrupt: tensors {shapes}, expected {expected}")


def available_memory():
    """Bytes of memory free on this machine (Linux), or None when unknown."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class LatentShards(Dataset):
    """(latent (C, h, w), int64 label) items of an encoded folder: every image twice, as itself and mirrored.

    Item j is view j % 2 of image j // 2, so a training epoch (2N items, in the sampler's random
    order) shows every image once each way: the reference's random horizontal flip, drawn without
    replacement, and a pure function of the sampler's position (exact resume, any world size).
    The held-out split has N items, the images themselves. When the latents fit in memory
    (in_memory=None: at most 1/8 of the free memory, leaving room for the other ranks of the node)
    they are loaded as one tensor and `.tensors` is (X (items, C, h, w), Y (items,)), a view of it;
    otherwise items are read from the memory-mapped shards, shared by a node's ranks through the
    page cache.
    """

    def __init__(self, path, flip=True, in_memory=None):
        self.path, self.views = Path(path), len(VIEWS) if flip else 1
        self.meta = read_meta(path, check_shards=True)
        self.files = [str(self.path / s["file"]) for s in self.meta["shards"]]
        self.starts = np.cumsum([0] + [s["num_images"] for s in self.meta["shards"]]).tolist()
        num_bytes = self.meta["num_images"] * len(VIEWS) * int(np.prod(self.meta["latent_shape"])) * 4
        free = available_memory()
        self.in_memory = in_memory if in_memory is not None else free is None or num_bytes <= free // 8
        self.labels = torch.cat([self._read(f, "labels") for f in self.files])  # (N,)
        self.latents = None
        if self.in_memory:
            self.latents = torch.cat([self._read(f, "latents") for f in self.files])  # (N, 2, C, h, w)
        self._handles = {}

    @staticmethod
    def _read(file, key):
        try:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"latent shard {file} is corrupt: {err}") from None

    @property
    def tensors(self):
        if not self.in_memory:
            raise AttributeError("the latents do not fit in memory: index the dataset instead")
        x = self.latents[:, :self.views].flatten(0, 1)  # (N * views, C, h, w), image-major
        return x, self.labels.repeat_interleave(self.views)

    def __len__(self):
        return self.meta["num_images"] * self.views

    def __getitem__(self, j):
        i, view = divmod(j, self.views)
        if self.in_memory:
            return self.latents[i, view], self.labels[i]
        k = bisect_right(self.starts, i) - 1
        # One handle per shard and process: safe_open maps the file, so reads come from the page cache.
        handle = self._handles.get((os.getpid(), k))
        if handle is None:
            handle = self._handles[(os.getpid(), k)] = safe_open(self.files[k], framework="pt")
        row = i - self.starts[k]
        return handle.get_slice("latents")[row:row + 1, view][0], self.labels[i]


#################################################################################
#                               Encoding a folder                               #
#################################################################################

def image_seed(seed, index, view):
    """The seed of the latent sample of one view of one image: re-runs write identical shards."""
    return (seed * 2**32 + index) * len(VIEWS) + view


@torch.no_grad()
def encode_images(vae, images, indices, seed=0):
    """float32 (N, 3, H, W) in [-1, 1] -> (N, 2, C, H/f, W/f): scaled latent samples of each image and its mirror."""
    x = torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1)  # (2N, 3, H, W): image, mirror, image, ...
    generators = [torch.Generator().manual_seed(image_seed(seed, int(i), view))
                  for i in indices for view in range(len(VIEWS))]  # in the order of x
    dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    z = dist.sample(generator=generators).mul_(vae.config.scaling_factor)  # (2N, C, h, w)
    return z.float().cpu().unflatten(0, (-1, len(VIEWS)))  # (N, 2, C, h, w)


def load_vae(vae_path, device="cpu"):
    """A diffusers AutoencoderKL from a local folder (never downloads)."""
    from diffusers import AutoencoderKL

    if not (Path(vae_path) / "config.json").exists():
        raise FileNotFoundError(f"VAE folder {vae_path} has no config.json "
                                "(a diffusers AutoencoderKL saved with save_pretrained)")
    vae = AutoencoderKL.from_pretrained(str(vae_path), local_files_only=True, low_cpu_mem_usage=False)
    return vae.to(device).eval()


def _load_images(batch, image_size):
    """Ray Data batch function: file paths -> centre-cropped float32 (B, 3, S, S) in [-1, 1]."""
    from torchvision.datasets.folder import default_loader

    from core.data import image_transform

    transform = image_transform(image_size)  # the training transform; the mirror is encoded as view 1
    images = [transform(default_loader(p)).numpy() for p in batch["path"]]
    return {"image": np.stack(images), "label": batch["label"], "index": batch["index"]}


class _Encode:
    """Ray Data actor holding the VAE: images -> latents of each image and its mirror."""

    def __init__(self, vae_path, seed):
        self.vae = load_vae(vae_path, "cuda" if torch.cuda.is_available() else "cpu")
        self.seed = seed

    def __call__(self, batch):
        latents = encode_images(self.vae, torch.from_numpy(batch["image"]), batch["index"], self.seed)
        return {"latents": latents.numpy(), "label": batch["label"], "index": batch["index"]}


def encode_folder(data_path, vae_path, out_dir, image_size, batch_size=64, num_workers=None, shard_size=4096, seed=0):
    """Encode an image folder into latent shards with Ray Data; one VAE per GPU, or per CPU process without GPUs.

    Uses the running Ray instance (or starts a local one). Returns the meta it wrote.
    """
    import ray

    from core.data import scan_image_folder

    classes, samples = scan_image_folder(data_path)
    vae = load_vae(vae_path)  # fail here, not in a Ray worker, on a bad VAE folder
    scale_factor, downsample = vae.config.scaling_factor, 2 ** (len(vae.config.block_out_channels) - 1)
    del vae
    if image_size % downsample:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling factor {downsample}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META).unlink(missing_ok=True)  # from here on the folder is an unfinished encode
    for old in out_dir.glob("shard-*.safetensors"):
        old.unlink()

    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    # Without GPUs, leave a CPU for the tasks that load images.
    workers = num_workers or gpus or max(1, int(resources.get("CPU", 1)) - 1)
    resources_per_worker = dict(num_gpus=1) if gpus else dict(num_cpus=1)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # shards in folder order
    rows = [{"path": p, "label": y, "index": i} for i, (p, y) in enumerate(samples)]
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(_load_images, fn_kwargs=dict(image_size=image_size), batch_size=batch_size)
    ds = ds.map_batches(_Encode, fn_constructor_kwargs=dict(vae_path=str(vae_path), seed=seed), batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(size=workers), **resources_per_worker)

    shards, latent_shape = [], None
    for k, batch in enumerate(ds.iter_batches(batch_size=shard_size, batch_format="numpy")):
        start = k * shard_size
        if not np.array_equal(batch["index"], np.arange(start, start + len(batch["index"]))):
            raise RuntimeError(f"Ray Data returned images out of order in shard {k}")
        latents = torch.from_numpy(batch["latents"].copy())  # (n, 2, C, h, w); Ray's arrays are read-only
        latent_shape = list(latents.shape[2:])
        tmp = out_dir / (shard_name(k) + ".tmp")
        save_file({"latents": latents.contiguous(), "labels": torch.tensor(batch["label"], dtype=torch.int64),
                   "indices": torch.tensor(batch["index"], dtype=torch.int64)}, str(tmp))
        os.replace(tmp, out_dir / shard_name(k))
        shards.append({"file": shard_name(k), "num_images": len(latents)})

    meta = dict(format=FORMAT, num_images=len(samples), classes=classes, latent_shape=latent_shape, views=list(VIEWS),
                scale_factor=scale_factor, vae=str(Path(vae_path).resolve()),
                image_size=image_size, seed=seed, shards=shards)
    tmp = out_dir / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out_dir / META)  # atomic: the folder is finished only once this file exists
    return meta
