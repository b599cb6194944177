"""Trial checkpoints: DeepSpeed engine state, EMA, trainer state and RNG states, written atomically.

Layout of one checkpoint (a directory named step-000000400):
    deepspeed/state/...     the engine's files, one set per rank (ZeRO shards carry the rank in their name)
    ema.safetensors         the fp32 EMA weights (rank 0)
    trainer_state.json      step, data position, model config, metrics so far (rank 0)
    rng-rank<R>.pt          each rank's torch RNG states
    checksums-rank<R>.json  the size and CRC-32 of each file rank R wrote (rank 0: those of no rank too, but for the
                            trainer state, checked field by field)
Ranks write into .tmp-step-XXXXXXXXX and the directory is renamed when every rank is done, so a
directory named step-* is always complete.
"""
import json
import pickle
import re
import shutil
import zipfile
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from core.file_mode import give_new_file_mode
from core.folder_swap import swap_in_folder

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
ENGINE_DIR = "deepspeed"
ENGINE_TAG = "state"
PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, truncated or of another run."""


def checkpoint_name(step):
    return f"{PREFIX}{step:09d}"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(directory, engine, ema, trainer_state, rank, shared=True, durable=True):
    """Write a checkpoint of every rank under directory; returns its path. Collective: all ranks call it.

    shared: whether all ranks write into one directory (then rank 0 alone renames it) or each rank
    into its own (then each renames its own). durable=False: a scratch directory, whose copy the caller makes
    durable (Ray's persisted one): its files are not synced to disk (seconds a checkpoint at DiT-XL/2's 11 GB).
    """
    directory = Path(directory)
    name = checkpoint_name(trainer_state["step"])
    final, tmp = directory / name, directory / f".tmp-{name}"
    directory.mkdir(parents=True, exist_ok=True)
    owner = rank == 0 or not shared
    if owner:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    tmp.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(tmp / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False)
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / EMA_FILE))
        give_new_file_mode(tmp / EMA_FILE)  # safetensors makes it private; the EMA weights are what others sample
        state_path = tmp / STATE_FILE
        with open(state_path, "w") as f:  # on disk with the rest before the rename (swap_in_folder)
            json.dump({**trainer_state, CHECKSUMS_KEY: True}, f, indent=1)
    _barrier()
    write_checksums(tmp, rank)
    _barrier()
    if owner:  # one renamer per directory: two would race, one deleting what the other just renamed
        stale = directory / f".stale-{name}"  # a checkpoint of the same step from before a resume, replaced
        shutil.rmtree(stale, ignore_errors=True)  # left by a save killed before its end
        swap_in_folder(tmp, final, stale, durable)
        shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


CHECKSUMS = "checksums-rank{rank}.json"
# A trainer state's mark that its every rank recorded checksums: one record gone (a partial copy, a sync tool that
# skipped a file) then leaves that rank's files unchecked no more (a checkpoint from before the record has none).
CHECKSUMS_KEY = "checksums"


def _writer(name):
    """The rank whose own a checkpoint file is (its ZeRO shards, its RNG state), or None for rank 0's shared ones."""
    found = re.search(r"zero_pp_rank_(\d+)_", name) or re.fullmatch(r"rng-rank(\d+)\.pt", name)
    return int(found.group(1)) if found else None


def _crc32(file):
    """CRC-32 of a file, as 8 hex digits: against damage, not tampering (twice sha256's speed, 2 GB/s here)."""
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_checksums(folder, rank):
    """Record the size and CRC-32 of the files under folder this rank wrote (rank 0: also those of no rank): bytes
    damaged on disk or in a copy load without a word (torch and safetensors check no contents). Not the trainer
    state: its every field is checked as it is read, and a person may edit it on purpose."""
    folder = Path(folder)
    entries = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        writer = _writer(file.name)
        if file.name == STATE_FILE or file.name.startswith("checksums-rank"):
            continue
        if writer == rank or writer is None and rank == 0:
            entries[file.relative_to(folder).as_posix()] = {"bytes": file.stat().st_size, "crc32": _crc32(file)}
    with open(folder / CHECKSUMS.format(rank=rank), "w") as f:
        json.dump(entries, f, indent=1)


