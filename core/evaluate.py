"""Evaluation at a milestone: N samples from a trial's EMA weights, FID and friends through torch-fidelity, a grid.

evaluate() is collective: every rank calls it. FID's image i has a label drawn once for all N and the seed
image_seed(cfg.seed, i) (sample_plan); the grid's image j a fixed class and the seed image_seed(cfg.seed, j,
GRID_STREAM) (grid_plan). core.sampling makes each image depend on its seed alone, so the images do not depend on
the world size or the batch.
Rank r samples the r-th contiguous slice of the items; the slices are gathered on rank 0 as uint8,
rank 0 runs torch-fidelity and writes the grid, and the result is broadcast to every rank.

draw_grid() is the grid alone (a milestone without FID): also collective, and evaluate() draws its grid
through it, in sampling batches of the grid's own, so a milestone's grid is the same PNG, bit for bit,
whether FID is measured or not. It loads no real images and no feature extractor.

What FID is measured against (core.real_images, core.fid):
- reference: eval.reference (a folder of real images) if given, else the training data (digits:
  all 1500 training images; an image folder: its images, at most reference_samples of them, a
  fixed random subset). Its features are computed once and cached under cache_dir.
  Latents need eval.reference: the real images, not the VAE's reconstructions.
  eval.reference may instead be an .npz of FID statistics (ADM's reference batch): FID is then
  against its mu and sigma, KID and precision / recall against its images (arr_0; none without).
- fid: the N generated images against the reference.
- fid_floor: held-out real images (eval.heldout, or digits' 297 held-out images; min(N, available)
  of them, fid_floor_samples) against the same reference: the FID of real images the model never
  saw, below which differences are noise. FID is biased upwards at small counts, so a floor with
  fewer images than N (digits at N > 297) overstates the floor a little: it is conservative.
"""
import hashlib
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist

from core.fid import FID_NOTES, fid_feature_dim, fidelity, file_digest, resolve_extractor
from core.host_memory import hold_freed_memory
from core.real_images import LATENT_REFERENCE, RealImages, UInt8Images, heldout_images, is_statistics_file, \
    reference_images, statistics_problem, to_uint8
from core.sample_grid import save_grid
from core.sampling import sample

DECODE_BATCH = 32  # VAE decoder activations at 256×256 are large: decode in small batches
GRID_STREAM = 1  # grid images draw their seeds from a stream of their own


@dataclass
class EvalConfig:
    """How a milestone is evaluated; defaults are the study schema's (scaling.study) for the fields a study sets."""

    num_samples: int = 1000  # N generated images (FID-N)
    sampler: str = "ddim"
    num_steps: int = 50
    eta: float = 0.0
    cfg_scale: float = 1.0  # 1.0: no guidance, as in the paper's scaling plots
    guided_channels: int | None = 3  # None: guide every noise channel
    seed: int = 0
    batch_size: int = 256  # per rank, sampling
    feature_extractor: str = "digits"  # "digits" | "inception-v3-compat"
    feature_extractor_weights: str | None = None  # a local weights file; default: shipped / torch-fidelity's cache
    grid_images_per_class: int = 4
    grid_classes: int = 10  # the grid shows the first grid_classes classes
    reference: str | None = None  # a folder of real images for FID, or an .npz of FID statistics (ADM's reference
    # batch); default: the training data (required for latents)
    heldout: str | None = None  # a folder of held-out real images for the noise floor; digits: the held-out split
    cache_dir: str = "~/.cache/dit-scaling/fid"  # real features and statistics
    reference_samples: int = 50_000  # at most this many reference images (a fixed random subset); not for an .npz
    diffusion_steps: int = 1000


#################################################################################
#                          Which images, on which rank                          #
#################################################################################

def image_seed(seed, i, stream=0):
    """The sampling seed of item i (i < 2**31): a function of (seed, stream, i) only, below 2**32.

    CPU generators (mt19937) read only the low 32 bits of a seed, so the evaluation seed is mixed
    into them by a golden-ratio Weyl step: nearby seeds offset the items' seeds by billions, and
    draw unrelated noise.
    """
    return (i + (stream << 31) + seed * 0x9E3779B9) % (1 << 32)


def sample_plan(cfg, num_classes):
    """(labels (N,), seeds [N]) of FID's images: uniform labels; the grid's are grid_plan's."""
    generator = torch.Generator().manual_seed(cfg.seed)
    labels = torch.randint(num_classes, (cfg.num_samples,), generator=generator)  # (N,)
    return labels, [image_seed(cfg.seed, i) for i in range(cfg.num_samples)]


