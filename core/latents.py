"""Images encoded once by the VAE into latent shards: their format, how a folder of them is written, and the
dataset that reads them (scaling.encode_latents encodes an image folder into one with Ray Data).

An encoded folder holds shard-00000.safetensors, ... each with `latents` float32 (n, 2, C, h, w)
(the latent of each image and of its mirror image, times the VAE's scale factor), `labels`
int64 (n,) and `indices` int64 (n,) (the image's position in the folder's sorted order), plus a
meta.json written last. An encode writes into a new folder beside its target and renames it into place
once complete, so the target is never a half-written encode.
"""
import contextlib
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
import uuid
import warnings
import weakref
from bisect import bisect_right
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from core.data_error import DataError
from core.file_mode import give_new_file_mode
from core.folder_lock import lock_file, lock_folder, remove_lock_file
from core.folder_swap import swap_in_folder

logger = logging.getLogger("core.latents")

FORMAT = "dit-scaling-latents/1"
META = "meta.json"
VIEWS = ("image", "hflip")  # the second latent of every image is that of its mirror image


def shard_name(k):
    return f"shard-{k:05d}.safetensors"


#################################################################################
#                            Reading encoded folders                            #
#################################################################################

def encode_id(meta):
    """An encode's identity: 16 hex digits of sha256 over its parsed meta.json written again as JSON with sorted keys
    (the file's own bytes are not hashed: any layout of the same content is the same encode), which a copy of the
    folder keeps.

    Each encode names the fresh folder it was written in ("encoded_in", since 2026-12-05), so two encodes of one
    folder differ; older encodes are told apart only by their settings (VAE, classes, image count and size).
    """
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def read_meta(path, check_shards=False, image_size=None):
    """The meta.json of an encoded folder; with check_shards, also each shard's header against it.

    FileNotFoundError when the folder or its meta.json is missing, ValueError naming the path when either is
    something else or the meta cannot be used.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"latent folder {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"latent folder {path} is not a folder")
    meta_file = path / META
    if not meta_file.exists():
        raise FileNotFoundError(f"latent folder {path} has no {META}: "
                                "it is not an encoded folder, or its encode never finished")
    if not meta_file.is_file():
        raise ValueError(f"{meta_file} is not a file")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as err:  # not JSON, or not UTF-8
        raise ValueError(f"{meta_file} is corrupt: {err}") from None
    except OSError as err:
        raise ValueError(f"{meta_file} cannot be read: {err}") from None
    problem = meta_problem(meta)
    if problem:
        raise ValueError(f"{meta_file} is corrupt: {problem}")
    if image_size is not None and image_size != meta["image_size"]:
        raise ValueError(f"latents in {path} were encoded at image_size {meta['image_size']}, not {image_size}")
    if check_shards:
        for shard in meta["shards"]:
            check_shard(path / shard["file"], shard["num_images"], meta["latent_shape"])
    return meta


def _whole(value, low=0):
    """An int >= low that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _short(value, limit=60):
    """repr(value), cut short: a message names a value, it does not print a whole list of classes."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def meta_problem(meta):
    """What makes a parsed meta.json unusable, or None: its layout, then a set with no images or classes."""
    if not isinstance(meta, dict):
        kind = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(meta), "null")
        return f"it holds a JSON {kind}, not an object"
    if meta.get("format") != FORMAT:
        return f"format is {meta.get('format')!r}, expected {FORMAT!r}"
    # scale_factor too: without it the decode could only guess between 1 and the VAE's own (0.18215), a 5.5× error.
    missing = {"num_images", "classes", "latent_shape", "image_size", "scale_factor", "shards"} - meta.keys()
    if missing:
        return f"missing {sorted(missing)}"
    fields = {
        "num_images": (_whole, "a whole number >= 0"),
        "classes": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of class names"),
        "latent_shape": (lambda v: isinstance(v, list) and len(v) == 3 and all(_whole(d, 1) for d in v),
                         "3 whole numbers >= 1"),
        "image_size": (lambda v: _whole(v, 1), "a whole number >= 1"),
        "shards": (lambda v: isinstance(v, list), "a list"),
    }
    for key, (ok, kind) in fields.items():
        if not ok(meta[key]):
            return f'"{key}" is {_short(meta[key])}, not {kind}'
    if meta["latent_shape"][1] != meta["latent_shape"][2]:  # a DiT's input is square: it would read the height alone
        return f'"latent_shape" {meta["latent_shape"]} is not square (channels, h, h)'
    scale = meta["scale_factor"]  # the VAE's scaling_factor, which the decode divides by (core.evaluate)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        return f'"scale_factor" is {_short(scale)}, not a number > 0'
    for k, shard in enumerate(meta["shards"]):
        problem = shard_entry_problem(k, shard)
        if problem:
            return problem
    files = [shard["file"] for shard in meta["shards"]]
    twice = next((f for f in files if files.count(f) > 1), None)
    if twice is not None:  # its images would be read twice, another shard's never
        return f"shard file {twice} is listed twice"
    total = sum(shard["num_images"] for shard in meta["shards"])
    if total != meta["num_images"]:
        return f"shard sizes add up to {total}, not num_images {meta['num_images']}"
    if not meta["num_images"]:  # an image folder's encode always has images: this one would train on nothing
        return "it holds no images"
    if not meta["classes"]:
        return "it lists no classes"
    return None


def shard_entry_problem(k, shard):
    """What is wrong with entry k of a meta's shard list, or None."""
    if not isinstance(shard, dict):
        return f"shard {k} is {_short(shard)}, not an object"
    for key in ("file", "num_images"):
        if key not in shard:
            return f'shard {k} has no "{key}"'
    name = shard["file"]
    # A plain name: the folder's own files, never a path that reaches outside it.
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        return f"shard {k}'s file {_short(name)} is not a file name in the folder"
    if not _whole(shard["num_images"]):
        return f"shard {k}'s num_images is {_short(shard['num_images'])}, not a whole number >= 0"
    return None