def verify_checksums(path, rank, state=None):
    """CheckpointError naming the first file this rank reads whose size or CRC-32 is not what was written; the
    other ranks' own files are theirs to check. A checkpoint from before the record has none to compare; one whose
    trainer state (state) says it has them must hold those of rank 0 (the files of no rank) and of this rank (where it
    was one of the writers: a ZeRO-0 run may resume on more processes)."""
    path = Path(path)
    if state is not None and state.get(CHECKSUMS_KEY):
        for writer in sorted({0, rank} if rank < state.get("world_size", 1) else {0}):
            if not (record := path / CHECKSUMS.format(rank=writer)).is_file():
                raise CheckpointError(f"{record} is missing: {path} is not a complete checkpoint (its files cannot "
                                      "be checked for damage)")
    for record in sorted(path.glob(CHECKSUMS.format(rank="*"))):
        try:
            entries = json.loads(record.read_text())
            wrote = {name: (int(e["bytes"]), str(e["crc32"])) for name, e in entries.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{record} is corrupt: {e}") from None
        for name, (size, crc) in wrote.items():
            file = path / name
            if _writer(file.name) not in (None, rank):
                continue
            if not file.is_file():
                raise CheckpointError(f"{file} is missing: {path} is not a complete checkpoint")
            if file.stat().st_size != size:
                raise CheckpointError(f"{file} is damaged: {file.stat().st_size} bytes, where {size} were written "
                                      f"({record.name})")
            if (found := _crc32(file)) != crc:
                raise CheckpointError(f"{file} is damaged: its contents are not those written (CRC-32 {found}, "
                                      f"{record.name} records {crc})")


def _step_folders(directory):
    """The step-* folders under directory, complete or not, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))  # by number: step 10**9 has ten digits


def list_checkpoints(directory):
    """Complete checkpoints under directory, oldest first."""
    return [p for p in _step_folders(directory) if (p / STATE_FILE).exists()]


def latest_checkpoint(directory):
    """The newest checkpoint under directory, or None; CheckpointError when it has lost its trainer state.

    A step-* folder is renamed into place with its trainer_state.json, so the newest one without it was damaged
    after its save: resuming from the one before would silently go back, and later overwrite it. An older one
    without it is passed over: a prune killed while it deleted that folder leaves it so.
    """
    found = _step_folders(directory)
    if not found:
        return None
    if not (found[-1] / STATE_FILE).exists():
        raise CheckpointError(f"{found[-1] / STATE_FILE} is missing: {found[-1]} is not a complete checkpoint; "
                              "move it away to resume from the one before")
    return found[-1]


def fresh_start_problem(directory):
    """Why a run starting afresh must not save into directory, or None: an earlier run's checkpoints are there.

    Pruning keeps the newest steps whichever run saved them, so the fresh run's first checkpoints would be deleted
    for the earlier run's later ones, and a resume after a stop would go on from those.
    """
    found = _step_folders(directory)
    if not found:
        return None
    names = found[0].name if len(found) == 1 else f"{found[0].name} to {found[-1].name}"
    return (f"{directory} holds checkpoints of an earlier run ({names}): a fresh start would save its own among "
            "them, and keeping the newest would delete its own; resume from them (--resume auto), train into another "
            "--results-dir, or move them away")


def prune_checkpoints(directory, keep, marked=True):
    """Delete all but the newest keep checkpoints (call on one rank per directory), and step folders older than them,
    and what saves killed mid-way left of checkpoints older than the newest.

    A prune killed mid-way leaves an old folder without its trainer state; it goes with the next prune. marked=False:
    a folder of a rank other than 0 of its own (Ray's workers), where only rank 0's checkpoints carry a trainer
    state: every step folder there is a checkpoint (counted as complete, those piled up, one per checkpoint).
    """
    folders = _step_folders(directory)
    checkpoints = [p for p in folders if (p / STATE_FILE).exists()] if marked else folders
    if checkpoints:  # a save killed mid-way left its whole size in .tmp-step-N (.stale-step-N: the one it replaced),
        # removed only by a save of that very step: gone once a newer checkpoint is whole (no save runs meanwhile)
        newest = int(checkpoints[-1].name[len(PREFIX):])
        for left in Path(directory).glob(f".*-{PREFIX}*"):
            kind, _, step = left.name[1:].partition(f"-{PREFIX}")
            if kind in ("tmp", "stale") and step.isdigit() and int(step) < newest:
                shutil.rmtree(left, ignore_errors=True)
    if keep <= 0 or len(checkpoints) <= keep:
        return
    oldest_kept = checkpoints[-keep]
    for old in folders[:folders.index(oldest_kept)]:
        shutil.rmtree(old, ignore_errors=True)


def read_trainer_state(path):
    """The trainer_state.json of a checkpoint directory, with errors that name the file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: {path} is not a complete checkpoint")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_file} is corrupt: {e}") from e
    except OSError as e:
        if not _the_files_fault(e):
            raise
        raise CheckpointError(f"{state_file} cannot be read: {e.strerror or e}") from e
    problem = trainer_state_problem(state)
    if problem:
        raise CheckpointError(f"{state_file} is corrupt: {problem}")
    return state


def _whole(value):
    """An int >= 0 that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value):
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What training reads back from a trainer state: key -> (test, what the value must be, required).
STATE_FIELDS = {
    "step": (_whole, "a whole number >= 0", True),
    "train_time_s": (_number, "a number", True),
    "sampler": (lambda v: isinstance(v, dict), "an object", True),
    "model_config": (lambda v: isinstance(v, dict), "an object", True),
    "history": (lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v), "a list of objects", False),
    "metrics": (lambda v: isinstance(v, dict), "an object", False),
    "config": (lambda v: isinstance(v, dict), "an object", False),  # the run's settings, for the resume check
    "world_size": (lambda v: _whole(v) and v >= 1, "a whole number >= 1", False),
    "zero_stage": (lambda v: _whole(v) and v <= 3, "0, 1, 2 or 3", False),
    CHECKSUMS_KEY: (lambda v: isinstance(v, bool), "true or false", False),
    # the steps since the last log, which the next log averages
    "log_window": (lambda v: isinstance(v, dict) and all(_number(v.get(k, 0)) for k in ("loss", "steps", "time_s")),
                   'an object of numbers "loss", "steps" and "time_s"', False),
}
JSON_TYPES = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}


def _short(value, limit=60):
    """repr(value), cut short: a message names a value, it does not print a whole history."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def trainer_state_problem(state):
    """What makes a parsed trainer_state.json unusable for a resume, or None."""
    if not isinstance(state, dict):
        return f"it holds a JSON {JSON_TYPES.get(type(state), type(state).__name__)}, not an object"
    for key, (ok, kind, required) in STATE_FIELDS.items():
        if key not in state:
            if required:
                return f'it has no "{key}"'
        elif not ok(state[key]):
            return f'"{key}" is {_short(state[key])}, not {kind}'
    for key in ("epoch", "batch"):  # the data position the sampler resumes from
        if key not in state["sampler"]:
            return f'"sampler" has no "{key}"'
        if not _whole(state["sampler"][key]):
            return f'"sampler" has "{key}": {_short(state["sampler"][key])}, not a whole number >= 0'
    return None


ABSENT = object()  # a model field one config has and the other lacks (a checkpoint of an older version, say)


def _setting(config, name):
    """A model config's value of name as a message shows it."""
    return repr(config[name]) if name in config else "absent"


def check_checkpoint(path, model_config):
    """The trainer state of a checkpoint of this model; cheap, so a bad one fails before any set-up."""
    path = Path(path)
    state = read_trainer_state(path)
    saved = state["model_config"]
    if saved != model_config:  # name the fields that differ: two whole configs hide them
        names = dict.fromkeys([*saved, *model_config])  # each field of either, once, in order
        changed = [f"{name} {_setting(saved, name)} (now {_setting(model_config, name)})" for name in names
                   if saved.get(name, ABSENT) != model_config.get(name, ABSENT)]
        raise CheckpointError(f"{path / STATE_FILE} belongs to another model: {'; '.join(changed)}")
    return state


def _the_files_fault(error):
    """Whether an error met reading a checkpoint is its files' (missing, unreadable, of other contents), which every
    retry meets, rather than the machine's or the process group's (out of memory, an I/O error, a timed-out
    collective), which a retry may not: only the first makes a checkpoint one to give up on."""
    # torch's OutOfMemoryError and the process group's DistError (NCCL's DistBackendError among them) are
    # RuntimeErrors, as are a damaged file's "PytorchStreamReader" and a state dict of other shapes.
    if isinstance(error, (MemoryError, torch.OutOfMemoryError, dist.DistError)):
        return False
    if isinstance(error, OSError):  # EIO, ESTALE and the like: the disk's or the network's, not the bytes'
        return isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError))
    # gloo's timeouts and closed connections are plain RuntimeErrors that name it (its source path, "gloo/...").
    return not (isinstance(error, RuntimeError) and any(word in str(error) for word in ("gloo", "NCCL", "Timed out")))