def grid_plan(cfg, grid_classes):
    """(labels (G,), seeds [G]) of the grid: class c grid_images_per_class times for c < grid_classes, row-major,
    seeded from a stream of their own (the same grid for any cfg.num_samples)."""
    per_class = cfg.grid_images_per_class if grid_classes else 0
    labels = torch.arange(grid_classes).repeat_interleave(per_class)  # (G,): class c, per_class times
    return labels, [image_seed(cfg.seed, j, GRID_STREAM) for j in range(len(labels))]


def rank_counts(total, world_size, batch=1):
    """Items per rank: contiguous runs of whole batches of `batch` items, as even as they go.

    Whole batches, so that each sampling batch holds the same items whatever the world size: on a GPU the kernels,
    and so an image's last bits under bf16, may depend on what shares its batch (on CPU they do not).
    """
    batches = torch.arange(-(-total // batch)).tensor_split(world_size)  # batch indices per rank
    return [min(total, (int(b[-1]) + 1) * batch) - int(b[0]) * batch if len(b) else 0 for b in batches]


def rank_slice(total, rank, world_size, batch=1):
    """This rank's item indices (rank_counts')."""
    counts = rank_counts(total, world_size, batch)
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


#################################################################################
#                                   Sampling                                    #
#################################################################################

def _load_vae(path, device):
    """The VAE at path, loaded once while its folder's files stay as they are (a folder replaced in place between
    milestones is loaded again, not decoded with the copy held since the first)."""
    return _load_vae_version(path, device, _folder_version(path))


def _folder_version(path):
    """(name, size, mtime) of each file in a folder: what changes when its files are written again."""
    try:
        return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(path).iterdir()
                            if f.is_file()))
    except OSError:  # missing or unreadable: load_vae names what is wrong
        return ()


@lru_cache(maxsize=1)
def _load_vae_version(path, device, version):
    from core.latents import load_vae

    return load_vae(path, device)


def latent_decoder(meta, vae, device):
    """A function from scaled latents (B, C, h, w) to images (B, 3, H, W) in about [-1, 1], through the VAE.

    meta: the latent folder's meta.json; vae: a diffusers AutoencoderKL, a local folder of one, or
    None for the one the meta names.
    """
    if vae is None or isinstance(vae, (str, bytes)) or hasattr(vae, "__fspath__"):
        vae = _load_vae(str(vae or meta["vae"]), str(device))
    scale = meta["scale_factor"]  # the encode's (core.latents.meta_problem requires it), not the VAE's default

    @torch.no_grad()
    def decode(z):
        images = [vae.decode((part / scale).to(vae.device, vae.dtype)).sample for part in z.split(DECODE_BATCH)]
        return torch.cat(images).float()  # (B, 3, H, W)
    return decode


class NonFiniteSamples(ValueError):
    """Sampling gave NaN or inf: as uint8 they would be black and white pixels, and their FID a number like any."""


def generate(model, cfg, labels, seeds, *, device, decode=None, autocast_dtype=None):
    """uint8 images (n, C, H, W) on the CPU, one per (label, seed), sampled in batches of cfg.batch_size;
    NonFiniteSamples where a sample is not finite."""
    if torch.device(device).type == "cpu":
        hold_freed_memory()  # each sampling step's tensors in pages the last one mapped (core/host_memory.py)
    out = []
    for start in range(0, len(labels), cfg.batch_size):
        y = labels[start:start + cfg.batch_size].to(device)
        x = sample(model, y, seeds[start:start + cfg.batch_size], sampler=cfg.sampler, num_steps=cfg.num_steps,
                   cfg_scale=cfg.cfg_scale, eta=cfg.eta, guided_channels=cfg.guided_channels,
                   diffusion_steps=cfg.diffusion_steps, autocast_dtype=autocast_dtype,
                   clip_denoised=decode is None)  # (B, C, h, w); latents, which decode takes, are not in [-1, 1]
        if decode is not None:
            x = decode(x)  # (B, 3, H, W)
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise NonFiniteSamples(f"{bad} of {x.numel()} values of the samples of classes {y.tolist()[:8]}"
                                   f"{'...' if len(y) > 8 else ''} are not finite (NaN or inf): the sampler "
                                   "overflowed (bf16, a large cfg_scale, EMA weights that diverged); no FID or grid "
                                   "is made of them")
        out.append(to_uint8(x).cpu())
    return torch.cat(out) if out else None


