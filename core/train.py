"""One trial: a DiT trained with DeepSpeed ZeRO by N data-parallel processes, with exact resume.

Runs alone (`python -m core.train ...` or under `torchrun --nproc_per_node N`) and from Ray Train,
where the process group already exists and DeepSpeed reuses it. Evaluation and reporting are
left to callbacks, so core knows nothing of the orchestrator.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from core import checkpoint as ckpt
from core.data import DATASETS, ShardedBatchSampler, build_dataset, data_identity, dataset_info, training_items
from core.data_error import DataError
from core.diffusion import create_diffusion
from core.ema import EMA
from core.flops import gflops_from_config, train_flop_per_image
from core.host_memory import hold_freed_memory
from core.models import DiT, DiT_models, check_shape, model_config
from core.optim import LR_SCHEDULES, build_optimizer, deepspeed_config, lr_lambda
from core.precision import PRECISIONS, autocast_dtype_for, use_precision
from core.writable import write_problem

logger = logging.getLogger("core.train")

# step_seed seeds the generator of step s < SEED_STRIDE with seed * SEED_STRIDE + s, and torch takes seeds up to
# 2**64 - 1: MAX_SEED is the largest seed whose every such step draws (study files share both bounds; it was set when
# every step up to MAX_STEPS was seeded so, and kept).
SEED_STRIDE = 1_000_003
TORCH_MAX_SEED = 2**64 - 1
MAX_STEPS = 10**12  # training steps: int64 step counts and float compute stay exact far below this
MAX_SEED = (TORCH_MAX_SEED - (MAX_STEPS - 1)) // SEED_STRIDE
MAX_DIFFUSION_STEPS = 100_000  # the schedule's arrays are this long (the paper: 1000; 1e11 asked for 745 GiB)
# What a checkpoint keeps of every log (its "history"): a resumed trial can hand them on again.
HISTORY_METRICS = ("step", "train_loss", "lr", "images_per_s", "achieved_tflops", "mfu")


class ConfigError(ValueError):
    """A TrainConfig field outside its range; names the field, so that a command can name its flag instead."""

    def __init__(self, field, value, problem):
        super().__init__(f"{field} {value!r}: {problem}")
        self.field, self.value, self.problem = field, value, problem

    def __reduce__(self):  # pickled as its three fields: Ray hands a worker's error to the driver pickled
        return type(self), (self.field, self.value, self.problem)


def _is_int(value):
    """An int that is not a bool (True would pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value):
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(low, high=None, optional=False):
    """A rule: an int (not a bool) in low..high (or None when optional)."""
    def ok(v):
        return (optional and v is None) or (_is_int(v) and v >= low and (high is None or v <= high))
    return ok, f"must be an integer >= {low}" if high is None else f"must be an integer in {low}..{high}"


def _positive(optional=False):
    """A rule: a finite number > 0 (or None when optional)."""
    return lambda v: (optional and v is None) or (_is_finite(v) and v > 0), "must be a finite number > 0"


def _fraction(v):
    """A finite number in [0, 1)."""
    return _is_finite(v) and 0 <= v < 1


def _one_of(*choices):
    """A rule: one of a few values."""
    return lambda v: v in choices, f"must be one of {', '.join(map(repr, choices))}"


# What a config must hold whatever starts the trial; a trial outside these fails in DeepSpeed, the optimizer or a
# division by zero, after its set-up.
CONFIG_RULES = {
    "model": (lambda v: v in DiT_models, "must be a name in core.models.DiT_models, e.g. 'DiT-XL/2'"),
    "dataset": _one_of(*DATASETS),
    "image_size": _integer(1, optional=True),
    "batch_size": _integer(1),
    "grad_accum": _integer(1),
    "max_steps": _integer(1, MAX_STEPS),
    "lr": _positive(),
    "lr_schedule": _one_of(*LR_SCHEDULES),
    "warmup_steps": _integer(0),
    "betas": (lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_fraction, v)),
              "must be two numbers in [0, 1)"),
    "weight_decay": (lambda v: _is_finite(v) and v >= 0, "must be a finite number >= 0"),
    "grad_clip": _positive(optional=True),
    "ema_decay": (_fraction, "must be a finite number in [0, 1)"),  # 1 would never move the EMA
    "precision": _one_of(*PRECISIONS),
    "zero_stage": _one_of(0, 1, 2, 3),
    "seed": _integer(0, MAX_SEED),
    # The linear schedule's last beta is 20 / diffusion_steps: at 20 steps or fewer the signal is gone before the
    # last step and its x_0 prediction divides by zero.
    "diffusion_steps": _integer(21, MAX_DIFFUSION_STEPS),
    "log_every": _integer(1),
    "ckpt_every": _integer(1),
    "keep_checkpoints": _integer(1),
    "val_batch": _integer(0),
    "peak_tflops": _positive(optional=True),
    "num_workers": _integer(0),
    "data_copies": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                    "must be an integer >= 1, or null"),
}


def check_config(cfg):
    """Raise ConfigError for the first field of cfg outside its range."""
    for name, (ok, problem) in CONFIG_RULES.items():
        value = getattr(cfg, name)
        if not ok(value):
            raise ConfigError(name, value, problem)


@dataclass
class TrainConfig:
    """Everything that determines a trial's training; defaults are the paper's DiT-XL/2 run, but for precision: fp32
    with TF32 off, where the reference trained with TF32 products ("tf32")."""

    model: str = "DiT-XL/2"
    model_overrides: dict = field(default_factory=dict)  # DiT kwargs, e.g. input_size, num_classes
    dataset: str = "latents"
    data_path: str = None
    image_size: int = None
    batch_size: int = 256  # global: micro-batch × grad_accum × world size
    grad_accum: int = 1
    max_steps: int = 400_000
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = None
    ema_decay: float = 0.9999
    precision: str = "fp32"  # fp32, tf32 or bf16 (core/precision.py)
    zero_stage: int = 2
    seed: int = 0
    diffusion_steps: int = 1000
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_checkpoints: int = 2
    val_batch: int = 256  # held-out images in the fixed validation batch; 0 turns it off
    compile: bool = False
    grad_checkpointing: bool = False
    fused_adamw: bool = None  # None: fused AdamW; False: torch's default implementation
    peak_tflops: float = None  # hardware peak per process, for utilisation
    num_workers: int = 4  # data-loading processes for image folders
    data_copies: int = None  # processes of a node that may hold latents in memory at once (None: LOCAL_WORLD_SIZE)

    def __post_init__(self):
        check_config(self)

    def resolved_model_config(self):
        return model_config(self.model, **self.model_overrides)