def _unreadable(error, writer, what="it"):
    """Why a file could not be read, in words: not one writer wrote whole, and the reader's reason if it says one."""
    if isinstance(error, OSError):  # missing, unreadable: the system's words say it
        return str(error)
    # torch's unpickler meets a junk file with a bare byte, number or memo index, an empty one with no text at all.
    said = not isinstance(error, (KeyError, EOFError, pickle.UnpicklingError))
    reason = str(error).split(". ")[0].strip() if said else ""  # torch adds paragraphs of advice after the first
    return f"{what} is not a complete file {writer} wrote" + (f" ({reason})" if reason else "")


def _damaged_torch_file(error):
    """Whether an error from torch.load (DeepSpeed's, which unpickles in full) is that of a junk or cut file."""
    return isinstance(error, (EOFError, pickle.UnpicklingError)) or str(error).startswith("PytorchStreamReader")


def engine_files(zero_stage, rank, bf16):
    """The names of the files of a checkpoint's engine folder that rank reads (DeepSpeed's _get_ckpt_name and
    _get_zero_ckpt_name, model-parallel rank 00): the module's states (ZeRO-3: its own), and under ZeRO its own
    optimizer partition (bf16_ before its name under bf16). The names the pinned DeepSpeed writes: its loader also
    takes older versions' and the other precision's, which a resume here refuses (another precision is refused
    anyway, as a setting that differs)."""
    model = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt"
    optimizer = f"{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    return [model, optimizer] if zero_stage > 0 else [model]