def generate_on_every_rank(model, cfg, labels, seeds, *, device, rank, world_size, decode=None, autocast_dtype=None):
    """generate(), collectively: where one rank fails (its samples not finite, or any error: out of memory, the VAE),
    every rank raises, NonFiniteSamples where that was all (the others would wait for it in the gather that follows,
    until the process group's timeout, half an hour or more)."""
    problem = None
    try:
        images = generate(model, cfg, labels, seeds, device=device, decode=decode, autocast_dtype=autocast_dtype)
    except Exception as err:  # each raised again below, on every rank
        if world_size == 1:
            raise
        images, problem = None, err
    if world_size > 1:
        code = 0 if problem is None else 1 if isinstance(problem, NonFiniteSamples) else 2
        flag = torch.tensor([code], dtype=torch.int32, device=_comm_device(device))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if problem is not None:
            raise problem
        if flag.item() == 1:
            raise NonFiniteSamples(f"the samples of another rank than {rank} are not finite (NaN or inf)")
        if flag.item() == 2:
            raise RuntimeError(f"sampling failed on another rank than {rank} (its error says why)")
    return images


def gather(images, counts, shape, rank, world_size, device, chunk=256):
    """Every rank's uint8 images concatenated on rank 0 in rank order (None elsewhere), chunk by chunk.

    Chunks bound the memory a gather takes (FID-50K at 256×256 is 10 GB); each is padded to the
    same size on every rank, and lives on the GPU under NCCL, which only moves CUDA tensors.
    """
    if world_size == 1:
        return images
    comm_device = _comm_device(device)
    offsets = [sum(counts[:r]) for r in range(world_size)]
    out = torch.empty(sum(counts), *shape, dtype=torch.uint8) if rank == 0 else None
    for start in range(0, max(counts), chunk):
        piece = torch.zeros(chunk, *shape, dtype=torch.uint8, device=comm_device)  # (chunk, C, H, W)
        mine = images[start:start + chunk] if images is not None else piece[:0]
        piece[:len(mine)] = mine.to(comm_device)
        bucket = [torch.empty_like(piece) for _ in range(world_size)] if rank == 0 else None
        dist.gather(piece, bucket, dst=0)
        if rank == 0:
            for r, received in enumerate(bucket):
                n = max(0, min(chunk, counts[r] - start))
                out[offsets[r] + start:offsets[r] + start + n] = received[:n].cpu()
    return out


#################################################################################
#                                  Evaluation                                   #
#################################################################################

def check(cfg, dataset):
    """(torch-fidelity extractor, weights file); raises what would otherwise fail after sampling (call it early)."""
    if cfg.num_samples < 2:
        raise ValueError(f"num_samples must be at least 2 for FID, got {cfg.num_samples}")
    if dataset == "latents" and cfg.reference is None:
        raise ValueError(f"FID on latents needs eval.reference: {LATENT_REFERENCE}")
    extractor, weights = resolve_extractor(cfg.feature_extractor, cfg.feature_extractor_weights)
    if cfg.reference is not None and is_statistics_file(cfg.reference):
        if problem := statistics_problem(cfg.reference, fid_feature_dim(extractor)):
            raise ValueError(f"eval.reference: {problem}")
    return extractor, weights


def evaluate(model, cfg, *, dataset, data_path=None, image_size=None, vae=None, device, rank=0, world_size=1,
             autocast_dtype=None, grid_path=None):
    """FID-N and friends of a model, a grid PNG on rank 0 (draw_grid's); collective, the same dict on every rank."""
    t0 = time.perf_counter()
    device = torch.device(device)
    _check_world(world_size, "evaluate")
    extractor, weights = _checked(cfg, dataset, rank, world_size, device)
    decode, size, shape = _output(model, dataset, data_path, image_size, vae, device)
    grid = draw_grid(model, cfg, dataset=dataset, data_path=data_path, image_size=image_size, vae=vae, device=device,
                     rank=rank, world_size=world_size, autocast_dtype=autocast_dtype, grid_path=grid_path)

    labels, seeds = sample_plan(cfg, model.config["num_classes"])  # (N,)
    mine = rank_slice(len(labels), rank, world_size, cfg.batch_size)
    images = generate_on_every_rank(model, cfg, labels[mine], seeds[mine], device=device, rank=rank,
                                    world_size=world_size, decode=decode, autocast_dtype=autocast_dtype)
    images = gather(images, rank_counts(len(labels), world_size, cfg.batch_size), shape, rank, world_size, device)
    sample_s = time.perf_counter() - t0

    result = None
    if rank == 0:
        try:
            result = {"grid_path": grid["grid_path"],
                      **_score(images, cfg, extractor, weights, dataset, data_path, size, device,
                               decoder_folder(vae, _latent_meta(dataset, data_path)))}
        except Exception as err:
            if world_size > 1:  # the other ranks are waiting for a result: hand them the failure
                _broadcast(RuntimeError(f"evaluation failed on rank 0: {err!r}"), device)
            raise
        result.update(feature_extractor=extractor, fid_note=FID_NOTES.get(extractor), fid_samples=cfg.num_samples,
                      sample_images_per_s=(len(labels) + grid["grid_images"]) / sample_s,
                      eval_time_s=time.perf_counter() - t0)
    if world_size > 1:
        result = _broadcast(result, device)
        if isinstance(result, Exception):
            raise result
    return result