class CorruptLatents(DataError):
    """A latent shard whose contents are not what an encode writes; the message names the shard."""


def check_shard(file, num_images, latent_shape):
    """Raise unless the shard's header (read without loading the tensors) matches the meta."""
    if not file.exists():
        raise FileNotFoundError(f"latent shard {file} is missing")
    expected = {"latents": ("F32", [num_images, len(VIEWS), *latent_shape]), "labels": ("I64", [num_images]),
                "indices": ("I64", [num_images])}
    try:
        with safe_open(file, framework="pt") as f:
            found = {key: (f.get_slice(key).get_dtype(), f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CorruptLatents(f"latent shard {file} is corrupt: {err}") from None
    if found != expected:  # a float16 shard, say, would fail only at the first step, in the model
        raise CorruptLatents(f"latent shard {file} is corrupt: tensors (dtype, shape) {found}, expected {expected}")


def available_memory(meminfo="/proc/meminfo"):
    """Bytes of memory this process may still take (Linux): the machine's available memory, or less where its control
    group (a container's, a Kubernetes pod's) has less left under its limit; None when unknown."""
    free = _mem_available(meminfo)
    headroom = cgroup_headroom()
    return free if headroom is None or free is None else min(free, headroom)


def _mem_available(meminfo):
    """The kernel's MemAvailable: free memory and the page cache it can reclaim (the free pages alone, sysconf's
    SC_AVPHYS_PAGES, leave out a cache full of an earlier trial's or the encode's reads of these very shards, and a
    node whose cache is full would read from disk for good); the free pages where the kernel gives no estimate."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cgroup_headroom(root="/sys/fs/cgroup", own="/proc/self/cgroup"):
    """The least memory left under the limit of this process's control group and those above it (v2 or v1), None
    when none sets one (or they cannot be read)."""
    try:
        lines = Path(own).read_text().splitlines()
    except OSError:
        return None
    left = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        # A group's usage counts its page cache, which the kernel reclaims before it kills: less its inactive files,
        # as the kubelet's working set does.
        if controllers == "":  # v2: one hierarchy
            files, cache, base = ("memory.max", "memory.current"), "inactive_file", Path(root)
        elif "memory" in controllers.split(","):
            files, cache, base = ("memory.limit_in_bytes", "memory.usage_in_bytes"), "total_inactive_file", \
                Path(root) / "memory"
        else:
            continue
        folder = base / path.lstrip("/")
        for d in (folder, *folder.parents):  # a group's parents limit it too; the root has no limit files
            if not d.is_relative_to(base):
                break
            try:
                limit, used = ((d / name).read_text().strip() for name in files)
                limit, used = int(limit), int(used)
            except (OSError, ValueError):  # no such files there, or "max" (v2's no limit)
                continue
            if limit < 2 ** 62:  # v1's no limit: the largest page-aligned 64-bit value
                left.append(max(limit - max(used - _stat(d / "memory.stat", cache), 0), 0))
    return min(left, default=None)


def _stat(path, key):
    """A control group's memory.stat value of key, 0 where it cannot be read."""
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


class LatentShards(Dataset):
    """(latent (C, h, w), int64 label) items of an encoded folder: every image twice, as itself and mirrored.

    Item j is view j % 2 of image j // 2, so a training epoch (2N items, in the sampler's random
    order) shows every image once each way: the reference's random horizontal flip, drawn without
    replacement, and a pure function of the sampler's position (exact resume, any world size).
    The held-out split has N items, the images themselves. When the latents fit in memory
    (in_memory=None: the copies of all the node's processes that may load them at once, at most 1/8 of the free
    memory; copies: how many those are, None: this run's ranks on the node, LOCAL_WORLD_SIZE)
    they are loaded as one tensor and `.tensors` is (X (items, C, h, w), Y (items,)), a view of it;
    otherwise items are read from the memory-mapped shards, shared by a node's ranks through the
    page cache.
    """

    def __init__(self, path, flip=True, in_memory=None, copies=None):
        self.path, self.views = Path(path), len(VIEWS) if flip else 1
        self.meta = read_meta(path, check_shards=True)
        self.encode = encode_id(self.meta)
        self.files = [str(self.path / s["file"]) for s in self.meta["shards"]]
        # Every shard held open from here, and read through its descriptor (/dev/fd/N, which forked DataLoader
        # workers inherit): an encode swapped into the folder meanwhile (scaling.encode_latents replaces it whole)
        # is not read in part, this encode's files staying readable until the dataset goes.
        self._fds = _open_all(self.files)
        weakref.finalize(self, _close_all, self._fds)
        if encode_id(read_meta(path)) != self.encode:  # swapped in between the meta's read and the shards' opening:
            raise DataError(f"the latents in {path} were encoded again while this process opened them; start it "
                            "again (each encode's id: core.latents.encode_id)")
        self.starts = np.cumsum([0] + [s["num_images"] for s in self.meta["shards"]]).tolist()
        num_bytes = self.meta["num_images"] * len(VIEWS) * int(np.prod(self.meta["latent_shape"])) * 4
        free = available_memory()  # unknown: read from the shards, as a folder too large would be
        # The node's processes decide at once, each seeing the same free memory: together they keep to the eighth.
        # LOCAL_WORLD_SIZE: torch's name for this run's, which torchrun and Ray Train set (a study that packs several
        # trials on a node says how many they are together).
        copies = copies or int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
        self.in_memory = in_memory if in_memory is not None else free is not None and num_bytes * copies <= free // 8
        labels = []
        for k in range(len(self.files)):  # one read of each shard's small tensors
            shard_labels, indices = self._read(k, "labels", "indices")
            labels.append(shard_labels)
            # The shards hold images 0..N-1 in order, as an encode writes them.
            if not torch.equal(indices, torch.arange(self.starts[k], self.starts[k + 1])):
                raise CorruptLatents(f"latent shard {self.files[k]} is corrupt: its indices are not images "
                                     f"{self.starts[k]} to {self.starts[k + 1] - 1} in order, as {META} places it")
        self.labels = torch.cat(labels)  # (N,)
        num_classes = len(self.meta["classes"])
        bad = ((self.labels < 0) | (self.labels >= num_classes)).nonzero().flatten()
        if len(bad):  # the model's label embedding would fail on it mid-training
            i = bad[0].item()
            k = bisect_right(self.starts, i) - 1
            raise CorruptLatents(f"latent shard {self.files[k]} is corrupt: label {self.labels[i].item()} of image "
                                 f"{i - self.starts[k]} is not one of the {num_classes} classes of {META}")
        self.latents = None
        if self.in_memory:
            self.latents = self._load()
            _close_all(self._fds)  # read: no descriptor kept (emptied in place: the finalizer closes what is left)
            self._fds.clear()
        self._handles = {}

    def _load(self):
        """Every shard's latents in one tensor (N, 2, C, h, w), each copied into its place as read: the memory it
        takes is the tensor's and one shard's (a cat of them all took twice the tensor's, the node's ranks at once)."""
        # The shards' headers were checked against the meta (read_meta): float32, these shapes.
        latents = torch.empty((self.starts[-1], len(VIEWS), *self.meta["latent_shape"]), dtype=torch.float32)
        for k in range(len(self.files)):
            (part,) = self._read(k, "latents")  # (n_k, 2, C, h, w)
            finite = torch.isfinite(part).flatten(1).all(1)  # (n_k,)
            if not finite.all():  # trained on, it would read as a run that diverged
                self._not_finite(self.starts[k] + int((~finite).nonzero()[0]))
            latents[self.starts[k]:self.starts[k + 1]] = part
            del part
        return latents

    def __getstate__(self):
        # A process that is not forked (a DataLoader worker started by spawn or forkserver, Python 3.14's default on
        # Linux) inherits no descriptor: the copy it unpickles opens the shards again by name (__setstate__).
        return {**self.__dict__, "_fds": bool(self._fds), "_handles": {}}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fds = _open_all(self.files) if state["_fds"] else []
        weakref.finalize(self, _close_all, self._fds)
        if self._fds and encode_id(read_meta(self.path)) != self.encode:  # the descriptors' point, kept
            raise DataError(f"the latents in {self.path} were encoded again since this run opened them; a process "
                            "that reads them (a DataLoader worker not forked) cannot take another encode's: start "
                            "the run again")

    def _not_finite(self, i):
        k = bisect_right(self.starts, i) - 1
        raise CorruptLatents(f"latent shard {self.files[k]} is corrupt: image {i - self.starts[k]} holds values that "
                             f"are not finite (NaN or inf)")

    def _source(self, k):
        """Shard k as safe_open reads it: through its descriptor where held, else by name."""
        return f"/dev/fd/{self._fds[k]}" if self._fds else self.files[k]

    def _read(self, k, *keys):
        """The tensors named keys of shard k, in one opening of it."""
        try:
            with safe_open(self._source(k), framework="pt") as f:
                return tuple(f.get_tensor(key) for key in keys)
        except (SafetensorError, OSError) as err:
            raise CorruptLatents(f"latent shard {self.files[k]} is corrupt: {err}") from None

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
        row = i - self.starts[k]
        try:
            # One handle per shard and process: safe_open maps the file, so reads come from the page cache.
            handle = self._handles.get((os.getpid(), k))
            if handle is None:
                handle = self._handles[(os.getpid(), k)] = safe_open(self._source(k), framework="pt")
            latent = handle.get_slice("latents")[row:row + 1, view][0]  # (C, h, w)
        except (SafetensorError, OSError) as err:
            raise CorruptLatents(f"latent shard {self.files[k]} is corrupt: {err}") from None
        if not torch.isfinite(latent).all():  # checked as read: a folder too large for memory is not read up front
            self._not_finite(i)
        return latent, self.labels[i]


def _open_all(files):
    """A read-only descriptor per file, where this process may hold them all (its soft limit raised toward the hard
    one as needed, as DataLoader users do: two a shard, with the memory maps, and room for the rest); else none, with
    a warning, and the files are opened by name."""
    need = 2 * len(files) + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            logger.warning("%d latent shards are more than this process may hold open (%d): they are opened by name, "
                           "and an encode swapped into their folder during the run would be read from then on",
                           len(files), hard)
            return []
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return [os.open(f, os.O_RDONLY) for f in files]


def _close_all(fds):
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


#################################################################################
#                               Encoding a folder                               #
#################################################################################

# image_seed keeps 32 bits of the seed: seeds past this one would repeat smaller ones' samples.
MAX_ENCODE_SEED = 2**32 - 1
# What an encode writes into its folder (the .tmp names: of encodes that renamed files in place): a folder holding
# only these may be replaced by a new encode.
LATENT_FILES = (META, META + ".tmp", "shard-*.safetensors", "shard-*.safetensors.tmp")


def image_seed(seed, index, view):
    """The seed (< 2**32) of the latent sample of one view of one image: re-runs write identical shards.

    CPU generators (mt19937) read only the low 32 bits of a seed, which seed * 2**32 left untouched (every seed
    gave seed 0's samples): the seed is mixed into them by a golden-ratio Weyl step, as core.evaluate's sampling
    seeds are. Seed 0 gives the samples it always gave.
    """
    return (index * len(VIEWS) + view + seed * 0x9E3779B9) % 2**32


@torch.no_grad()
def encode_images(vae, images, indices, seed=0):
    """float32 (N, 3, H, W) in [-1, 1] -> (N, 2, C, H/f, W/f): scaled latent samples of each image and its mirror."""
    x = torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1)  # (2N, 3, H, W): image, mirror, image, ...
    generators = [torch.Generator().manual_seed(image_seed(seed, int(i), view))
                  for i in indices for view in range(len(VIEWS))]  # in the order of x
    dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    z = dist.sample(generator=generators).mul_(vae.config.scaling_factor)  # (2N, C, h, w)
    return z.float().cpu().unflatten(0, (-1, len(VIEWS)))  # (N, 2, C, h, w)


class VAEError(ValueError):
    """A VAE folder that cannot be loaded; the message names the folder."""


def one_line(err, limit=300):
    """An exception's message on one line, cut short (a state dict's mismatches run to pages)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."


def load_vae(vae_path, device="cpu"):
    """A diffusers AutoencoderKL from a local folder (never downloads); VAEError names a folder that does not load."""
    from diffusers import AutoencoderKL

    path = Path(vae_path)
    if not path.exists():
        raise VAEError(f"VAE folder {path} does not exist")
    if not path.is_dir():
        raise VAEError(f"VAE folder {path} is not a folder")
    if not (path / "config.json").is_file():
        raise VAEError(f"VAE folder {path} has no config.json (a diffusers AutoencoderKL saved with save_pretrained)")
    kind = _config_class(path / "config.json")
    if kind not in (None, AutoencoderKL.__name__):  # diffusers would build an AutoencoderKL from its config anyway
        raise VAEError(f"VAE folder {path} holds a {kind} (its config.json's _class_name), not an AutoencoderKL")
    try:
        vae, loading = AutoencoderKL.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False,
                                                     output_loading_info=True)
    # diffusers: OSError for a config that is not JSON or weights that are missing or unreadable, RuntimeError for
    # weights of another shape, ValueError or TypeError for a config of another model.
    except (OSError, RuntimeError, ValueError, TypeError) as err:
        raise VAEError(f"VAE folder {path} cannot be loaded: {one_line(err)}") from None
    # Weights the file lacks are left at their random start, with no more than a log line: an encode or an FID
    # would go on with them.
    # The latents are z × scaling_factor, decoded as z / scaling_factor (meta.json's scale_factor): a VAE that also
    # shifts or normalises its latents per channel (SD3's, Flux's, Playground's) would train DiT on latents off
    # centre and off scale, without a word.
    unapplied = {key: vae.config.get(key) for key in ("shift_factor", "latents_mean", "latents_std")
                 if vae.config.get(key) not in (None, 0, 0.0)}
    if unapplied:
        raise VAEError(f"VAE folder {path} sets {', '.join(f'{k} {v}' for k, v in unapplied.items())} in its "
                       "config.json: latents are only scaled (by its scaling_factor) here, as for the paper's "
                       "sd-vae-ft-ema/mse")
    missing = loading["missing_keys"]
    if missing:
        raise VAEError(f"VAE folder {path} holds weights that lack {len(missing)} of its AutoencoderKL's tensors "
                       f"(e.g. {one_line(', '.join(sorted(missing)[:3]), 120)}), which would stay random: they are "
                       "not the weights of its config.json")
    return vae.to(device).eval()


def _config_class(config_file):
    """The _class_name a diffusers config.json records, None when it records none or is not a JSON object."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):  # diffusers' loader names what is wrong with it
        return None
    return config.get("_class_name") if isinstance(config, dict) else None


def vae_fit_problem(vae, meta):
    """Why vae cannot decode the latents a latent folder's meta.json describes (None if it can)."""
    channels, height, width = meta["latent_shape"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # a downsampling between each two encoder blocks
    if vae.config.latent_channels != channels or (height * factor, width * factor) != (meta["image_size"],) * 2:
        return (f"it decodes {vae.config.latent_channels}-channel latents to images {factor}× their side, not the "
                f"{channels}×{height}×{width} latents of {meta['image_size']}-pixel images the data holds")
    # Another latent space of the same shape (SDXL's VAE for SD's latents): the decode divides by the encode's factor,
    # and the images would be noise. A VAE of the same space (sd-vae-ft-mse for sd-vae-ft-ema's) has its factor.
    ours, theirs = vae.config.scaling_factor, meta["scale_factor"]
    if not math.isclose(ours, theirs, rel_tol=1e-6):
        name = vae.config.get("_name_or_path") or "this VAE"
        encoder = meta.get("vae") or "a VAE its meta.json does not name"
        return (f"its scaling_factor is {ours} ({name}), not the scale_factor {theirs} of the VAE the latents were "
                f"encoded with ({encoder}): it belongs to another latent space, and would decode them to noise")
    return None


def encode_option_problem(image_size, batch_size, shard_size, num_workers, seed):
    """(option, value, what it must be) of the first encode option that cannot work, or None."""
    for name, value, low in (("image_size", image_size, 1), ("batch_size", batch_size, 1),
                             ("shard_size", shard_size, 1), ("num_workers", num_workers, 0)):
        if not (name == "num_workers" and value is None) and not _whole(value, low):
            return name, value, f"must be an integer >= {low}"
    if not (_whole(seed) and seed <= MAX_ENCODE_SEED):
        return "seed", seed, f"must be an integer in 0..{MAX_ENCODE_SEED}"
    return None


def _some(names, shown=3):
    """A few of a folder's names, for a message."""
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def out_problem(out):
    """Why an encode may not be written to out, or None: out is absent, an empty folder or a latent folder
    (which the encode replaces), and where it is absent its nearest existing parent is a folder."""
    out = Path(out)
    if not out.exists():
        parent = next(p for p in out.absolute().parents if p.exists())
        if not parent.is_dir():
            return f"{parent} is not a folder"
    else:
        parent = out.absolute().parent
    if not os.access(parent, os.W_OK | os.X_OK):  # the encode is written beside out, then swapped in
        return f"{parent} does not allow writing"
    if not out.exists():
        return None
    if not out.is_dir():
        return f"{out} is not a folder"
    names = sorted(p.name for p in out.iterdir())
    if names and META not in names:
        return (f"{out} is a folder of other files ({_some(names)}) and no {META}: an encode replaces only an empty "
                "folder or a latent folder")
    if names:
        try:
            is_ours = (_meta_object(out) or {}).get("format") == FORMAT
        except OSError:  # a folder named meta.json, say
            is_ours = False
        if not is_ours:
            return f"{out / META} is not the meta.json of a latent folder ({FORMAT}): it is not replaced"
    others = [n for n in names if not any(fnmatch(n, pattern) for pattern in LATENT_FILES)]
    if others:
        return f"{out} holds files that are not latents ({_some(others)})"
    return None


STARTING_ABANDONED_S = 60  # an encode's folder is made and renamed at once: one this old was left by a kill


def _sibling(out, purpose):
    """A new name beside out, hidden, for a folder being written or one being replaced."""
    return out.parent / f".{out.name}.{purpose}-{uuid.uuid4().hex[:8]}"


def encode_lock_path(out):
    """The file beside out whose lock an encode into out holds from its start to its end."""
    return out.parent / f".{out.name}.encode.lock"


def _lock_encodes_into(out):
    """A descriptor holding encode_lock_path(out)'s lock, or None where the storage cannot lock at all; ValueError
    while another encode into out holds it. A file's lock, not a folder's: NFS takes flock only on a file opened for
    writing, where the folders' own locks fail (whether their encodes still run is then unknown)."""
    path = encode_lock_path(out)
    try:
        fd = lock_file(path)
    except PermissionError:  # left by another user's encode, killed (its mode the umask's: not ours to write)
        raise ValueError(f"{out}: its encode lock file {path} is not this user's to open for writing; if no encode "
                         "into it runs now, remove that file") from None
    except OSError as err:
        logger.warning("cannot lock %s (%s): another encode into %s would not be refused", path, err.strerror, out)
        return None
    if fd is None:
        raise ValueError(f"{out}: another encode is writing into it now (it holds {path}); wait for it to end or "
                         "stop it first")
    return fd


def _clear_abandoned_encodes(out, alone=False):
    """Remove the folders that encodes into out, killed before their end, left beside it (an ImageNet encode is
    tens of GB), and earlier encodes they had replaced; refuse while another encode writes one. A live encode holds
    a lock on its folder until it ends; alone: this process holds the encode lock of out (_lock_encodes_into), so
    no other encode into out runs and every unfinished folder beside it is abandoned, lockable or not."""
    prefix = f".{out.name}.encoding-"
    for folder in sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix)):
        if folder.is_symlink() or not folder.is_dir():
            continue
        if (folder / META).exists():
            if _written_elsewhere(folder):  # an earlier encode, exchanged out by one killed before renaming it
                _remove_replaced(folder, out)
                continue
            # Else a finished encode that could not be swapped in, kept for its owner; but under the encode lock,
            # one whose meta.json does not read is no one's: its machine crashed before the file reached the disk.
            if not (alone and _meta_unreadable(folder)):
                if alone:  # no encode of its own runs: it was killed before its swap, or out changed meanwhile
                    logger.warning("kept %s, a finished encode into %s that was never swapped in: rename it to %s to "
                                   "use it, or remove it to free its space", folder, out, out)
                continue
        try:
            lock = lock_folder(folder)  # also under alone: an encode of an earlier version holds no encode lock
        except OSError as err:  # storage that cannot lock a folder (NFS)
            if not alone:  # whether its encode still runs is unknown
                logger.warning("cannot tell whether %s is an abandoned encode (%s); it is left in place",
                               folder, err.strerror)
                continue
            lock = os.open(folder, os.O_RDONLY)  # closed below, as a lock would be
        if lock is None:
            raise ValueError(f"{out}: another encode is writing into it now (in {folder}); wait for it to end or "
                             "stop it first")
        try:
            shutil.rmtree(folder)
        finally:
            os.close(lock)
        logger.warning("removed %s, left by an encode into %s that ended before its last shard", folder, out)
    # An encode killed after swapping its folder in, before removing the one it replaced: nothing writes there.
    for folder in sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.replaced-")):
        if folder.is_dir() and not folder.is_symlink():
            _remove_replaced(folder, out)
    # An encode killed between making its folder and renaming it (microseconds): an empty .starting-* older than a
    # minute is no live encode's. A younger one may be, unless this process holds the encode lock: left (rmdir
    # removes only an empty folder either way).
    for folder in sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.starting-")):
        with contextlib.suppress(OSError):  # gone meanwhile, not empty, not a folder: not ours to remove
            if not folder.is_symlink() and (alone or time.time() - folder.stat().st_mtime > STARTING_ABANDONED_S):
                folder.rmdir()