def _engine_file_problem(path, zero_stage, rank, bf16):
    """What keeps DeepSpeed's loader from reading this rank's engine files of the checkpoint at path, or None.

    Checked before the loader: it asserts without words on a missing file, and under ZeRO-3 a rank that fails inside
    it leaves the others waiting in the all-gather it ends with.
    """
    folder = path / ENGINE_DIR / ENGINE_TAG
    if not folder.is_dir():
        return f"{folder} is missing: {path} is not a complete checkpoint"
    for name in engine_files(zero_stage, rank, bf16):
        file = folder / name
        if not file.is_file():
            return f"{file} is missing: {path} is not a complete checkpoint"
        # torch.save writes zip archives, whose directory sits at their end: a file cut short or of junk has none,
        # found from a read of its last bytes.
        if not zipfile.is_zipfile(file):
            return f"{file} cannot be loaded: it is not a complete file torch.save wrote"
    return None


def _read_rng(file):
    """The RNG states of a checkpoint's rng-rank<R>.pt, or None where it has none (a checkpoint from before them)."""
    if not file.is_file():
        return None
    try:
        rng = torch.load(file, weights_only=True)
    except Exception as e:
        if not _the_files_fault(e):
            raise
        raise CheckpointError(f"{file} cannot be loaded: {_unreadable(e, 'torch.save')}") from e
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
        raise CheckpointError(f"{file} cannot be loaded: it holds no torch RNG state")
    return rng