def draw_grid(model, cfg, *, dataset, data_path=None, image_size=None, vae=None, device, rank=0, world_size=1,
              autocast_dtype=None, grid_path=None):
    """The milestone's sample grid alone, a PNG at grid_path written by rank 0; collective (grid_path the same on
    every rank), the same dict on every rank: grid_path (None: no grid), grid_images (how many), eval_time_s and,
    when drawn, sample_images_per_s.

    grid_classes × grid_images_per_class images with grid_plan's labels and seeds, sampled with cfg's sampler
    settings in batches of their own: evaluate() draws its grid here, so the grid is the same with FID or without.
    Nothing of FID is touched (no real images, no feature extractor); nothing is sampled when grid_path is None or
    cfg.grid_images_per_class is 0.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    _check_world(world_size, "draw_grid")
    # Rows: the first cfg.grid_classes of the model's classes.
    grid_classes = min(cfg.grid_classes, model.config["num_classes"]) if cfg.grid_images_per_class else 0
    if not grid_classes or grid_path is None:
        return {"grid_path": None, "grid_images": 0, "eval_time_s": time.perf_counter() - t0}
    decode, _, shape = _output(model, dataset, data_path, image_size, vae, device)
    labels, seeds = grid_plan(cfg, grid_classes)  # (G,)
    mine = rank_slice(len(labels), rank, world_size, cfg.batch_size)
    images = generate_on_every_rank(model, cfg, labels[mine], seeds[mine], device=device, rank=rank,
                                    world_size=world_size, decode=decode, autocast_dtype=autocast_dtype)
    images = gather(images, rank_counts(len(labels), world_size, cfg.batch_size), shape, rank, world_size, device)
    path = None
    if rank == 0:
        try:
            path = str(save_grid(images, cfg.grid_images_per_class, grid_path))
        except Exception as err:
            if world_size > 1:  # the other ranks are waiting for the path: hand them the failure
                _broadcast(RuntimeError(f"writing the sample grid failed on rank 0: {err!r}"), device)
            raise
    if world_size > 1:
        path = _broadcast(path, device)
        if isinstance(path, Exception):
            raise path
    seconds = time.perf_counter() - t0
    return {"grid_path": path, "grid_images": len(labels), "sample_images_per_s": len(labels) / seconds,
            "eval_time_s": seconds}


def _check_world(world_size, caller):
    if world_size > 1 and not dist.is_initialized():
        raise RuntimeError(f"{caller} with world_size {world_size} needs an initialised torch.distributed")


def _output(model, dataset, data_path, image_size, vae, device):
    """(decode, image size, shape (C, H, W) of a generated image): latents are decoded through the VAE."""
    meta = _latent_meta(dataset, data_path)
    decode = latent_decoder(meta, vae, device) if meta is not None else None
    size = _image_size(image_size, model.config["input_size"], meta)
    return decode, size, (3 if decode is not None else model.in_channels, size, size)


def _latent_meta(dataset, data_path):
    """A latent folder's meta.json (core.latents), None for data in pixels."""
    if dataset != "latents":
        return None
    from core.latents import read_meta

    return read_meta(data_path)


def _image_size(image_size, input_size, meta):
    """The side of real and generated images: the encode's for latents, else the data's image_size or the model's."""
    return meta["image_size"] if meta is not None else image_size if image_size is not None else input_size