def _meta_object(folder):
    """A folder's meta.json as a dict, None where it is no JSON object (empty, cut short, a list); OSError where it
    cannot be read."""
    try:
        meta = json.loads((folder / META).read_text())
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def _meta_unreadable(folder):
    """Whether a folder's meta.json is not a JSON object (empty, cut short)."""
    try:
        return _meta_object(folder) is None
    except OSError:  # not ours to judge
        return False


def _written_elsewhere(folder):
    """Whether the latent folder's meta.json names another folder as the one it was encoded in."""
    try:
        written_in = (_meta_object(folder) or {}).get("encoded_in")
    except OSError:  # not ours to judge: kept
        return False
    return isinstance(written_in, str) and written_in != folder.name  # older encodes name none: kept


def _remove_replaced(folder, out):
    """Remove an earlier encode into out that a later one replaced."""
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:  # the encode that replaced it, between its exchange and rename, removes it too
        return
    logger.warning("removed %s, an earlier encode into %s that a later one replaced", folder, out)


def _make_parents(folder):
    """Create folder's missing parents; returns those created, innermost last."""
    missing = [p for p in reversed(folder.absolute().parents) if not p.exists()]
    for p in missing:
        p.mkdir()
    return missing


def _swap_in(new, out):
    """Put the finished folder new at out, replacing a latent folder there (in one step on Linux)."""
    problem = out_problem(out)  # again: files may have been put there while the encode ran
    if problem:
        raise ValueError(f"{out} changed while the encode ran: {problem}; the finished encode is left in {new}")
    old = _sibling(out, "replaced")
    swap_in_folder(new, out, old)
    if os.path.lexists(old):
        try:
            shutil.rmtree(old)
        except OSError as err:  # the new encode is in place: what is left is the old one's space
            warnings.warn(f"the replaced encode {old} could not be removed: {err}")