# What a resumed run must share with its checkpoint's run: what the remaining steps compute. Accumulation, compile,
# data path (data moves) and bookkeeping may change (resume stays exact); so may the world size under ZeRO-0, and the
# ZeRO stage between 1 and 2 (core.checkpoint.load_checkpoint refuses the rest, as DeepSpeed cannot load them);
# max_steps too, under a constant lr, whose steps do not depend on it.
RESUME_SETTINGS = ("dataset", "image_size", "batch_size", "lr", "lr_schedule", "warmup_steps", "betas",
                   "weight_decay", "grad_clip", "ema_decay", "precision", "seed", "diffusion_steps")  # + the model


def _check_resume_settings(path, saved, cfg):
    """Raise CheckpointError when the checkpoint at path was written by a run with other settings than cfg."""
    if saved is None:  # a checkpoint from before the config was kept in it
        return
    now = _jsonable(cfg)
    constant = cfg.lr_schedule == saved.get("lr_schedule") == "constant"
    names = RESUME_SETTINGS + (() if constant else ("max_steps",))
    if cfg.dataset != "imagefolder":  # digits take none; latents are checked against their encode's
        names = tuple(n for n in names if n != "image_size")
    changed = [f"{name} {saved[name]!r} (now {now[name]!r})" for name in names
               if name in saved and saved[name] != now[name]]
    if changed:
        raise ckpt.CheckpointError(f"{path} was written by a run with other settings: {'; '.join(changed)}; resume "
                                   "with its settings, or train this one in another folder")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, step, loss):
        super().__init__(f"training diverged at step {step}: loss {loss}")
        self.step, self.loss = step, loss

    def __reduce__(self):  # as ConfigError's
        return type(self), (self.step, self.loss)


class Callbacks:
    """Hooks the orchestrator fills in; every rank calls each of them at the same steps."""

    def on_log(self, trial, metrics):
        """Every log_every steps and at milestones."""

    def on_milestone(self, trial, metrics):
        """At each evaluation milestone, after the checkpoint is written; returns extra metrics."""
        return {}

    def on_checkpoint(self, trial, path, metrics):
        """After every checkpoint (and after on_milestone at milestones)."""

    def on_resume(self, trial, metrics, history):
        """After a checkpoint is restored, before training goes on; metrics are those it was saved with, history
        its logs so far (step, train_loss, lr, images_per_s, achieved_tflops and mfu where measured), oldest first."""


@dataclass
class TrialState:
    """What callbacks may read: the engine, the EMA model, the process layout, the step."""

    config: TrainConfig
    engine: object
    ema: EMA
    device: torch.device
    rank: int
    world_size: int
    step: int = 0
    model_config: dict = None
    gflops: float = 0.0
    autocast_dtype: torch.dtype = None
    first_step_at: float = None  # wall-clock time this process began its first training step (start-up cost)
    milestones: tuple = ()  # the evaluation steps, max_steps the last
    resumed_train_time_s: float = None  # the training time of the checkpoint a resume restored (None: a fresh start)

    def checkpoints_this_step(self):
        """Whether train() writes a checkpoint after this step: at a milestone, and every ckpt_every steps."""
        return self.step in self.milestones or self.step % self.config.ckpt_every == 0


NVML_CUDA_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def import_deepspeed():
    """Import DeepSpeed, leaving torch's CUDA availability check as it was before, without its autotuner's MLflow.

    DeepSpeed's import sets PYTORCH_NVML_BASED_CUDA_CHECK=1 for the rest of the process, so that the import itself
    creates no CUDA context. Where NVIDIA's driver is absent (a CPU node), every `torch.cuda.is_available()` then
    tries to load NVML again before it falls back: 0.3 ms a call in a trial's process here, and torch's optimizers
    call it every step. Once DeepSpeed is imported, the check is torch's own again: the probes DeepSpeed makes
    later, on first use (its op compatibility), get the same answers, and on a GPU they start CUDA just before
    training does. A value set before (by the user, or inherited from a parent that imported DeepSpeed) stays.

    DeepSpeed's import also imports MLflow where it is installed, for its autotuner to log its experiments (which
    this project never runs): 0.76 of the import's 0.90 s in a fresh process on the AVX-512 EPYC of
    benchmarks/README.md, in every process that trains, none of which has another use for MLflow. Unless MLflow
    is already imported, `import mlflow` fails for the import's duration (a None in sys.modules; in any thread, and no
    trainer's thread imports MLflow), and the autotuner takes its own fallback for a missing MLflow; an `import mlflow`
    after it works as always.
    """
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    before = os.environ.get(NVML_CUDA_CHECK)
    mlflow_absent = "mlflow" not in sys.modules
    if mlflow_absent:
        sys.modules["mlflow"] = None
    try:
        import deepspeed
    finally:  # also after a failed import: DeepSpeed's setdefault runs first
        if before is None:
            os.environ.pop(NVML_CUDA_CHECK, None)
        if mlflow_absent and sys.modules.get("mlflow", False) is None:
            del sys.modules["mlflow"]
    return deepspeed


def setup_distributed():
    """(rank, world size, local rank, device), joining an existing process group or creating one."""
    deepspeed = import_deepspeed()
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    # DeepSpeed's communication backend compiles its shared-memory all-reduce op with the machine's C++
    # compiler when it starts on CPU (about a minute, again for every new environment; a node without a
    # compiler fails there). Only its inference all-reduce uses the op, never training: mark it unavailable.
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    _import_deepspeed_muon_uncompiled()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        # A plain single process (no launcher's RANK, or the group of one an earlier train() here set up and a test
        # destroyed): a group of one on an in-memory store. A free port found and bound again by env:// can be taken
        # by another process in between (EADDRINUSE; see scaling/torch_backend.py).
        if "RANK" not in os.environ or (os.environ.get("WORLD_SIZE") == "1" and "MASTER_ADDR" not in os.environ):
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, local_rank, device