# DeepSpeed saves ZeRO-1 and ZeRO-2 optimizer state alike (a resume across them is exact); ZeRO-0 keeps it whole and
# ZeRO-3 partitions the weights too, so neither loads the others' checkpoints.
INTERCHANGEABLE_ZERO_STAGES = {1, 2}


def load_checkpoint(path, engine, ema, model_config, world_size, zero_stage, rank, agree=None):
    """Restore engine, EMA and this rank's RNG from a checkpoint; returns its trainer state.

    agree(problem): a collective every rank calls before DeepSpeed's loader with its CheckpointError so far, or None,
    which raises on every rank where any rank has one: the loader's own collectives (ZeRO-3's) would wait forever on a
    rank that stopped before them.
    """
    path = Path(path)
    try:
        state, rng = _check_before_engine(path, engine, ema, model_config, world_size, zero_stage, rank)
        problem = None
    except CheckpointError as err:
        problem = err
    if agree is not None:
        agree(problem)
    if problem is not None:
        raise problem
    try:
        load_path, _ = engine.load_checkpoint(str(path / ENGINE_DIR), tag=ENGINE_TAG)
    except Exception as e:
        if not _the_files_fault(e):
            raise
        # What the checks before let through: contents that a whole file of another version holds, say.
        why = _unreadable(e, "torch.save", "a file in it") if _damaged_torch_file(e) else str(e) or type(e).__name__
        raise CheckpointError(f"{path / ENGINE_DIR} cannot be loaded: {why}") from e
    if load_path is None:
        raise CheckpointError(f"{path / ENGINE_DIR / ENGINE_TAG} holds no DeepSpeed checkpoint")
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    # trainer_state.json is outside the checksums (it may be read and edited by hand): its step, which sets the data
    # position and every step's randomness from here on, must be the step the engine's states were saved at (after
    # the checksums: a damaged engine file is named as such, not as a step that differs).
    if engine.global_steps != state["step"]:
        raise CheckpointError(f"{path / STATE_FILE} says step {state['step']}, but the weights and optimizer states "
                              f"there were saved at step {engine.global_steps}")
    return state


def _check_before_engine(path, engine, ema, model_config, world_size, zero_stage, rank):
    """load_checkpoint's part that needs no other rank: the trainer state checked, the EMA loaded, this rank's engine
    files found and its RNG states read, every file it reads checked against its checksums; (state, RNG states)."""
    state = check_checkpoint(path, model_config)
    saved_stage = state.get("zero_stage", zero_stage)
    if saved_stage != zero_stage and not {saved_stage, zero_stage} <= INTERCHANGEABLE_ZERO_STAGES:
        raise CheckpointError(f"{path} was written with ZeRO-{saved_stage}; this run has ZeRO-{zero_stage} (a resume "
                              f"may switch between ZeRO-1 and ZeRO-2 only: the other stages keep their optimizer "
                              f"state in files of their own)")
    if zero_stage > 0 and state.get("world_size") != world_size:
        # ZeRO partitions optimizer state by data-parallel rank; it cannot be re-sharded on load.
        raise CheckpointError(f"{path} was written by {state.get('world_size')} processes with ZeRO-"
                              f"{state.get('zero_stage')}; this run has {world_size}")
    ema_file = path / EMA_FILE
    try:
        weights = load_file(str(ema_file))
    except Exception as e:
        if not _the_files_fault(e):
            raise
        raise CheckpointError(f"{ema_file} cannot be loaded: {_unreadable(e, 'safetensors')}") from e
    try:
        ema.load_state_dict(weights)
    except Exception as e:
        if not _the_files_fault(e):
            raise
        raise CheckpointError(f"{ema_file} cannot be loaded: {e}") from e
    problem = _engine_file_problem(path, zero_stage, rank, engine.bfloat16_enabled())
    if problem:
        raise CheckpointError(problem)
    rng = _read_rng(path / f"rng-rank{rank}.pt")
    # Last: a file cut short or of junk gets its loader's words above; one whose bytes changed loads as if whole.
    verify_checksums(path, rank, state)
    return state, rng