def _score(images, cfg, extractor, weights, dataset, data_path, size, device, decoder=None):
    """Rank 0: the metrics of the N images, and the noise floor (decoder: the VAE folder the images were decoded by)."""
    cuda = device.type == "cuda"
    common = dict(extractor=extractor, weights=weights, cache_root=cfg.cache_dir, cuda=cuda)
    t0 = time.perf_counter()
    reference, heldout = real_sets(cfg, dataset, data_path, size, fid_feature_dim(extractor))
    out = fidelity(UInt8Images(images), reference, **common)  # (N, C, H, W)
    floor = fidelity(heldout, reference, metrics=("fid",), **common)["fid"] if heldout is not None else None
    # Statistics from a file do not say how many images they summarise: None, not a guess.
    counted = len(reference) if isinstance(reference, RealImages) else None
    out.update(fid_floor=floor, fid_floor_samples=len(heldout) if heldout is not None else 0,
               fid_reference_samples=counted, fid_reference=reference.description,
               fid_basis=fid_basis(reference, heldout, extractor, weights, decoder),
               fid_time_s=time.perf_counter() - t0)
    return out


def real_sets(cfg, dataset, data_path, size, dim=None):
    """(reference, held-out or None): the real images FID and its noise floor are measured against; the reference
    may be FID statistics of dim-d features from a file (core.real_images.ReferenceStatistics)."""
    reference = reference_images(dataset, data_path, size, cfg.reference, cfg.reference_samples, dim)
    return reference, heldout_images(dataset, size, cfg.heldout, max_images=cfg.num_samples)


def fid_basis(reference, heldout, extractor, weights, decoder=None):
    """What FID and its floor were measured against, as JSON (a results row's fid_basis): digests of the reference
    and held-out sets' identities (their files' names, sizes and modification times, or pixels; the subset and image
    size; a statistics file's contents), of the extractor's weights file and, for latents, of the VAE folder that
    decoded the samples (decoder; a VAE given as a module, not a folder, is not recorded). FIDs of two bases are not
    comparable. Not the folders' paths, which trial ids hash already: the same folder through a link, or as another
    node mounts it, is the same basis."""
    def digest(real):
        if real is None:
            return None
        identity = {k: v for k, v in real.identity.items() if k != "path"}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    decoded = {} if decoder is None else {"decoder": folder_digest(decoder)}  # pixels: as before latents had one
    return json.dumps(dict(reference=digest(reference), heldout=digest(heldout), extractor=extractor,
                           weights=file_digest(weights), **decoded), sort_keys=True)


def decoder_folder(vae, meta):
    """The VAE folder latents are decoded by (the one given, else the encode's), None for pixels or a VAE module."""
    if meta is None:
        return None
    vae = vae if vae is not None else meta.get("vae")
    return str(vae) if isinstance(vae, str) or hasattr(vae, "__fspath__") else None


def folder_digest(folder):
    """sha256 of a folder's files, names and contents (not those of its sub-folders): a VAE's config and weights."""
    files = sorted(f for f in Path(folder).iterdir() if f.is_file())
    return hashlib.sha256(json.dumps([(f.name, file_digest(f)) for f in files]).encode()).hexdigest()[:16]


def fid_basis_now(cfg, dataset, data_path=None, image_size=None, input_size=None, vae=None):
    """The fid_basis an evaluation with cfg would measure against now, without a model (input_size: the model's,
    for data in pixels without an image_size; vae: the VAE folder given for latents, else the encode's). Reads what an
    evaluation reads: a reference folder's file list, the VAE's files."""
    extractor, weights = check(cfg, dataset)
    meta = _latent_meta(dataset, data_path)
    size = _image_size(image_size, input_size, meta)
    return fid_basis(*real_sets(cfg, dataset, data_path, size, fid_feature_dim(extractor)), extractor, weights,
                     decoder_folder(vae, meta))


def _checked(cfg, dataset, rank, world_size, device):
    """check() on rank 0 (which alone needs the extractor's weights), its failure raised on every rank."""
    resolved, failure = (None, None), None
    if rank == 0:
        try:
            resolved = check(cfg, dataset)
        except Exception as err:  # any: the other ranks wait for rank 0 in the broadcast below
            failure = err
    if world_size > 1:
        sent = failure if failure is None or isinstance(failure, (OSError, ValueError)) else \
            RuntimeError(f"{type(failure).__name__}: {failure}")  # what any rank can unpickle
        sent = _broadcast(sent, device)
        failure = failure if rank == 0 else sent
    if failure is not None:
        raise failure
    return resolved


def _comm_device(device):
    """Where a collective's tensors go: the GPU under NCCL, which only moves CUDA tensors; else the CPU (gloo)."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _broadcast(obj, device):
    """rank 0's object on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]