def _import_deepspeed_muon_uncompiled():
    """Import DeepSpeed's Muon optimizer module with TorchDynamo off, so its torch.compile decorators are no-ops.

    ZeRO imports the module in every engine (its optimizer check, its gradient reduction), and the module
    decorates its kernels with torch.compile at import, which imports Inductor's compiler right away whether
    or not anything is ever compiled: 1.4-1.8 s of every trial's start on the 2-core box (benchmarks/README.md).
    This project never builds a Muon optimizer. A model compiled later (TrainConfig.compile) is unaffected:
    TORCHDYNAMO_DISABLE is read only when a function is decorated (torch's own op tests switch it the same way).
    """
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name in sys.modules:
        return
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        importlib.import_module(name)
    except ImportError:  # a DeepSpeed without Muon: nothing to avoid
        pass
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before


def step_seed(seed, step):
    """The generator seed of a training step's draws, one per (seed, step): below SEED_STRIDE steps distinct, past it
    a 64-bit hash (distinct but by chance). A CUDA generator (Philox) takes all 64 bits; torch's CPU generator
    (mt19937) reads the low 32 only, so on CPU distinct streams number 2**32, and two seeds whose products differ by
    a multiple of 2**32 plus less than SEED_STRIDE share their noise at shifted steps: seed 4295's step s draws seed
    0's step 45,589 + s (4295 * SEED_STRIDE is 2**32 + 45,589). Kept so: checkpoints resume with the draws they had."""
    if step < SEED_STRIDE:
        return seed * SEED_STRIDE + step
    # Past SEED_STRIDE steps, seed * SEED_STRIDE + step is seed + 1's step - SEED_STRIDE (the paper's DiT-XL/2 trained
    # 7M steps: the runs of a seed sweep would share their noise), so a 64-bit hash of the pair, as data.epoch_seed
    # does. Below it the product as before: runs of earlier versions draw, and resume, as they did.
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8, person=b"dit-step-noise").digest()
    return int.from_bytes(digest, "little")


def step_randomness(seed, step, batch, shape, num_classes_drop_p, num_timesteps, device):
    """Timesteps, noise and label-drop mask of a whole global batch, a function of (seed, step) only.

    Every rank draws the same global tensors and keeps its slice, so N processes see exactly what
    one process with the same global batch sees, and a resumed run what an uninterrupted one does.
    """
    g = torch.Generator(device).manual_seed(step_seed(seed, step))
    t = torch.randint(0, num_timesteps, (batch,), generator=g, device=device)
    noise = torch.randn((batch, *shape), generator=g, device=device)
    drop = (torch.rand(batch, generator=g, device=device) < num_classes_drop_p).long()
    return t, noise, drop


def fits_on_device(nbytes, device, free_bytes=None):
    """Whether a dataset of nbytes may live on the training device: always on a CPU; on a GPU when it takes at
    most a sixteenth of the memory still free (free_bytes, default: the device's), the rest being activations'."""
    if device.type != "cuda":
        return True
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free_bytes // 16


class BatchSource:
    """This rank's images and labels of each global batch, from memory or a DataLoader.

    An in-memory dataset (`.tensors`) is moved to the device once when it fits there (the digits), else it
    stays in host memory and each batch is copied over (in-memory ImageNet latents are tens of GB: they fit a
    node's RAM, which is what LatentShards checks, not a GPU's memory).
    """

    def __init__(self, dataset, sampler, device, num_workers, resident=None):
        self.sampler, self.device = sampler, device
        self.tensors = getattr(dataset, "tensors", None)
        if self.tensors is not None:
            nbytes = sum(t.nbytes for t in self.tensors)
            self.resident = fits_on_device(nbytes, device) if resident is None else resident
            if self.resident:
                self.tensors = tuple(t.to(device) for t in self.tensors)
        else:
            self.dataset, self.num_workers = dataset, num_workers

    def __iter__(self):
        if self.tensors is not None:
            x_all, y_all = self.tensors
            pin = self.device.type == "cuda"
            for idx in self.sampler:
                if self.resident:
                    idx = torch.as_tensor(idx, device=self.device)
                    yield x_all[idx], y_all[idx]
                else:
                    x, y = x_all[torch.as_tensor(idx)], y_all[torch.as_tensor(idx)]
                    if pin:  # a page-locked batch copies asynchronously
                        x, y = x.pin_memory(), y.pin_memory()
                    yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        else:
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.num_workers,
                                                 pin_memory=self.device.type == "cuda", persistent_workers=False)
            for x, y in loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


VALIDATION_SEED = 20_231_219


def validation_indices(dataset_name, num_items, n):
    """The items of a dataset's held-out split that the validation loss is measured on.

    Digits' held-out split is images that training never sees: its first n. An image folder's or a latent set's
    is their training images, unflipped (no held-out data comes with them): n of them drawn at a fixed seed, so
    that they spread over the classes (the first n of a folder sorted by class would be one class).
    """
    n = min(n, num_items)
    if dataset_name == "digits":
        return list(range(n))
    drawn = torch.randperm(num_items, generator=torch.Generator().manual_seed(VALIDATION_SEED))[:n]
    return sorted(drawn.tolist())  # in file order: memory-mapped shards are read front to back