def write_shard(folder, k, latents, labels, indices):
    """Save shard k of an encode into folder: latents (n, 2, C, h, w), labels (n,), indices (n,); its meta entry."""
    try:
        save_file({"latents": latents.float().contiguous(), "labels": torch.as_tensor(labels, dtype=torch.int64),
                   "indices": torch.as_tensor(indices, dtype=torch.int64)}, str(folder / shard_name(k)))
    except SafetensorError as err:  # its I/O errors (a full disk, a file too large) are no OSError
        raise OSError(f"cannot write {folder / shard_name(k)}: {err}") from None
    give_new_file_mode(folder / shard_name(k))  # safetensors makes it private: an encode is shared by a cluster's users
    return {"file": shard_name(k), "num_images": len(latents)}


def write_latent_folder(out_dir, write_shards, meta):
    """Write an encode at out_dir: write_shards(folder) writes its shards (write_shard) into a new folder beside
    out_dir and returns (their meta entries, the latent shape); meta.json (meta and those) is written last, once it
    and the shards' headers read as a reader checks them, and the folder then replaces out_dir. A failed encode
    (an inconsistent one too) leaves out_dir as it was. Returns the meta written.
    """
    out_dir = Path(out_dir)
    problem = out_problem(out_dir)
    if problem:
        raise ValueError(f"{out_dir}: {problem}")
    out_dir = out_dir.resolve()  # a link to a latent folder: the folder itself is replaced, beside itself
    created = _make_parents(out_dir)
    try:
        encode_lock = _lock_encodes_into(out_dir)  # held to the end, then removed
        try:
            return _write_locked(out_dir, write_shards, meta, alone=encode_lock is not None)
        finally:
            if encode_lock is not None:
                remove_lock_file(encode_lock, encode_lock_path(out_dir))
    except BaseException:
        _remove_made(created)
        raise