class ValidationBatch:
    """A fixed batch of images (see validation_indices) with fixed timesteps and noise: a loss comparable
    across models and steps."""

    def __init__(self, cfg, rank, world, device, num_timesteps):
        # A latent set is read item by item from its memory-mapped shards here, not loaded whole a second time.
        opts = {"in_memory": False} if cfg.dataset == "latents" else {}
        dataset = build_dataset(cfg.dataset, split="heldout", path=cfg.data_path, image_size=cfg.image_size, **opts)
        items = [dataset[i] for i in validation_indices(cfg.dataset, len(dataset), cfg.val_batch)]
        n = len(items)
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
        g = torch.Generator().manual_seed(VALIDATION_SEED)
        # Timesteps evenly spread over the chain: every noise level weighs the same in every evaluation.
        t = torch.linspace(0, num_timesteps - 1, n).round().long()
        noise = torch.randn(x.shape, generator=g)
        lo, hi = rank * n // world, (rank + 1) * n // world
        self.n = n
        # A rank with no image of a batch smaller than the world still runs the model, on the batch's first image,
        # and counts nothing: under ZeRO-3 every forward gathers weights collectively, and a rank skipping it would
        # leave the others waiting forever.
        self.counted = hi > lo
        lo, hi = (lo, hi) if self.counted else (0, 1)
        self.x, self.y, self.t, self.noise = (v[lo:hi].to(device) for v in (x, y, t, noise))

    @torch.no_grad()
    def loss(self, model, diffusion, autocast_dtype):
        """(mean loss, mean mse) over the whole batch, summed across ranks. Collective."""
        sums = torch.zeros(2, device=self.x.device, dtype=torch.float64)
        # In eval mode: a training-mode DiT swaps labels for the null class at random, from the global
        # generator, which would make the loss depend on what drew from it before (and on the rank).
        was_training = model.training
        model.eval()
        try:
            with torch.autocast(self.x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                terms = diffusion.training_losses(model, self.x, self.t, dict(y=self.y), noise=self.noise)
        finally:
            model.train(was_training)
        if self.counted:
            sums += torch.stack([terms["loss"].double().sum(), terms["mse"].double().sum()])
        if dist.is_initialized():
            dist.all_reduce(sums)
        return (sums / self.n).tolist()


def ranks_spread(value, device):
    """(lowest, highest) of an integer over the ranks, the same on every rank (a collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value, value
    t = torch.tensor([value, -value], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return -int(t[1]), int(t[0])


def check_ranks_resume_alike(step, checkpoint_dir, device):
    """CheckpointError on every rank where the ranks resume from different steps (-1: a fresh start). Each rank
    chooses "auto"'s newest checkpoint itself: on a folder that the nodes do not see alike (node-local, or a network
    file system whose listings lag) they would train on from different weights and optimizer shards, unnoticed."""
    lowest, highest = ranks_spread(step, device)
    if highest != lowest:
        def start(s):
            return "a fresh start" if s < 0 else f"step {s}"
        raise ckpt.CheckpointError(f"the processes resume from different checkpoints ({start(lowest)} to "
                                   f"{start(highest)}) under {checkpoint_dir}: every node must see the same "
                                   "checkpoints there (a shared folder; give the checkpoint's path to resume from)")


SHARED_CHECK_WAIT_S = 5.0  # how long a rank looks for rank 0's marker: a network file system may show it late


def check_folder_shared(checkpoint_dir, rank, device, wait_s=SHARED_CHECK_WAIT_S):
    """CheckpointError on every rank when checkpoint_dir, which torchrun's ranks share (rank 0 renames each
    checkpoint into place, the others' optimizer shards with it), is not one folder on every node: a node-local
    folder would leave the other nodes' shards in temporary folders, unpruned, and nothing to resume from."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = Path(checkpoint_dir) / f".shared-check-{token[0]}"
    problem = None
    try:
        # Every rank creates the folder: on NFS a rank that looked for it before (a resume's search) would trust its
        # cached "no such folder" for up to a minute; a create asks the server.
        marker.parent.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            marker.touch()
    except OSError as err:
        problem = err
    _, failed = ranks_spread(int(problem is not None), device)  # also the barrier: rank 0's marker is written
    if failed:
        raise ckpt.CheckpointError(f"{checkpoint_dir} cannot be written"
                                   + (f": {problem.strerror or problem}" if problem else " by another process"))
    deadline = time.monotonic() + wait_s
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    missing, _ = ranks_spread(0 if marker.exists() else -1, device)  # also the barrier: every rank has looked
    if rank == 0:
        marker.unlink(missing_ok=True)
    dist.barrier()  # and it is gone before any rank goes on
    if missing < 0:
        raise ckpt.CheckpointError(f"{checkpoint_dir} is not one folder shared by every process: some do not see "
                                   "what rank 0 writes there (a folder on each node's own disk?); the checkpoints of "
                                   "a run of several nodes go to a folder every node sees")


def _global_mean(value, device):
    """Mean of a scalar over ranks (a collective: also the divergence check's agreement)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value  # alone: nothing to agree with (gloo's all-reduce would still cost 0.2 ms a step)
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return t.item()


def train(cfg, out_dir, milestones=(), callbacks=None, resume_from=None, checkpoint_dir=None,
          shared_checkpoint_dir=True, durable_checkpoints=True):
    """Train one trial to cfg.max_steps; returns the last metrics (a resume of a finished run, which takes no step:
    those its checkpoint was saved with, as on_resume has them). Every rank calls it.

    resume_from: a checkpoint directory, "auto" (the newest under checkpoint_dir, else a fresh
    start) or None. A checkpoint that cannot be used raises CheckpointError, never a fresh start.
    shared_checkpoint_dir: whether all ranks write into one checkpoint_dir (torchrun) or each into
    its own (Ray workers, whose per-rank files Ray merges); decides who prunes old checkpoints.
    durable_checkpoints=False: checkpoint_dir is scratch whose copy the callbacks make durable (Ray's).
    """
    # ZeRO's optimizer is held by the gradient hooks it puts on the weights (DeepSpeed #5496): the engine, its weights,
    # gradients and optimizer states outlived a run for good in a process that goes on (a benchmark's next
    # configuration, whose peak GPU memory included them; a test session). destroy() removes the hooks, however the
    # run ends.
    engines = []
    try:
        metrics = _train(cfg, out_dir, milestones, callbacks, resume_from, checkpoint_dir, shared_checkpoint_dir,
                         durable_checkpoints, engines)
    except BaseException:
        for engine in engines:
            with contextlib.suppress(Exception):  # the error in flight is the one to report
                engine.destroy()
        raise
    for engine in engines:
        engine.destroy()
    return metrics


def _train(cfg, out_dir, milestones, callbacks, resume_from, checkpoint_dir, shared_checkpoint_dir, durable_checkpoints,
           engines):
    """train()'s run; the DeepSpeed engine it makes is appended to engines."""
    callbacks = callbacks or Callbacks()
    out_dir = Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoints"
    milestones = sorted({int(m) for m in milestones} | {cfg.max_steps})
    if milestones[0] <= 0 or milestones[-1] > cfg.max_steps:
        raise ValueError(f"milestones must lie in 1..max_steps ({cfg.max_steps}), got {milestones}")
    mcfg = cfg.resolved_model_config()
    saved, refused, refused_at = None, None, checkpoint_dir
    # A missing, corrupt or foreign checkpoint fails before the model and data are set up, on every rank together
    # (refuse_on_every_rank): each rank lists and reads the folder itself, and the nodes may not see it alike.
    try:
        if resume_from == "auto":
            resume_from = ckpt.latest_checkpoint(checkpoint_dir)
        if resume_from is None:
            problem = ckpt.fresh_start_problem(checkpoint_dir)
            if problem:
                raise ckpt.CheckpointError(problem)
        else:
            refused_at = resume_from
            saved = ckpt.check_checkpoint(resume_from, mcfg)
            _check_resume_settings(resume_from, saved.get("config"), cfg)
    except ckpt.CheckpointError as err:
        refused = err

    deepspeed = import_deepspeed()
    rank, world, _, device = setup_distributed()
    refuse_on_every_rank(refused, refused_at, device)
    use_precision(cfg.precision)
    if shared_checkpoint_dir:
        check_folder_shared(checkpoint_dir, rank, device)
    check_ranks_resume_alike(saved["step"] if saved else -1, checkpoint_dir, device)
    if device.type == "cpu":
        hold_freed_memory()  # each step's tensors in pages the last step mapped (core/host_memory.py)
    if cfg.batch_size % (cfg.grad_accum * world):
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by grad_accum {cfg.grad_accum} × "
                         f"{world} processes")
    micro = cfg.batch_size // (cfg.grad_accum * world)
    g_per_image = gflops_from_config(**mcfg)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = DiT(**mcfg)
    model.gradient_checkpointing = cfg.grad_checkpointing
    ema = EMA(model.to(device), cfg.ema_decay)
    optimizer = build_optimizer(model, cfg.lr, cfg.betas, cfg.weight_decay, cfg.fused_adamw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps,
                                                                        cfg.max_steps))
    ds_config = deepspeed_config(cfg.batch_size, micro, cfg.grad_accum, cfg.zero_stage, cfg.precision, cfg.grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    engines.append(engine)
    ema.follow_masters(engine.optimizer)  # under bf16, the fp32 weights it steps, not the bf16 module's rounding
    if world == 1 and cfg.zero_stage == 0:
        # One process: the gradient all-reduce would average each gradient with itself (DeepSpeed
        # skips it the same way when it has no communication backend). Stages 1-3 reduce into
        # their partitions there, so they keep it.
        engine.enable_backward_allreduce = False
    if cfg.compile:
        engine.compile()
    autocast_dtype = autocast_dtype_for(cfg.precision)
    params = list(engine.module.parameters())  # in the EMA's order

    diffusion = create_diffusion(learn_sigma=mcfg["learn_sigma"], diffusion_steps=cfg.diffusion_steps)
    copies = {"copies": cfg.data_copies} if cfg.dataset == "latents" else {}
    dataset = build_dataset(cfg.dataset, split="train", path=cfg.data_path, image_size=cfg.image_size, **copies)
    data_encode = getattr(dataset, "encode", None)  # latents: which encode of the folder (core.latents.encode_id)
    fewest, most = ranks_spread(len(dataset), device)
    if fewest != most:  # each rank's sampler permutes its own count: the global batch would repeat and skip items
        raise DataError(f"the processes see {cfg.dataset} data of different sizes ({fewest} to {most} items) at "
                        f"{cfg.data_path}: every node must see the same data (one shared folder, or identical copies)")
    identity = data_identity(dataset)
    lowest, highest = ranks_spread(identity, device)
    if lowest != highest:  # as many items, other ones: each rank's share of a batch would come from other data
        raise DataError(f"the processes see different {cfg.dataset} data at {cfg.data_path} (as many items, other "
                        f"{'encodes' if cfg.dataset == 'latents' else 'files'}): every node must see the same data "
                        "(one shared folder, or identical copies)")
    # Below, every rank alike: they see the same data (above; a latent set's identity is its encode) and resume from
    # the same step (check_ranks_resume_alike).
    earlier = (saved or {}).get("data_encode")  # None: not latents, or a checkpoint older than the record
    if None not in (earlier, data_encode) and earlier != data_encode:
        # The same path encoded again (another VAE, more images): the data position and the weights are another data's.
        raise UnloadableCheckpoint(f"{resume_from} was written training on another encode of the latents in "
                                   f"{cfg.data_path} ({earlier}, now {data_encode}); resume on that encode, or train "
                                   "this one in another folder")
    earlier = (saved or {}).get("data_identity")  # None: a checkpoint older than the record
    if cfg.dataset == "imagefolder" and earlier is not None and earlier != identity:
        # Its path may change (data moves), its count alike: other files, or class folders renamed (their labels in
        # sorted order), would train on from weights and a data position of other data, conditioned on other labels.
        raise UnloadableCheckpoint(f"{resume_from} was written training on other files or labels than the image "
                                   f"folder {cfg.data_path} holds now; resume on those, or train this one in another "
                                   "folder")
    sampler = ShardedBatchSampler(len(dataset), cfg.batch_size, rank, world, cfg.seed)
    validation = ValidationBatch(cfg, rank, world, device, cfg.diffusion_steps) if cfg.val_batch else None
    shape = (mcfg["in_channels"], mcfg["input_size"], mcfg["input_size"])

    trial = TrialState(cfg, engine, ema, device, rank, world, 0, mcfg, g_per_image, autocast_dtype,
                       milestones=tuple(milestones))
    step, train_time, history = 0, 0.0, []
    window_loss, window_steps, window_time = 0.0, 0, 0.0  # the steps since the last log, which it averages
    if resume_from is not None:
        state = _load_on_every_rank(resume_from, engine, ema, mcfg, world, cfg.zero_stage, rank, device, sampler)
        step, train_time, history = state["step"], state["train_time_s"], state.get("history", [])
        # A checkpoint between two logs holds the steps since the last one: the next log after a resume averages
        # the same steps as it would have without one (train_loss bitwise the same).
        window = state.get("log_window", {})  # none in checkpoints written before it was kept
        window_loss, window_steps, window_time = (window.get(k, 0) for k in ("loss", "steps", "time_s"))
        logger.info("resumed from %s at step %d", resume_from, step)
    trial.step = step
    if resume_from is not None:
        trial.resumed_train_time_s = train_time
        resumed = dict(state.get("metrics", {}))
        if resumed.get("step", step) != step:
            # A checkpoint between two logs holds the last log's metrics (and an earlier milestone's validation, if
            # one came since): none is this step's but its time; a milestone's row leaves the others empty.
            resumed = {"step": step, "train_time_s": train_time}
        if step in milestones and validation is not None and "val_loss" not in resumed:
            # A milestone added at a checkpoint that was none of the run's (ckpt_every's): the validation a milestone
            # checkpoint holds is measured now, from the weights it would have been measured on.
            resumed["val_loss"], resumed["val_mse"] = validation.loss(engine.module, diffusion, autocast_dtype)
            resumed["val_loss_ema"], _ = validation.loss(ema.model, diffusion, autocast_dtype)
        callbacks.on_resume(trial, resumed, [dict(h) for h in history])
        # After on_resume, which may say more (a study's trial past a milestone it did not measure): the loop would
        # take no step, and the run would end as if it were done, at the later checkpoint's weights.
        if step > cfg.max_steps:  # every rank alike: they resume from one step
            raise UnloadableCheckpoint(f"{resume_from} is at step {step}, past max_steps {cfg.max_steps}: resume from "
                                       f"a checkpoint at or before step {cfg.max_steps}, or train to {step} steps or "
                                       "more")

    lo = rank * (cfg.batch_size // world)
    batches = iter(BatchSource(dataset, sampler, device, cfg.num_workers))
    metrics = {}
    engine.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        if trial.first_step_at is None:
            trial.first_step_at = time.time()
        x, y = next(batches)  # this rank's share of the global batch
        t_all, noise_all, drop_all = step_randomness(cfg.seed, step, cfg.batch_size, shape,
                                                     mcfg["class_dropout_prob"], cfg.diffusion_steps, device)
        step_lr = scheduler.get_last_lr()[0]  # this step's: the scheduler moves on with the update
        step_loss = torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            mb = slice(m * micro, (m + 1) * micro)
            gb = slice(lo + m * micro, lo + (m + 1) * micro)
            kwargs = dict(y=y[mb], force_drop_ids=drop_all[gb])
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = diffusion.training_losses(engine, x[mb], t_all[gb], kwargs, noise=noise_all[gb])["loss"].mean()
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach() / cfg.grad_accum
        step += 1
        trial.step = step
        ema.update(params)  # ZeRO-3: each rank its partition's fp32 masters, with no gather
        loss_value = _global_mean(step_loss.item(), device)  # collective: every rank agrees on divergence
        if not math.isfinite(loss_value):
            raise TrainingDiverged(step, loss_value)
        dt = time.perf_counter() - t0
        train_time += dt
        window_loss, window_steps, window_time = window_loss + loss_value, window_steps + 1, window_time + dt

        at_milestone = step in milestones
        if step % cfg.log_every == 0 or at_milestone:
            images_per_s = window_steps * cfg.batch_size / window_time
            flops = images_per_s * train_flop_per_image(g_per_image)
            metrics = {
                "step": step, "train_loss": window_loss / window_steps, "lr": step_lr,
                "images_per_s": images_per_s, "achieved_tflops": flops / 1e12, "train_time_s": train_time,
            }
            if cfg.peak_tflops:
                metrics["mfu"] = flops / 1e12 / (cfg.peak_tflops * world)
            history.append({k: metrics[k] for k in HISTORY_METRICS if k in metrics})
            window_loss, window_steps, window_time = 0.0, 0, 0.0
            callbacks.on_log(trial, metrics)
        if trial.checkpoints_this_step():
            ema.synchronize(params)  # every rank's part of it, before validation, sampling and the checkpoint
            if at_milestone and validation is not None:
                metrics["val_loss"], metrics["val_mse"] = validation.loss(engine.module, diffusion, autocast_dtype)
                metrics["val_loss_ema"], _ = validation.loss(ema.model, diffusion, autocast_dtype)
            state = {
                "step": step, "train_time_s": train_time, "sampler": _sampler_position(sampler, step), "model_config": mcfg,
                "world_size": world, "zero_stage": cfg.zero_stage, "config": _jsonable(cfg), "history": history,
                "data_encode": data_encode, "data_identity": identity,
                "metrics": metrics, "log_window": {"loss": window_loss, "steps": window_steps, "time_s": window_time},
            }
            path = ckpt.save_checkpoint(checkpoint_dir, engine, ema, state, rank, shared_checkpoint_dir,
                                        durable_checkpoints)
            if at_milestone:
                metrics.update(callbacks.on_milestone(trial, dict(metrics)) or {})
            # Under this step: the metrics may be those of an earlier log step, or none yet.
            callbacks.on_checkpoint(trial, path, {**metrics, "step": step})
            if rank == 0 or not shared_checkpoint_dir:  # only rank 0 writes the trainer state that marks a checkpoint
                ckpt.prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints, marked=rank == 0)
    if resume_from is not None and not metrics:  # a finished run resumed: it took no step (the last one logs)
        return resumed
    return metrics


class UnloadableCheckpoint(ckpt.CheckpointError):
    """A checkpoint a run cannot resume from (it does not load, or is another model's, settings' or data's, or past
    its max_steps), raised on every rank together (refuse_on_every_rank, or where every rank decides alike): a retry
    finds the same."""


def refuse_on_every_rank(problem, path, device):
    """Raise UnloadableCheckpoint on every rank where any rank has a CheckpointError (problem, else None) with the
    checkpoint at path: raised on one rank alone, it would stop that rank while the others wait in their next
    collective, and a launcher's retry would meet the same files. A collective every rank calls."""
    _, failed = ranks_spread(int(problem is not None), device)
    if problem is not None:
        raise UnloadableCheckpoint(str(problem)) from problem
    if failed:
        raise UnloadableCheckpoint(f"{path} cannot be resumed from by another process (its error names the file)")


def _load_on_every_rank(path, engine, ema, model_config, world, zero_stage, rank, device, sampler):
    """ckpt.load_checkpoint and the sampler's data position, a CheckpointError raised on every rank (as
    UnloadableCheckpoint): a file of one rank's own (its ZeRO-3 module states, its optimizer shard, its RNG state)
    missing or damaged would stop that rank alone, the others waiting in DeepSpeed's loader or the first step's
    collectives."""
    def agree(problem):  # before DeepSpeed's loader, whose ZeRO-3 all-gather a stopped rank would never join
        refuse_on_every_rank(problem, path, device)

    try:
        state = ckpt.load_checkpoint(path, engine, ema, model_config, world, zero_stage, rank, agree)
        _restore_sampler(sampler, state["sampler"], state["step"], path)
        problem = None
    except UnloadableCheckpoint:  # agree's: every rank raised it together
        raise
    except ckpt.CheckpointError as err:
        state, problem = None, err
    refuse_on_every_rank(problem, path, device)
    return state


def _restore_sampler(sampler, state, step, checkpoint):
    """Move the sampler to a checkpoint's data position, the one after `step` batches; CheckpointError when it
    ordered other data."""
    try:
        sampler.load_state_dict(state)
    except ValueError as e:  # another batch size, seed or dataset size: its position means nothing here
        raise ckpt.CheckpointError(f"{Path(checkpoint) / ckpt.STATE_FILE} does not match this run's data: {e}") from None
    # The position a save records (_sampler_position) is the step's, and the step is checked against the engine's
    # (trainer_state.json, which holds both, has no checksum: it is rewritten as a run's history grows): a position
    # edited or damaged within range resumed on other batches, the run no longer the straight one.
    sampler.epoch, sampler.batch = divmod(step, sampler.batches_per_epoch)


def _sampler_position(sampler, step):
    """The sampler state after `step` consumed batches (a DataLoader's prefetching runs ahead of it)."""
    epoch, batch = divmod(step, sampler.batches_per_epoch)
    return {**sampler.state_dict(), "epoch": epoch, "batch": batch}


def _jsonable(cfg):
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


#################################################################################
#                          Standalone entry point                               #
#################################################################################

class PrintingCallbacks(Callbacks):
    """Log lines like the reference train.py, on rank 0 only."""

    def on_log(self, trial, metrics):
        if trial.rank == 0:
            logger.info("(step=%07d) train loss %.4f, %.1f images/s, %.2f TFLOP/s", metrics["step"],
                        metrics["train_loss"], metrics["images_per_s"], metrics["achieved_tflops"])

    def on_checkpoint(self, trial, path, metrics):
        if trial.rank == 0:
            extra = f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
            logger.info("saved checkpoint %s%s", path, extra)


def parse_milestones(text, max_steps):
    """"400,800" -> [400, 800]; ValueError naming --milestones otherwise."""
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--milestones {text}: not comma-separated step numbers") from None
    if any(not 0 < s <= max_steps for s in steps):
        raise ValueError(f"--milestones {text}: steps must lie in 1..--max-steps ({max_steps})")
    return steps


# The flags that set TrainConfig fields, where the two names differ: errors name what the user typed.
FLAGS = {"batch_size": "--global-batch-size", "seed": "--global-seed"}


def flag(field):
    """The `python -m core.train` flag that sets a TrainConfig field."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


# DiT constructor arguments a run may set instead of its preset's (a study's train fields of the same names).
MODEL_FLAGS = {
    "class_dropout_prob": (_fraction, "must be a finite number in [0, 1)"),
    "learn_sigma": (lambda v: isinstance(v, bool), "must be true or false"),
    "hidden_size": _integer(1), "depth": _integer(1), "num_heads": _integer(1),
    "mlp_ratio": _positive(),
}


def config_from_arguments(args):
    """The TrainConfig of parsed arguments; ValueError naming the flag of a value outside its range."""
    overrides = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None}
    for name, value in overrides.items():
        ok, problem = MODEL_FLAGS[name]
        if not ok(value):
            raise ValueError(f"{flag(name)} {value}: {problem}")
    try:
        return TrainConfig(
            model=args.model, model_overrides=overrides, dataset=args.dataset, data_path=args.data_path,
            image_size=args.image_size, batch_size=args.global_batch_size, grad_accum=args.grad_accum,
            max_steps=args.max_steps, lr=args.lr, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
            betas=tuple(args.betas), weight_decay=args.weight_decay, grad_clip=args.grad_clip,
            ema_decay=args.ema_decay, precision=args.precision, zero_stage=args.zero_stage, seed=args.global_seed,
            diffusion_steps=args.diffusion_steps, log_every=args.log_every, ckpt_every=args.ckpt_every,
            keep_checkpoints=args.keep_checkpoints, val_batch=args.val_batch, num_workers=args.num_workers,
            compile=args.compile, grad_checkpointing=args.grad_checkpointing, fused_adamw=args.fused_adamw,
            peak_tflops=args.peak_tflops,
        )
    except ConfigError as e:
        value = " ".join(map(str, e.value)) if isinstance(e.value, tuple) else e.value
        raise ValueError(f"{flag(e.field)} {value}: {e.problem}") from None


def check_arguments(cfg, world_size=1):
    """cfg with its model shaped for its data (size, channels, classes), as a study shapes it; ValueError or
    FileNotFoundError naming the argument when the model or data cannot work."""
    if cfg.dataset == "digits" and cfg.data_path is not None:  # it would be ignored: scikit-learn's bundled set
        raise ValueError(f"--data-path {cfg.data_path}: the digits dataset reads no folder (it is bundled)")
    if cfg.dataset != "digits":
        if cfg.data_path is None:
            raise ValueError(f"--data-path: required with --dataset {cfg.dataset} (a folder it reads)")
        if not cfg.data_path or not Path(cfg.data_path).is_dir():
            raise FileNotFoundError(f"--data-path {cfg.data_path}: not a folder (the {cfg.dataset} dataset reads one)")
        if cfg.dataset == "imagefolder" and not cfg.image_size:
            raise ValueError("--image-size: the imagefolder dataset needs one (256 or 512)")
    if cfg.dataset == "imagefolder":  # its size is known before its folder is scanned, which takes a while
        _check_model_shape(cfg, {"input_size": cfg.image_size})
    # Its images are found (an image folder's are listed, not read) and a latent set's metadata and shards checked.
    info = dataset_info(cfg.dataset, cfg.data_path, cfg.image_size)
    # The preset's shape is its usual data's (DiT-XL/2: 32×32×4 latents, 1000 classes; DiT-P/2: 8×8 digits): an image
    # folder's RGB pixels or another latent set would not fit it.
    shape = {key: info[key] for key in ("input_size", "in_channels", "num_classes")}
    cfg = dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, **shape})
    _check_model_shape(cfg, {})
    if cfg.batch_size % (cfg.grad_accum * world_size):
        raise ValueError(f"--global-batch-size {cfg.batch_size}: not divisible by --grad-accum {cfg.grad_accum} × "
                         f"{world_size} processes")
    items = training_items(cfg.dataset, info["num_images"])
    if cfg.batch_size > items:
        raise ValueError(f"--global-batch-size {cfg.batch_size}: larger than the {cfg.dataset} dataset's {items} "
                         "training items")
    return cfg


def _check_model_shape(cfg, overrides):
    """Raise ValueError naming --model, its shape flags and --image-size when cfg's model (with overrides) cannot be
    built."""
    mcfg = {**cfg.resolved_model_config(), **overrides}
    try:
        check_shape(*(mcfg[k] for k in ("input_size", "patch_size", "hidden_size", "num_heads", "depth",
                                        "mlp_ratio")))
    except ValueError as e:
        shape_flags = "".join(f" {flag(k)} {v}" for k, v in cfg.model_overrides.items()
                              if k in ("hidden_size", "depth", "num_heads", "mlp_ratio"))
        size = "" if cfg.image_size is None else f" with --image-size {cfg.image_size}"  # digits: 8×8, no flag
        raise ValueError(f"--model {cfg.model}{shape_flags}{size}: {e}") from e


def check_results_dir(results_dir, checkpoint_dir):
    """Raise ValueError naming --results-dir when checkpoint_dir could not be created or written there."""
    if not results_dir:  # an unset variable, say: not the current folder
        raise ValueError("--results-dir is empty; give a folder, or leave the flag out for ./results")
    problem = write_problem(checkpoint_dir)
    if problem:
        raise ValueError(f"--results-dir {results_dir}: {problem}")


def _resume_argument(text):
    """--resume's value with ~ expanded, as --data-path's; its words auto and none as they are."""
    return text if text in ("auto", "none") else os.path.expanduser(text)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m core.train", description="Train one DiT with DeepSpeed ZeRO "
                                     "(defaults: the paper's run, but for --precision).")
    parser.add_argument("--model", default="DiT-XL/2", choices=list(DiT_models), metavar="MODEL",
                        help="a registered config, e.g. DiT-XL/2 or DiT-P/4")
    parser.add_argument("--dataset", default="latents", choices=list(DATASETS))
    # ~ expanded as a study's paths are (a shell leaves a quoted one, and a scheduler's argument list any, as written)
    parser.add_argument("--data-path", default=None, type=os.path.expanduser)
    parser.add_argument("--image-size", type=int, default=None, help="image folders: pixels (256 or 512)")
    parser.add_argument("--results-dir", default="results", type=os.path.expanduser)
    parser.add_argument("--global-batch-size", type=int, default=256)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=400_000)
    parser.add_argument("--milestones", default="", help="comma-separated evaluation steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("BETA1", "BETA2"),
                        help="AdamW's")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                        help="torch's fused AdamW (the default); --no-fused-adamw: its per-parameter loop")
    parser.add_argument("--grad-clip", type=float, default=None)
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32",
                        choices=PRECISIONS, help="default: bf16 on a GPU, fp32 on CPU (a study's: fp32); tf32: fp32 "
                        "with a GPU's TF32 products, as the reference trains")
    parser.add_argument("--diffusion-steps", type=int, default=1000)
    parser.add_argument("--class-dropout-prob", type=float, default=None, help="labels dropped (the model's: 0.1)")
    parser.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=None,
                        help="the model also predicts the variance (the default)")
    for name in ("hidden_size", "depth", "num_heads"):
        parser.add_argument(flag(name), type=int, default=None, help="instead of the preset's")
    parser.add_argument("--mlp-ratio", type=float, default=None, help="instead of the preset's (4)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--ckpt-every", type=int, default=50_000)
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--val-batch", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--resume", default="auto", type=_resume_argument,
                        help="'auto' (newest checkpoint, if any), a path, or 'none'")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help is 0, a bad argument 2 (argparse has printed why)
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")

    try:  # what argparse cannot check, before any process group or DeepSpeed: a message, no traceback
        cfg = config_from_arguments(args)
        cfg = check_arguments(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's processes
        milestones = parse_milestones(args.milestones, args.max_steps)
        out = Path(args.results_dir) / cfg.model.replace("/", "-")
        check_results_dir(args.results_dir, out / "checkpoints")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    resume = None if args.resume == "none" else args.resume
    try:
        train(cfg, out, milestones, PrintingCallbacks(), resume_from=resume)
    except (ckpt.CheckpointError, DataError) as e:  # a bad --resume path, image or shard: the message names the file
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, OSError) as e:  # the run's end, or the machine's (a full disk): no traceback says more
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # The process's group ends with it, as the reference's cleanup (NCCL warns of a leaked group otherwise); not in
    # main(): DeepSpeed keeps the group's handles, so a later train() in the same process would fail.
    if dist.is_initialized():
        if code == 0:
            # Every rank past its last collective before any tears the group down: under a loaded test suite a
            # ZeRO-3 run's rank 1 once aborted in gloo's teardown ("terminate called without an active exception")
            # after the last checkpoint was written, which torchrun reported as a failed run. Not after an error:
            # the other ranks may be in another collective, which a barrier would wait on.
            with contextlib.suppress(RuntimeError):  # a peer already gone: its own exit reports why
                dist.barrier()
        dist.destroy_process_group()
    # Then leave without the interpreter's finalisation. Under load a ZeRO-3 gloo rank still aborted after the group
    # was destroyed, in the C++ destructors that run at exit ("terminate called without an active exception": a
    # thread left joinable), 3 runs of 10 beside two busy loops; torchrun reports that as a failed run. Everything
    # the run writes is on disk by now (checkpoints and results are written atomically); only buffers are left.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