def _remove_made(created):
    """Remove the parents an encode made (_make_parents), where nothing else wrote there meanwhile."""
    for parent in reversed(created):
        with contextlib.suppress(OSError):  # something else wrote there meanwhile: it stays
            parent.rmdir()


def _written_problem(folder, meta):
    """What a reader would refuse in an encode just written into folder (its meta, a shard's header), or None."""
    problem = meta_problem(meta)
    if problem:
        return f"its {META} would say: {problem}"
    for shard in meta["shards"]:
        try:
            check_shard(folder / shard["file"], shard["num_images"], meta["latent_shape"])
        except (FileNotFoundError, CorruptLatents) as err:
            return str(err)
    return None


def _write_locked(out_dir, write_shards, meta, alone):
    """write_latent_folder's encode, under the encode lock of out_dir where alone."""
    _clear_abandoned_encodes(out_dir, alone)
    new = _sibling(out_dir, "encoding")
    # Made and locked under a name no clean-up reads, then renamed (the lock is the folder's, not its name's): made
    # as .encoding-* at once, another encode's clean-up could lock it first, take it for abandoned and remove it.
    starting = new.with_name(new.name.replace(".encoding-", ".starting-"))
    with contextlib.ExitStack() as held:  # this encode's lock on new, until it is swapped in or removed
        try:
            starting.mkdir()
            with contextlib.suppress(OSError):  # unlockable storage: this encode is then left to be removed by hand
                lock = lock_folder(starting)  # a later encode knows new is not abandoned
                if lock is not None:  # (a folder just made is locked by no one else: no clean-up reads its name)
                    held.callback(os.close, lock)
            os.rename(starting, new)
            shards, latent_shape = write_shards(new)
            meta = {**meta, "format": FORMAT, "latent_shape": latent_shape, "views": list(VIEWS), "shards": shards,
                    "encoded_in": new.name}  # once swapped out under this name, it says it is the earlier one
            problem = _written_problem(new, meta)
            if problem:  # swapped in, it would replace a usable encode with one no reader takes
                raise RuntimeError(f"the encode into {out_dir} is inconsistent ({problem}); {out_dir} is left as it "
                                   "was")
            # Last, and renamed into place: a folder with a meta.json is complete (one killed while writing it holds
            # meta.json.tmp, and is taken for abandoned and removed by the next encode into out_dir).
            (new / (META + ".tmp")).write_text(json.dumps(meta, indent=1))
            os.replace(new / (META + ".tmp"), new / META)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            shutil.rmtree(starting, ignore_errors=True)
            raise
        _swap_in(new, out_dir)
    return meta
