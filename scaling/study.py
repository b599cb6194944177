"""The study file: its YAML schema, validation, grid expansion into trials, and trial ids.

`load_study` reads a study, applies `--set key=value` overrides, fills the defaults below,
validates every field, and expands the sweep into `Trial`s. Every problem is a `StudyError`
whose message names the file, the line (or the `--set`) and the field; nothing is written.
"""
import copy
import dataclasses
import datetime
import difflib
import functools
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.precision import PRECISIONS
from scaling.autoscaler_limits import UNLIMITED


class StudyError(Exception):
    """A bad study file or override; the message reads `file:line: field: what is wrong`."""


class _Invalid(ValueError):
    """A value's problem, before its location is attached."""


#################################################################################
#                      Field checks: each returns the normalised value          #
#################################################################################

def _kind(value):
    """How a YAML user would call a value's type."""
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)


def _shown(value):
    """A value as YAML writes it (null, true, [true, null]), not as Python's repr (None, True, [True, None])."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, list):
        return f"[{', '.join(map(_shown, value))}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{_shown(k)}: {_shown(v)}' for k, v in value.items())}}}"
    return repr(value)


def _check_range(value, at_least=None, above=None, below=None, at_most=None):
    for bound, ok, sign in ((at_least, lambda b: value >= b, ">="), (above, lambda b: value > b, ">"),
                            (below, lambda b: value < b, "<"), (at_most, lambda b: value <= b, "<=")):
        if bound is not None and not ok(bound):
            raise _Invalid(f"must be {sign} {bound}, got {_shown(value)}")


def integer(**bounds):
    """An int (not a bool) within bounds."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {_shown(value)}{_whole_number_hint(value)}")
        _check_range(value, **bounds)
        return value
    return check


def _whole_number_hint(value):
    """How to write a whole float (5e4, the paper's 4e5 steps) as the integer YAML reads as one; "" for others."""
    # Only as far as floats hold every integer: past 2**53 the float may not be the integer that was meant.
    if not isinstance(value, float) or not value.is_integer() or abs(value) > 2 ** 53:
        return ""
    whole = int(value)
    return f"; write {whole}" + (f" or {whole:_}" if abs(whole) >= 10_000 else "")


def number(**bounds):
    """A finite float within bounds; ints are accepted and made floats so that 1 and 1.0 hash alike."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"expected a number, got {_shown(value)}")
        try:
            as_float = float(value)
        except OverflowError:  # an int past 1.8e308; not shown, as it may have hundreds of digits
            raise _Invalid("expected a number, got an integer too large for a float") from None
        # Trial ids hash JSON, which has no inf or nan; checked before the bounds, as NaN fails them all
        # with a misleading "must be > 0".
        if not math.isfinite(as_float):
            raise _Invalid(f"must be a finite number, got {_shown(value)}")
        _check_range(value, **bounds)  # the value as written: ema_decay: 1 is "got 1", not 1.0
        return as_float
    return check


def boolean(value):
    """true or false (YAML's yes/no are booleans too)."""
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_shown(value)}")
    return value


def _quote_hint(value):
    """What to do when YAML read a value meant as text as something else: 2024 (a number), 2024-01-01 (a date)."""
    if isinstance(value, (bool, int, float, datetime.date)):
        return f" (YAML read it as {_kind(value) if not isinstance(value, datetime.date) else 'a date'}: quote it)"
    return ""


def text(value):
    """A non-empty string."""
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_shown(value)}{_quote_hint(value)}")
    if not value.strip():  # an empty path would quietly mean the current directory, or the default
        raise _Invalid("must not be empty")
    return value


def seed(value):
    """A training seed: one whose every step's draws fit torch's generator (core.train.MAX_SEED)."""
    from core.train import MAX_SEED  # here, not at import: the schema is built before torch is wanted

    return integer(at_least=0, at_most=MAX_SEED)(value)


def choice(*options):
    """One of a few strings, with a did-you-mean for near misses."""
    def check(value):
        if value not in options:
            raise _Invalid(f"expected one of {', '.join(map(repr, options))}, got {_shown(value)}"
                           + _did_you_mean(str(value), options))
        return value
    return check


def optional(check):
    """null, or what check accepts."""
    return lambda value: None if value is None else check(value)


def betas(value):
    """AdamW's (beta1, beta2), each in [0, 1)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _Invalid(f"expected a pair of numbers [beta1, beta2], got {_shown(value)}")
    return [number(at_least=0, below=1)(b) for b in value]


MAX_NAME = 100  # characters: the name is a folder's (outputs/<name>, reports/<name>, and their temporary siblings)


def study_name(value):
    """A name that is safe as a folder and an MLflow experiment."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", value) or set(value) == {"."}:
        raise _Invalid(f"expected a name of letters, digits, '_', '.' and '-', got {_shown(value)}{_quote_hint(value)}")
    if len(value) > MAX_NAME:
        raise _Invalid(f"expected at most {MAX_NAME} characters (it names the output and report folders), "
                       f"got {len(value)}")
    return value


def _did_you_mean(word, candidates):
    """"; did you mean 'x'?" for the closest candidate, or "" when none is close; candidates may map each name
    compared to the name shown ({'lr': 'train.lr'})."""
    shown = candidates if isinstance(candidates, dict) else {c: c for c in candidates}
    # Another case of a candidate is that one ('DiT-p': 'DiT-P'), whatever difflib finds closer by its letters.
    close = [c for c in shown if c.lower() == word.lower()] or difflib.get_close_matches(word, list(shown), n=1)
    # A word that is a whole part of one name only (dropout: class_dropout_prob), too short a part for difflib.
    parts = [c for c in shown if word in c.split("_")]
    if not close and len(parts) == 1:
        close = parts
    return f"; did you mean {shown[close[0]]!r}?" if close else ""


#################################################################################
#                                  The schema                                   #
#################################################################################

REQUIRED = object()  # a field without a default

DATASETS = ("digits", "imagefolder", "latents")
# DiT shape fields a study may set over a size preset (null keeps the preset's), e.g. to sweep width.
ARCHITECTURE_FIELDS = ("hidden_size", "depth", "num_heads", "mlp_ratio")

# section -> field -> (default, check). Paths (data.path, eval.vae, ...) are relative to the study file.
SCHEMA = {
    "data": {
        "dataset": ("digits", choice(*DATASETS)),
        "path": (None, optional(text)),  # required for imagefolder and latents
        "image_size": (None, optional(integer(at_least=1))),  # pixels; imagefolder needs it
    },
    "train": {
        "batch_size": (256, integer(at_least=1)),  # global: micro-batch × grad_accum × workers
        "grad_accum": (1, integer(at_least=1)),
        "lr": (1e-4, number(above=0)),
        "lr_schedule": ("constant", choice("constant", "cosine", "linear")),
        "warmup_steps": (0, integer(at_least=0)),
        "betas": ([0.9, 0.999], betas),
        "weight_decay": (0.0, number(at_least=0)),
        "grad_clip": (None, optional(number(above=0))),
        "ema_decay": (0.9999, number(at_least=0, below=1)),  # 1 would never move the EMA from its start
        "precision": ("fp32", choice(*PRECISIONS)),  # core/precision.py says what each means
        "zero_stage": (2, integer(at_least=0, at_most=3)),
        "seed": (0, seed),
        "class_dropout_prob": (0.1, number(at_least=0, below=1)),
        "learn_sigma": (True, boolean),
        # The linear schedule's last beta is 20 / diffusion_steps: from 20 steps down it reaches 1, the
        # signal is gone before the last step and its x_0 prediction divides by zero.
        "diffusion_steps": (1000, integer(at_least=21, at_most=100_000)),  # core.train.MAX_DIFFUSION_STEPS
        "log_every": (10, integer(at_least=1)),
        "ckpt_every": (500, integer(at_least=1)),
        "keep_checkpoints": (2, integer(at_least=1)),
        "val_batch": (256, integer(at_least=0)),  # 0: no validation loss
        "compile": (False, boolean),
        "grad_checkpointing": (False, boolean),
        "fused_adamw": (None, optional(boolean)),  # null: fused AdamW; false: torch's default implementation
        # Data-loading processes per worker (image folders); a thousand and more would each be a process of its own.
        "num_workers": (4, integer(at_least=0, at_most=1024)),
        "peak_tflops": (None, optional(number(above=0))),  # per-process hardware peak, for utilisation
        "hidden_size": (None, optional(integer(at_least=1))),
        "depth": (None, optional(integer(at_least=1))),
        "num_heads": (None, optional(integer(at_least=1))),
        "mlp_ratio": (None, optional(number(above=0))),
    },
    "eval": {
        "fid": (True, boolean),
        # FID needs a covariance: 2 images at least; at most 10M (the paper's is 50K): each is sampled and held in
        # memory, and past about 2**63 the labels' draw overflowed at the first milestone, after the training.
        "fid_samples": (1000, integer(at_least=2, at_most=10_000_000)),
        "feature_extractor": ("digits", choice("digits", "inception-v3-compat")),
        "feature_extractor_weights": (None, optional(text)),
        "sampler": ("ddim", choice("ddim", "ddpm")),
        "sampling_steps": (50, integer(at_least=2)),  # one step returns its starting noise (core.sampling)
        # DDIM's noise: 0 deterministic, 1 DDPM's posterior variance; above 1 its step takes the square root of a
        # negative number and every sample is NaN, found only at the first milestone.
        "eta": (0.0, number(at_least=0, at_most=1)),
        "cfg_scale": (1.0, number(at_least=0)),  # 1.0: no guidance
        "guided_channels": (3, optional(integer(at_least=1))),  # null: every noise channel
        "vae": (None, optional(text)),  # a local diffusers AutoencoderKL, to decode latents
        "grid_images_per_class": (4, integer(at_least=0, at_most=1000)),  # one PNG: a thousand a row at most
        # Real images for FID (an image folder: class sub-folders or a flat one), or an .npz of FID statistics
        # (ADM's reference batch: mu, sigma and optionally images, arr_0); default: the training data, which latents
        # cannot be: they need one.
        "reference": (None, optional(text)),
        # Held-out real images for the FID noise floor (an image folder); digits: the held-out split.
        "heldout": (None, optional(text)),
    },
    "resources": {
        "workers_per_trial": (1, integer(at_least=1)),
        "gpus_per_worker": (0.0, number(at_least=0)),
        "cpus_per_worker": (1.0, number(at_least=0)),
        "max_failures": (1, integer(at_least=0)),
        "max_concurrent_trials": (None, optional(integer(at_least=1))),  # null: what the cluster fits
    },
    "tracking": {
        "mlflow_uri": (None, optional(text)),  # null: MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db
        "experiment": (None, optional(text)),  # null: the study name
    },
}
TOP_LEVEL = {"name": (REQUIRED, study_name), "data": None, "sweep": None, "train": None, "eval": None,
             "resources": None, "tracking": None, "output": (None, optional(text))}  # None: a section
SWEEP_AXES = ("model", "patch", "steps", "compute")
STUDY_RELATIVE_PATHS = (("data", "path"), ("eval", "vae"), ("eval", "feature_extractor_weights"),
                        ("eval", "reference"), ("eval", "heldout"))
EVAL_PATHS = tuple(name for section, name in STUDY_RELATIVE_PATHS if section == "eval")
# Train fields that change how a run is logged and checkpointed, not what it computes (resume stays exact):
# left out of trial ids, and not sweepable.
BOOKKEEPING = ("log_every", "ckpt_every", "keep_checkpoints", "num_workers", "peak_tflops")
# Settings that cannot change a trial's results (its losses, FID and the rest): its id hashes a fixed value in their
# place, so that an edit of one keeps the finished trials (and their checkpoints, in a folder named by the id).
# (section, field) -> when it changes no result, given the resolved study.
NO_RESULT = {
    # Recomputes activations: the same loss and gradients, bitwise, in eager mode (compiled, inductor may fuse the
    # recomputation otherwise).
    ("train", "grad_checkpointing"): lambda raw: not raw["train"]["compile"],
    ("eval", "grid_images_per_class"): lambda raw: True,  # the grid has its own seeds; FID reads only its own images
    ("eval", "eta"): lambda raw: raw["eval"]["sampler"] == "ddpm",  # DDIM's alone
    ("eval", "guided_channels"): lambda raw: raw["eval"]["cfg_scale"] == 1.0,  # 1.0 runs no guidance
    # FID's own inputs, without FID (a milestone then draws only its grid, which reads none of them).
    **{("eval", name): (lambda raw: not raw["eval"]["fid"])
       for name in ("fid_samples", "feature_extractor", "feature_extractor_weights", "reference", "heldout")},
}
# The value hashed in place of such a setting: the default study's (studies/gflops_sweep.yaml writes guided_channels
# null), else the schema default, so that its trials keep the ids they had before these settings were set aside.
NO_RESULT_AS = {("eval", "guided_channels"): None}
# Train fields that are not sweep axes: an axis of them would give trials that differ in nothing they measure.
UNSWEPT = BOOKKEEPING + tuple(name for section, name in NO_RESULT if section == "train")
# Train fields a sweep may have as axes (train.lr), besides SWEEP_AXES.
SWEPT_TRAIN = tuple(name for name in SCHEMA["train"] if name not in UNSWEPT)
# Where fields live that people put elsewhere or call by another trainer's name (Hugging Face's, Lightning's, timm's,
# DeepSpeed's, guided-diffusion's), for did-you-mean: by an unknown key's last part, in any section (model,
# train.model and sweep.train.model).
MOVED = {"model": "sweep.model", "patch": "sweep.patch", "steps": "sweep.steps", "compute": "sweep.compute",
         "max_steps": "sweep.steps", "num_steps": "sweep.steps", "total_steps": "sweep.steps",
         "learning_rate": "train.lr", "ema": "train.ema_decay", "ema_rate": "train.ema_decay",
         "gradient_accumulation_steps": "train.grad_accum", "accumulate_grad_batches": "train.grad_accum",
         "clip_grad": "train.grad_clip", "max_grad_norm": "train.grad_clip", "gradient_clipping": "train.grad_clip",
         "wd": "train.weight_decay", "cfg": "eval.cfg_scale", "guidance_scale": "eval.cfg_scale"}
# The same words inside a section that has a field of that meaning: the eval section's steps are the sampler's
# (core.evaluate.EvalConfig calls them num_steps), not the training's.
MOVED_IN = {"eval": {"num_steps": "eval.sampling_steps", "steps": "eval.sampling_steps"}}


#################################################################################
#                        Reading YAML with line numbers                         #
#################################################################################

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e14 and 3e-4 as floats (YAML 1.1 wants 1.0e+14), and refuses YAML 1.1's octal
    (010 is 8) and base-60 (1:30 is 90) integers, which no one writes on purpose in a study."""

    def construct_yaml_int(self, node):
        digits = node.value.lstrip("+-").replace("_", "")
        octal = len(digits) > 1 and digits[0] == "0" and digits[1] not in "xXbB"
        if octal or ":" in digits:
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value} is YAML 1.1's {'octal' if octal else 'base-60'} number "
                            f"{super().construct_yaml_int(node)}; write it without {'the leading 0' if octal else ':'}, "
                            "or quote it for text", node.start_mark)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        if ":" in node.value:  # 1:30.5 is 90.5
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value} is YAML 1.1's base-60 number {super().construct_yaml_float(node)}; write "
                            "it without :, or quote it for text", node.start_mark)
        return super().construct_yaml_float(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes the strings _Loader reads as floats: a study named '1e3' is written back as one."""


for _yaml in (_Loader, _Dumper):
    _yaml.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))


def parse_value(text, where="--set"):
    """A `--set` value as YAML: 3e-4, [2, 4], null, true, or a plain string; its aliases checked as a file's
    (_check_expansion), the messages starting with where."""
    loader = _Loader(text)  # a SafeLoader: no arbitrary objects
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, lambda _: where, "the value")
        _check_keys(node, where, set())
        try:
            return loader.construct_document(node)
        except CONSTRUCTION_ERRORS as err:
            raise StudyError(f"{where}: {_unconstructible(err)}") from None
    finally:
        loader.dispose()


# What PyYAML's constructors raise for a value its resolver took for a date, a number or a tag's type but that is
# none (`2024-02-30`, `0x_`, `!!int abc`, `!!int [1]`): not YAMLError, and with no line to give.
CONSTRUCTION_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError)


def _unconstructible(err):
    """The message for a value PyYAML cannot construct (CONSTRUCTION_ERRORS)."""
    reason = " ".join(f"{type(err).__name__}: {err}".split())
    return (f"a value cannot be read as the type YAML takes it for ({reason}); quote it to have it read as text, or "
            "write it as that type")


def _check_keys(node, where, seen):
    """Refuse a key of a --set value that is not a name, or that its mapping has twice, as a study file's
    (_key_problem, _record_lines)."""
    if id(node) in seen:  # an alias: walked once
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys = set()
        for key_node, value_node in node.value:
            named = isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<"
            problem = named and _key_problem(key_node)
            if problem:
                raise StudyError(f"{where}: {problem}")
            if named and key_node.value in keys:  # PyYAML would silently keep the last one
                raise StudyError(f"{where}: {key_node.value}: duplicate key")
            keys.add(key_node.value if named else None)
            _check_keys(value_node, where, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_keys(item, where, seen)


def _read_yaml(path):
    """(tree, {key path: line}) of a study file."""
    try:
        source = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StudyError(f"{path}: no such study file") from None
    except UnicodeDecodeError:
        raise StudyError(f"{path}: not a YAML file: it is not UTF-8 text") from None
    except OSError as err:
        raise StudyError(f"{path}: cannot read the study file: {err.strerror}") from None
    try:
        loader = _Loader(source)
        lines = {}
        try:
            node = loader.get_single_node()
            if node is not None:  # before construction, which splices merge keys' (<<) entries into their mapping
                _record_lines(node, (), lines, path, set())
                _check_expansion(node, lambda n: f"{path}:{n.start_mark.line + 1}", "this value")
            tree = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except CONSTRUCTION_ERRORS as err:
        raise StudyError(f"{path}: not a YAML file: {_unconstructible(err)}") from None
    except RecursionError:  # PyYAML reads nested values recursively: thousands of brackets deep
        raise StudyError(f"{path}: not a YAML file: its values nest too deeply to read") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        reason = ", ".join(filter(None, (err.context, err.problem)))
        raise StudyError(f"{path}{f':{mark.line + 1}' if mark else ''}: not a YAML file: {reason}") from None
    except yaml.YAMLError as err:  # e.g. a control character: the reader has no line to give
        raise StudyError(f"{path}: not a YAML file: {str(err).splitlines()[0]}") from None
    if tree is None:
        raise StudyError(f"{path}: the study file is empty")
    if not isinstance(tree, dict):
        raise StudyError(f"{path}:{node.start_mark.line + 1}: the study must be a mapping of sections "
                         f"({', '.join(TOP_LEVEL)}), got {_kind(tree)}")
    return tree, lines


def _key_problem(key_node):
    """Why a mapping key is not a name (1:, null:, true: would be keys no message could name), or None."""
    if key_node.tag != "tag:yaml.org,2002:str":
        return f"a key must be a name, got {key_node.value} (YAML reads it as {key_node.tag.rsplit(':', 1)[-1]})"
    return None


def _record_lines(node, key_path, lines, file, seen):
    """Note the line of every mapping key and list item under node; reject duplicate keys."""
    # An alias (*name) is the anchored node itself: walked once, so that a node that contains its own alias
    # ends and nested aliases (a "billion laughs" file) cost no more than the text; a field under the second
    # use is located at the key that uses it.
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            sub = key_path + (key_node.value,)
            line = key_node.start_mark.line + 1
            problem = _key_problem(key_node)
            if problem:
                raise StudyError(f"{file}:{line}: {_dotted(sub)}: {problem}")
            if sub in lines:  # PyYAML would silently keep the last one
                raise StudyError(f"{file}:{line}: {_dotted(sub)}: duplicate key (first on line {lines[sub]})")
            lines[sub] = line
            _record_lines(value_node, sub, lines, file, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[key_path + (i,)] = item.start_mark.line + 1
            _record_lines(item, key_path + (i,), lines, file, seen)


MAX_EXPANDED_VALUES = 100_000  # a study file spelled out, aliases expanded: hundreds of values, not millions


def _check_expansion(root, locate, what):
    """Refuse YAML whose aliases (*name) nest into itself or expand past MAX_EXPANDED_VALUES values, which every
    later walk of the tree (and any message that shows a value) would pay for; locate(node) starts a message, what
    names the value in it."""
    sizes, open_nodes = {}, set()

    def size(node):
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise StudyError(f"{locate(node)}: an alias refers to the value that contains it")
        open_nodes.add(id(node))
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        total = 1 + sum(size(child) for child in children)
        if total > MAX_EXPANDED_VALUES:
            raise StudyError(f"{locate(node)}: through its aliases {what} expands to more than "
                             f"{MAX_EXPANDED_VALUES:,} values")
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


def _dotted(key_path):
    """('sweep', 'train.lr', 0) -> 'sweep.train.lr' (list positions are left out)."""
    return ".".join(str(k) for k in key_path if not isinstance(k, int))


def _key_path(dotted):
    """'train.lr' -> ('train', 'lr'); a sweep key keeps its dots: 'sweep.train.lr' -> ('sweep', 'train.lr')."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return (head,)
    return (head, rest) if head == "sweep" else (head, *rest.split("."))


class Locations:
    """Where each field of a study came from: a file line, a `--set`, or nowhere (a default)."""

    def __init__(self, file, lines):
        self.file, self.lines, self.overrides = str(file), lines, {}
        self.given = set()  # the key paths `--set`s named

    def override(self, key_path, item):
        """Record that `--set item` replaced key_path (and everything the file had below it)."""
        for known in [p for p in self.lines if p[:len(key_path)] == key_path]:
            del self.lines[known]
        for n in range(1, len(key_path) + 1):
            if key_path[:n] not in self.lines:
                self.overrides.setdefault(key_path[:n], item)
        self.overrides[key_path] = item
        self.given.add(key_path)

    def set_by_override(self, key_path):
        """Whether a `--set` gave the field, itself or with a section above it."""
        return any(key_path[:n] in self.given for n in range(1, len(key_path) + 1))

    def forget(self, key_path):
        """The field is no longer in the study (a `--set` elsewhere displaced it): its line points nowhere."""
        self.lines.pop(key_path, None)

    def __call__(self, key_path):
        """'file:line' or '--set key=value' of the field, else of its nearest written parent, else 'file'."""
        for n in range(len(key_path), 0, -1):
            if key_path[:n] in self.overrides:
                return f"--set {self.overrides[key_path[:n]]}"
            if key_path[:n] in self.lines:
                return f"{self.file}:{self.lines[key_path[:n]]}"
        return self.file

    def written(self, key_path):
        """Whether the study gave the field itself (a line of its own or a `--set`), not its default."""
        return key_path in self.lines or key_path in self.overrides

    def error(self, key_path, message, at=None):
        """A StudyError for the field at key_path, located where it (or the field at `at`) was written."""
        return StudyError(f"{self(at or key_path)}: {_dotted(key_path)}: {message}")


def _defaults_to_null(key_path):
    """Whether the field at key_path takes null for its default (others refuse null, e.g. train.lr)."""
    spec = TOP_LEVEL.get(key_path[0]) if len(key_path) == 1 else SCHEMA.get(key_path[0], {}).get(key_path[-1])
    return len(key_path) <= 2 and isinstance(spec, tuple) and spec[0] is None


def _apply_override(tree, item, where):
    """Apply one `--set key=value` to the tree read from the file."""
    key, sep, value_text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise StudyError(f"--set {item}: expected key=value, e.g. --set train.lr=3e-4")
    if "" in key.split("."):  # `train.=1` replaced the whole train section
        raise StudyError(f"--set {item}: {key}: a key of dotted names, none empty, e.g. --set train.lr=3e-4")
    if not value_text.strip():  # YAML reads nothing as null: `--set output=$OUT` with OUT unset took the default
        default = f"{key}=null gives the default" if _defaults_to_null(_key_path(key)) else "give one"
        raise StudyError(f"--set {item}: {key}: no value (an unset shell variable?); {default}")
    try:
        value = parse_value(value_text, f"--set {item}: {key}")
    except yaml.YAMLError as err:
        raise StudyError(f"--set {item}: {key}: the value is not YAML: {getattr(err, 'problem', err)}") from None
    except RecursionError:
        raise StudyError(f"--set {item}: {key}: the value nests too deeply to read") from None
    key_path = _key_path(key)
    node = tree
    for n, part in enumerate(key_path[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise StudyError(f"--set {item}: {_dotted(key_path[:n + 1])} is not a section")
        node = node[part]
    node[key_path[-1]] = value
    where.override(key_path, item)
    # A fixed field's null (train.grad_clip=null) replaces its swept form as any value does; a sweep axis's null
    # removes the axis, and leaves the field as the file fixes it.
    if value is not None or key_path[0] != "sweep":
        _displace(tree, key_path, where)


def _displace(tree, key_path, where):
    """A train field given in one place by `--set` (fixed, train.X, or swept, sweep.train.X) takes it from the
    file's other place: `--set sweep.train.lr=[...]` sweeps a study file's fixed lr. Two `--set`s of one field
    both stand, and the study says to give it in one place."""
    if key_path[:1] == ("train",) and len(key_path) == 2:
        other = ("sweep", f"train.{key_path[1]}")
    elif key_path[:1] == ("sweep",) and len(key_path) == 2 and key_path[1].startswith("train."):
        other = ("train", key_path[1][len("train."):])
    else:
        return
    section = tree.get(other[0])
    if isinstance(section, dict) and other[1] in section and not where.set_by_override(other):
        del section[other[1]]
        where.forget(other)


#################################################################################
#                              Sections and defaults                            #
#################################################################################

def _unknown_key(key_path, known, where):
    """The error for a key the schema does not have, with the nearest known one."""
    hint = _key_hint(key_path, known) or f"; expected one of {', '.join(map(str, known))}"
    return where.error(key_path, f"unknown key{hint}")


def _key_hint(key_path, known):
    """"; did you mean ..." for an unknown key among known, or "": where a field of its name lives (MOVED), else the
    nearest known name, compared without the section's name (train.learning_rate is no nearer train.learn_sigma)."""
    head, dot, rest = key_path[0].partition(".")
    if len(key_path) == 1 and dot and TOP_LEVEL.get(head, ()) is None:  # `train.lr:`, a --set's spelling, in a file
        inside = SWEEP_AXES + tuple(f"train.{name}" for name in SWEPT_TRAIN) if head == "sweep" else SCHEMA[head]
        if rest in inside:
            return f"; write '{rest}:' under '{head}:'"
        return _axis_hint(rest) if head == "sweep" else _key_hint((head, rest), inside)
    moved = MOVED_IN.get(key_path[0], {}).get(key_path[-1]) or MOVED.get(key_path[-1])
    if moved:
        return f"; did you mean {moved!r}?"
    section = "".join(f"{k}." for k in key_path[:-1])
    return _did_you_mean(key_path[-1], {str(k): f"{section}{k}" for k in known})


def _axis_hint(key):
    """"; did you mean ..." for an unknown sweep axis, or "": a train field's axis, where a field of its name lives
    (MOVED), or the nearest axis, a train field's compared without its 'train.'."""
    name = key.removeprefix("train.")
    if key in SCHEMA["train"]:  # sweep: {lr: [...]}
        return f"; did you mean 'train.{key}'?"
    moved = MOVED.get(name, "")
    if moved.startswith("sweep.") or moved in {f"train.{n}" for n in SWEPT_TRAIN}:
        return f"; did you mean {moved.removeprefix('sweep.')!r}?"
    return _did_you_mean(name, {**{axis: axis for axis in SWEEP_AXES}, **{n: f"train.{n}" for n in SWEPT_TRAIN}})


def _check_field(key_path, value, check, where, default=...):
    """check(value), its complaint turned into a located StudyError (a refused null names the field's default)."""
    try:
        return check(value)
    except _Invalid as err:
        # YAML's null reads as "unset" to many: say how to get the default where null is no value of the field
        given_default = value is None and default is not ...
        unset = f"; leave {_dotted(key_path)} out for its default, {_shown(default)}" if given_default else ""
        raise where.error(key_path, f"{err}{unset}") from None


def _section(name, given, where):
    """A section's fields, checked and normalised, with defaults filled in."""
    fields = SCHEMA[name]
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise where.error((name,), f"expected a mapping of fields, got {_shown(given)}")
    for key in given:
        if key not in fields:
            raise _unknown_key((name, str(key)), fields, where)
    return {key: _check_field((name, key), given[key], check, where, default) if key in given
            else copy.deepcopy(default)
            for key, (default, check) in fields.items()}


def _sections(tree, where):
    """The whole study with every section filled in (the sweep is checked separately)."""
    for key in tree:
        if key not in TOP_LEVEL:
            raise _unknown_key((str(key),), TOP_LEVEL, where)
    raw = {}
    for key, spec in TOP_LEVEL.items():
        if key == "sweep":
            raw[key] = tree.get(key)
        elif spec is None:
            raw[key] = _section(key, tree.get(key), where)
        elif key in tree:
            raw[key] = _check_field((key,), tree[key], spec[1], where, ... if spec[0] is REQUIRED else spec[0])
        elif spec[0] is REQUIRED:
            raise where.error((key,), "missing (required)")
        else:
            raw[key] = spec[0]
    return raw


def _resolve_paths(raw, study_dir, where):
    """Make the study's own paths absolute: data and models relative to the study file, output to the cwd."""
    for section, key in STUDY_RELATIVE_PATHS:
        if raw[section][key] is not None:
            raw[section][key] = str(study_dir / _expanded(raw[section][key], where, (section, key)))
    raw["output"] = str(_expanded(raw["output"] or f"outputs/{raw['name']}", where, ("output",)).absolute())
    _check_output_outside_data(raw, where)
    tracking = raw["tracking"]
    uri = tracking["mlflow_uri"] or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{raw['output']}/mlflow.db"
    named_by = "" if tracking["mlflow_uri"] else " (MLFLOW_TRACKING_URI)"
    if problem := _sqlite_problem(uri):
        raise where.error(("tracking", "mlflow_uri"), f"{uri}{named_by}: {problem}")
    tracking["mlflow_uri"] = _absolute_sqlite(uri, where)
    tracking["experiment"] = tracking["experiment"] or raw["name"]


def _check_output_outside_data(raw, where):
    """The output must not be, or be in, a folder the study reads images from: an image folder would take it for a
    class of images (every trial refused the data as the run made the output), a reference folder would put the
    study's sample grids among FID's real images, and an encode into a latent folder replaces the folder whole."""
    try:
        output = Path(os.path.realpath(raw["output"]))  # through links, as far as the folders exist
        folders = {(section, key): Path(os.path.realpath(raw[section][key]))
                   for section, key in (("data", "path"), ("eval", "reference"), ("eval", "heldout"))
                   if raw[section][key] is not None}
    except OSError:  # a link that may not be read (someone else's folder): the checks of each path name it
        return
    for (section, key), real in folders.items():
        folder = raw[section][key]
        if output.is_relative_to(real):
            where_in = "" if output == real else "in "
            raise where.error(("output",), f"{raw['output']} is {where_in}{section}.{key} {folder}, which the study "
                                           "reads images from; give an output outside it")


def _expanded(path, where, key_path):
    """Path(path) with a leading ~ or ~user expanded; a user without a home folder here, or a name no file system
    holds (a NUL, text that is not the file system's encoding), is the field's error."""
    try:
        os.fsencode(path)
        if "\0" in str(path):
            raise ValueError("embedded null byte")
    except (ValueError, UnicodeError):  # a traceback later, where the path is first used
        raise where.error(key_path, f"{path!r}: not a file name (a NUL, or characters the file system cannot "
                                    "hold)") from None
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib's "Could not determine home directory."
        raise where.error(key_path, f"{path}: {str(path).split('/')[0]} has no home folder on this machine") from None


SQLITE_URI = re.compile(r"(sqlite(?:\+\w+)?:///)(.*)", re.S)  # SQLAlchemy's sqlite:/// or sqlite+DRIVER:///


def sqlite_parts(uri):
    """(file, query) of a `sqlite:///FILE?QUERY` (or `sqlite+pysqlite:///...`) tracking URI, as written (relative, or a
    URI filename); None if the URI is not one."""
    match = SQLITE_URI.fullmatch(uri)
    if match is None:
        return None
    file, _, query = match.group(2).partition("?")
    return file, query


def _sqlite_problem(uri):
    """Why a SQLite tracking URI cannot keep a study's runs (None if it can): no file, or one in memory."""
    file, query = sqlite_parts(uri) or (None, "")
    if re.fullmatch(r"sqlite(\+\w+)?://", uri) or file == "":
        return "names no file; give one, e.g. sqlite:////absolute/path/mlflow.db"
    # SQLite's URI filenames name memory too: file::memory:, file:name?mode=memory.
    if file == ":memory:" or (file or "").startswith("file:") and (file == "file::memory:" or "mode=memory" in query):
        return "an in-memory store is lost when the driver ends, and Ray's workers cannot reach it; give a file"
    return None


def _absolute_sqlite(uri, where):
    """A `sqlite:///relative/path` URI made absolute against the working directory, as the output is: SQLAlchemy reads
    it against whichever directory a process runs in (a replay's, `ray job submit`'s temporary one)."""
    path, query = sqlite_parts(uri) or ("", "")
    if not path or path.startswith((":", "/")) or path.startswith("file:"):
        return uri  # not SQLite, absolute, or a URI filename
    absolute = _expanded(path, where, ("tracking", "mlflow_uri")).absolute()
    return f"{SQLITE_URI.match(uri).group(1)}{absolute}" + (f"?{query}" if "?" in uri else "")


#################################################################################
#                                   The sweep                                   #
#################################################################################

def _model_sizes():
    """{'DiT-S': 'S', ...} of the registry, and its full names."""
    from core.models import DiT_models

    return {name.split("/")[0]: name.split("/")[0][len("DiT-"):] for name in DiT_models}, list(DiT_models)


def _model_name(with_patch_axis):
    """The check of one sweep.model entry: (size, patch or None)."""
    sizes, full_names = _model_sizes()

    def check(value):
        if not isinstance(value, str):
            raise _Invalid(f"expected a model name such as 'DiT-S', got {_shown(value)}")
        size_name, slash, patch = value.partition("/")
        if with_patch_axis and slash:
            raise _Invalid(f"{value!r} names a patch, but sweep.patch gives the patches: write {size_name!r}")
        if size_name not in sizes:
            raise _Invalid(f"unknown model {value!r}" + (_did_you_mean(value, full_names if slash else list(sizes))
                                                          or f"; known sizes: {', '.join(sizes)}"))
        if not slash:
            if with_patch_axis:
                return sizes[size_name], None
            raise _Invalid(f"{value!r} needs a patch size: write e.g. '{value}/2', or add sweep.patch")
        if not re.fullmatch(r"[1-9][0-9]*", patch):
            raise _Invalid(f"the patch of {value!r} must be a positive integer")
        return sizes[size_name], int(patch)
    return check


def _axis(key_path, values, check, where):
    """A sweep axis as a list of checked, distinct values (a single value is a list of one)."""
    if not isinstance(values, list):
        values = [values]
    if not values:
        raise where.error(key_path, "expected a non-empty list")
    checked, seen = [], {}
    for i, value in enumerate(values):
        value = _check_field(key_path + (i,), value, check, where)
        canonical = _canonical_json(value)
        if canonical in seen:  # [true, yes], [1e-3, 0.001]: written apart, the same value
            shown, first = _shown(values[i]), seen[canonical]
            as_first = "" if _shown(values[first]) == shown else f" ({_shown(values[first])})"  # [1, 1.0]
            raise where.error(key_path + (i,), f"duplicate value {shown}: the {_ordinal(i + 1)} entry repeats the "
                                               f"{_ordinal(first + 1)}{as_first}")
        seen[canonical] = i
        checked.append(value)
    return checked


def _ordinal(n):
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st."""
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _sweep(tree_sweep, raw_train_given, where):
    """{axis: values} of a checked sweep: model, patch (or None), steps or compute, and swept train fields."""
    if tree_sweep is None:
        raise where.error(("sweep",), "missing (required): give at least sweep.model and sweep.steps")
    if not isinstance(tree_sweep, dict):
        raise where.error(("sweep",), f"expected a mapping of axes, got {_shown(tree_sweep)}")
    swept_train = {f"train.{k}": k for k in SWEPT_TRAIN}
    for key in tree_sweep:
        if key not in SWEEP_AXES and key not in swept_train:
            if key in (f"train.{k}" for k in UNSWEPT):
                raise where.error(("sweep", key), "cannot be swept: it changes no result")
            if key == "train" and isinstance(tree_sweep[key], dict) and tree_sweep[key]:  # sweep: {train: {lr: ..}}
                fields = ", ".join(f"'train.{k}: [...]'" for k in tree_sweep[key])
                raise where.error(("sweep", key), f"a swept train field is an axis of its own, its key dotted: write "
                                                  f"{fields} under sweep")
            hint = _axis_hint(str(key))
            raise where.error(("sweep", key), "unknown axis" + (hint or f"; expected one of {', '.join(SWEEP_AXES)} "
                                                                         "or a train field such as train.lr"))
    given = {k: v for k, v in tree_sweep.items() if v is not None}  # null removes an axis (--set sweep.steps=null)
    if "model" not in given:
        raise where.error(("sweep", "model"), "missing (required)")
    if "steps" in given and "compute" in given:
        raise where.error(("sweep", "compute"), "give either sweep.steps or sweep.compute, not both")
    if "steps" not in given and "compute" not in given:
        raise where.error(("sweep", "steps"), "missing: give sweep.steps (or sweep.compute budgets in Gflops)")
    from core.train import MAX_STEPS  # core.train's own bound: Parquet's int64 steps and float compute stay exact

    axes = {
        "model": _axis(("sweep", "model"), given["model"], _model_name("patch" in given), where),
        "patch": _axis(("sweep", "patch"), given["patch"], integer(at_least=1), where) if "patch" in given else None,
        "steps": (_axis(("sweep", "steps"), given["steps"], integer(at_least=1, at_most=MAX_STEPS), where)
                  if "steps" in given else None),
        "compute": (_axis(("sweep", "compute"), given["compute"], number(above=0), where)
                    if "compute" in given else None),
    }
    for key, value in given.items():
        if key in swept_train:
            name = swept_train[key]
            if name in raw_train_given:
                raise where.error(("sweep", key), f"train.{name} is also set ({where(('train', name))}); "
                                                  "give it in one place")
            axes[key] = _axis(("sweep", key), value, SCHEMA["train"][name][1], where)
    return axes


#################################################################################
#                                   The data                                    #
#################################################################################

def _dataset_info(raw, where, check_data, warnings):
    """core.data's dataset_info, or (check_data=False) the registry's shapes and a warning when absent."""
    from core.data import dataset_info
    from core.models import PAPER_DEFAULTS

    data = raw["data"]
    name, path, image_size = data["dataset"], data["path"], data["image_size"]
    if name == "digits" and path is not None:
        raise where.error(("data", "path"), "the digits dataset is bundled with scikit-learn and takes no path")
    if name != "digits" and path is None:
        raise where.error(("data", "path"), f"the {name} dataset needs a path", at=("data", "dataset"))
    if name == "imagefolder" and image_size is None:
        raise where.error(("data", "image_size"), "the imagefolder dataset needs an image_size (pixels)",
                          at=("data", "dataset"))
    if name == "latents" and image_size is not None and image_size % 8:
        raise where.error(("data", "image_size"), f"must be a multiple of 8 (the VAE downsamples by 8), "
                                                  f"got {image_size}")
    try:
        return dataset_info(name, path=path, image_size=image_size)
    except (ValueError, OSError) as err:  # OSError: a missing path, or one in a folder that cannot be entered
        key = "image_size" if image_size is not None and "image_size" in str(err) else "path" if path else "dataset"
        if check_data or name == "digits":
            raise where.error(("data", key), str(err)) from None
        fallback = dict(PAPER_DEFAULTS, num_images=None, pixel_space=name == "imagefolder")
        if name == "latents" and image_size is not None:
            fallback["input_size"] = image_size // 8
        if name == "imagefolder":
            fallback.update(input_size=image_size, in_channels=3)
        warnings.append(f"{where(('data', key))}: data.{key}: {err}; assuming {fallback['input_size']}×"
                        f"{fallback['input_size']}×{fallback['in_channels']} inputs and "
                        f"{fallback['num_classes']} classes")
        return fallback


def _check_eval(raw, info, where, check_data, warnings):
    """Evaluation settings that depend on the data."""
    ev, dataset = raw["eval"], raw["data"]["dataset"]
    if ev["feature_extractor"] == "digits" and dataset != "digits" and ev["fid"]:
        if not where.written(("eval", "feature_extractor")):  # the default's problem: named where the data was set
            raise where.error(("data", "dataset"), f"{dataset} data needs eval.feature_extractor: "
                              "inception-v3-compat (its default, digits, only reads 8×8 digits)")
        raise where.error(("eval", "feature_extractor"), "the digits extractor only reads 8×8 digits; "
                                                         "use 'inception-v3-compat'")
    if not info["pixel_space"] and ev["vae"] is None and (ev["fid"] or ev["grid_images_per_class"]):
        raise where.error(("eval", "vae"), "a latent study needs a VAE to decode its samples for FID and grids")
    if dataset == "latents" and ev["fid"] and ev["reference"] is None:  # core.evaluate.check's rule, before training
        from core.real_images import LATENT_REFERENCE

        raise where.error(("eval", "reference"), f"FID on latents needs {LATENT_REFERENCE}")
    # A path this study never reads (FID off, no grids) is a warning: a study file written for a cluster, run
    # elsewhere with FID turned off, still starts.
    used = eval_files_read(ev)
    meta = None  # the latents' meta.json, which the VAE must fit: read when the data was (a fallback has no encode)
    if dataset == "latents" and ev["vae"] is not None and "encode" in info:
        from core.latents import read_meta

        meta = read_meta(raw["data"]["path"])
    # The VAE and Inception weights are loaded (seconds) only where the study checks its data and reads them.
    missing = {key: problem for key in ("vae", "feature_extractor_weights", "reference", "heldout")
               if ev[key] is not None and (problem := _eval_path_problem(
                   key, Path(ev[key]), ev["feature_extractor"], meta, load=check_data and used[key]))}
    if ev["fid"] and ev["feature_extractor"] != "digits" and ev["feature_extractor_weights"] is None:
        from core.fid import inception_weights, inception_weights_problem

        try:
            cached = inception_weights()  # torch-fidelity's cache: never downloaded during a study
        except FileNotFoundError as err:
            missing["feature_extractor_weights"] = str(err)
        else:
            if check_data and (problem := inception_weights_problem(cached)):
                missing["feature_extractor_weights"] = problem
    for key, message in missing.items():
        if check_data and used[key]:
            raise where.error(("eval", key), message)
        unread = "" if used[key] else f" (not read: eval.fid is false{' and no grids' if key == 'vae' else ''})"
        warnings.append(f"{where(('eval', key))}: eval.{key}: {message}{unread}")
    dim = feature_dim(ev["feature_extractor"])
    if ev["fid"] and ev["fid_samples"] <= dim:
        warnings.append(f"{where(('eval', 'fid_samples'))}: eval.fid_samples: FID from {ev['fid_samples']} images "
                        f"of {dim}-d features: their covariance is rank-deficient, so FID is biased upwards and "
                        f"noisy; use several times {dim} images")
    dropouts = raw["sweep"].get("train.class_dropout_prob") or [raw["train"]["class_dropout_prob"]]
    if ev["cfg_scale"] != 1.0 and 0 in dropouts:  # a model that never drops labels has no null class to guide by
        raise where.error(("eval", "cfg_scale"), f"guidance ({ev['cfg_scale']}) needs the null class, which "
                                                 f"train.class_dropout_prob 0 never trains; use cfg_scale 1")
    # Every swept chain, as each trial samples with its own and would fail only after training.
    swept = raw["sweep"].get("train.diffusion_steps")
    chains = swept or [raw["train"]["diffusion_steps"]]
    steps_given = any(("eval", "sampling_steps") == k for k in (*where.lines, *where.overrides))
    for chain in chains:
        # A default sampling_steps (no line of its own) is named where the chain was written.
        refused = ev["sampling_steps"] > chain or ev["sampler"] == "ddim" and chain % ev["sampling_steps"]
        if refused and not steps_given:
            raise where.error(("sweep", "train.diffusion_steps") if swept else ("train", "diffusion_steps"),
                              f"{chain} steps: {ev['sampler'].upper()} cannot sample eval.sampling_steps's "
                              f"{ev['sampling_steps']} (its default) from them; set eval.sampling_steps to "
                              + ("at most the chain's steps" if ev["sampling_steps"] > chain else "a divisor of them"))
        if ev["sampling_steps"] > chain:  # first: DDIM's divisibility message would hide the reason
            raise where.error(("eval", "sampling_steps"), f"{ev['sampling_steps']} is more than "
                                                          f"train.diffusion_steps ({chain})")
        if ev["sampler"] == "ddim" and chain % ev["sampling_steps"]:  # core.sampling's DDIM refuses them
            raise where.error(("eval", "sampling_steps"), f"DDIM takes every k-th of train.diffusion_steps "
                                                          f"({chain}) steps: {ev['sampling_steps']} does not divide it")


def eval_files_read(ev):
    """{eval file key: whether the trials read it}: FID's inputs with FID on, the VAE for FID or for grids."""
    return dict(vae=bool(ev["fid"] or ev["grid_images_per_class"]), feature_extractor_weights=ev["fid"],
                reference=ev["fid"], heldout=ev["fid"])


def cached_inception_weights(ev):
    """The driver's torch-fidelity cache of Inception-v3's weights, where the trials' FID reads that file (no
    eval.feature_extractor_weights); else None. The trials are given this path: a node's own cache (another
    $TORCH_HOME, another home) is not the file the driver checked."""
    if not ev["fid"] or ev["feature_extractor"] == "digits" or ev["feature_extractor_weights"] is not None:
        return None
    from core.fid import inception_weights_file

    return str(inception_weights_file())


def _eval_path_problem(key, path, extractor, meta=None, load=True):
    """What is wrong with an eval file or folder (None if nothing), found now rather than at the first evaluation.

    meta: the latent folder's meta.json, whose latents the VAE must decode. load: load the VAE and Inception's
    weights (seconds, and torch.load unpickles the latter), not only look at their files.
    """
    if key == "reference":
        from core.real_images import is_statistics_file, statistics_problem

        if is_statistics_file(path):  # an .npz of FID statistics (ADM's reference batch): read whatever load says
            return statistics_problem(path, feature_dim(extractor))  # mu and sigma, 32 MB at most: no waiting
    try:
        if not path.exists():
            return f"{path} does not exist"
    except OSError as err:  # in a folder that cannot be entered
        return f"{path}: {_reason(err)}"
    if key == "vae":  # diffusers' AutoencoderKL.from_pretrained folder: its config and one weights file
        try:
            json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as err:
            return f"{path} is not a diffusers model folder: config.json: {_reason(err)}"
        # The names from_pretrained reads (a sharded model: its index): an fp16 variant's alone is not loaded.
        if not any((path / f"diffusion_pytorch_model.{end}").is_file()
                   for end in ("safetensors", "bin", "safetensors.index.json", "bin.index.json")):
            return f"{path} is not a diffusers model folder: no diffusion_pytorch_model.safetensors (or .bin)"
        if not load:
            return None
        from core.latents import VAEError, load_vae, vae_fit_problem

        try:  # a few seconds for an ImageNet VAE: an encode or FID on random weights would cost hours
            vae = load_vae(path)
        except VAEError as err:
            return str(err)
        if meta is not None and (problem := vae_fit_problem(vae, meta)):
            return f"VAE folder {path}: {problem}"
    elif key == "feature_extractor_weights" and extractor == "digits":
        # core.fid_extractor reads them with the digits classifier's loader: a safetensors state dict of its network.
        from core.digits_classifier import load_digits_classifier

        try:
            load_digits_classifier(path)
        except (ValueError, OSError) as err:
            return (f"{path} is not the digits classifier's weights (a safetensors file of its state dict, as "
                    f"core/assets/digits_classifier.safetensors): {' '.join(str(err).split())}")
    elif key == "feature_extractor_weights":
        # torch.save's files: a zip archive, or (before torch 1.6, as torch-fidelity's Inception) a pickle stream.
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError as err:
            return f"{path}: {_reason(err)}"
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
            return f"{path} is not a PyTorch weights file"
        if load:
            from core.fid import inception_weights_problem

            return inception_weights_problem(path)
    else:  # an image folder, as core.real_images reads it
        from core.real_images import real_image_files

        try:
            samples = real_image_files(path)
        except (ValueError, OSError) as err:
            return str(err)
        if len(samples) < 2:  # core.real_images.folder_images refuses it too, but only at the first milestone
            return f"{path} holds {len(samples)} image; FID's statistics need at least 2 real images"
    return None


def _reason(err):
    return err.strerror if isinstance(err, OSError) and err.strerror else f"not JSON ({err})"


def feature_dim(extractor):
    """Width of the features an extractor gives FID: its covariance needs more images than that (core.fid's
    fid_feature_dim, which asks torch-fidelity's registry, without its import)."""
    if extractor == "digits":
        from core.digits_classifier import FEATURE_DIM

        return FEATURE_DIM
    return 2048  # Inception-v3's pool features (torch-fidelity's "2048" layer), not imported: it loads slowly


RAY_RESOURCE_UNIT = 0.0001  # ray._raylet.RESOURCE_UNIT_SCALING's inverse; not imported: the schema needs no Ray


def _check_resources(raw, where, warnings):
    """Resource settings that depend on one another; a share of a GPU that leaves part of each GPU idle, a warning."""
    res = raw["resources"]
    for key in ("cpus_per_worker", "gpus_per_worker"):  # Ray refused it as each trial's workers were made
        if 0 < res[key] < RAY_RESOURCE_UNIT:
            raise where.error(("resources", key), f"Ray's finest share is {RAY_RESOURCE_UNIT}; got {res[key]:g}")
    if res["gpus_per_worker"] == 0 and res["cpus_per_worker"] == 0:
        raise where.error(("resources", "cpus_per_worker"), "a worker without GPUs needs CPUs")
    # A worker trains on one GPU, cuda:LOCAL_RANK among those Ray lets it see (core.train, DeepSpeed).
    if res["gpus_per_worker"] > 1:
        raise where.error(("resources", "gpus_per_worker"), f"a worker trains on one GPU; {res['gpus_per_worker']:g} "
                                                            "would leave the others idle (more GPUs a trial: "
                                                            "workers_per_trial)")
    if 0 < res["gpus_per_worker"] < 1 and res["workers_per_trial"] > 1:
        raise where.error(("resources", "gpus_per_worker"), f"a share of a GPU ({res['gpus_per_worker']:g}) suits one "
                                                            "worker a trial: Ray may give two workers of a trial the "
                                                            "same GPU, which NCCL refuses")
    share = res["gpus_per_worker"]
    if 0 < share < 1:
        # Ray places a share within one GPU: 0.3 three times, and the 0.1 left of each GPU holds none.
        per_gpu = how_many_fit(1.0, share)
        idle = round(1 - per_gpu * share, 4)
        if idle > per_gpu * RAY_RESOURCE_UNIT:  # not 1/3 written as 0.3333, whose 0.0001 left is Ray's rounding
            whole = math.floor(1 / per_gpu / RAY_RESOURCE_UNIT) * RAY_RESOURCE_UNIT  # 1/3 as Ray's finest: 0.3333
            instead = f"{whole:g}" if round(whole * per_gpu, 4) == 1 else f"1/{per_gpu} ({whole:g})"
            warnings.append(f"{where(('resources', 'gpus_per_worker'))}: resources.gpus_per_worker: {share:g} of a GPU "
                            f"leaves {idle:g} of each GPU idle (Ray places each share within one GPU, which holds "
                            f"{per_gpu} of them): {instead} would use it all")


#################################################################################
#                                   Trials                                      #
#################################################################################

@dataclass(frozen=True)
class Trial:
    """One training run of the grid, evaluated at each of its milestones."""

    trial_id: str  # <model>-<patch>-<10 hex digits of the result hash>, e.g. DiT-S-2-3f9c1a2b7e; a recorded run's
    # when the trial continues it with more steps or its latents moved (scaling.continuation)
    model: str  # e.g. "DiT-S/2", with each architecture field that differs from its preset's: "DiT-S/2 depth=6"
    size: str  # e.g. "S"
    patch: int
    model_config: dict  # full DiT keyword arguments
    train: dict  # the train section with swept values applied, plus max_steps
    milestones: tuple  # sorted steps to evaluate at; the last is max_steps
    eval: dict
    data: dict
    gflops: float  # forward Gflops per image (paper convention)
    params: int
    swept: dict  # values of the swept train fields, e.g. {"train.lr": 3e-4}
    budgets: tuple = ()  # (training Gflops budget, steps) pairs this trial covers, for compute studies
    # The encode of data.path's latents it trains on (core.latents.encode_id): not in the id, which hashes the path
    # (a study must name its trials without the data at hand, as a dry run or a replay does), but recorded, so that
    # results measured on another encode of the folder are not taken for this one's. None for other data, or unread.
    data_encode: str = None

    def to_dict(self):
        return dataclasses.asdict(self)


def _canonical_json(value):
    """JSON with sorted keys: floats print as their shortest repr, so 1e-4 and 0.0001 are one string."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def result_hash(model_config, data, train, milestones, eval_section):
    """sha256 of everything that determines a trial's results (not resources, tracking, output or name).

    train and eval_section as `hashed_settings` gives them: the settings that change no result in a fixed value.
    """
    train = {k: v for k, v in train.items() if k not in BOOKKEEPING}
    payload = dict(model=model_config, data=data, train=train, milestones=list(milestones), eval=eval_section)
    return hashlib.sha256(_canonical_json(payload).encode()).hexdigest()


def training_lineage(trial, eval_paths=True):
    """sha256 of a trial's settings but where its data lies (data.path) and, under a constant lr, its step counts.

    Trials that share it train the same weights step for step on the same data: under a constant lr no step depends
    on how many follow, and evaluations draw on their own seeds (tests/test_train.py); a latent folder moved elsewhere
    holds the same data where it records the same encode (which scaling.continuation compares, as the lineage cannot).
    So a trial given more steps, or whose data moved, may go on from the checkpoint of a recorded run
    (scaling.continuation). The eval section's files (VAE, extractor weights, FID's real images) have no such
    identity: eval_paths=False leaves them out too, to find a run that read them elsewhere (the same files through a
    link go on; others are named to the user). trial: Trial.to_dict(), or
    results.parquet's config_json read back; KeyError when it lacks a setting (a row older than the setting).
    """
    train = trial["train"]
    config = trial["model_config"]
    info = {k: config[k] for k in ("input_size", "in_channels", "num_classes")}
    preset = _model_config(trial["size"], trial["patch"], {**train, **dict.fromkeys(ARCHITECTURE_FIELDS)}, info)
    hashed_train, hashed_eval = hashed_settings({"train": train, "eval": trial["eval"]}, train, config, preset)
    if not eval_paths:
        hashed_eval.update(dict.fromkeys(EVAL_PATHS))
    milestones = trial["milestones"]
    if train["lr_schedule"] == "constant":
        del hashed_train["max_steps"]
        milestones = ()
    return result_hash(config, {**trial["data"], "path": None}, hashed_train, milestones, hashed_eval)


def hashed_settings(raw, train, model_config, preset_config):
    """(train, eval) as a trial id hashes them: a setting that changes no result (NO_RESULT) as NO_RESULT_AS (or its
    schema default) whatever the study says, and an architecture field equal to the preset's as null (no override)."""
    sections = {"train": dict(train), "eval": dict(raw["eval"])}
    resolved = {**raw, "train": train}
    for (section, name), unused in NO_RESULT.items():
        if unused(resolved):
            sections[section][name] = NO_RESULT_AS.get((section, name), SCHEMA[section][name][0])
    for name in ARCHITECTURE_FIELDS:
        if model_config[name] == preset_config[name]:
            sections["train"][name] = None
    return sections["train"], sections["eval"]


def _model_config(size, patch, train, info):
    """Full DiT kwargs of a size at a patch, shaped for the data, with the study's architecture overrides."""
    from core.models import model_config, preset_name

    preset = preset_name(size, patch)
    overrides = dict(patch_size=patch, input_size=info["input_size"], in_channels=info["in_channels"],
                     num_classes=info["num_classes"], class_dropout_prob=train["class_dropout_prob"],
                     learn_sigma=train["learn_sigma"])
    overrides.update({k: train[k] for k in ARCHITECTURE_FIELDS if train[k] is not None})
    return model_config(preset, **overrides)


def model_name(size, patch, model_config, preset_config):
    """A trial's model: 'DiT-S/2', with each architecture field that differs from the preset's, 'DiT-S/2 depth=6'
    (the report groups measurements by this name: two widths of one preset must not share one)."""
    return f"DiT-{size}/{patch}" + "".join(f" {k}={model_config[k]}" for k in ARCHITECTURE_FIELDS
                                           if model_config[k] != preset_config[k])


@functools.lru_cache(maxsize=None)
def _params(config_json):
    """Exact parameter count, from the model built on the meta device (no memory, no time)."""
    from core.flops import params
    from core.models import meta_dit

    return params(meta_dit(**json.loads(config_json)))


def _check_point(train, workers, info, dataset, error_at):
    """Batch checks of one grid point; error_at(train field, message) makes the StudyError."""
    divisor = train["grad_accum"] * workers
    if train["batch_size"] % divisor:
        raise error_at("batch_size", f"{train['batch_size']} is not divisible by grad_accum × workers_per_trial "
                                       f"= {train['grad_accum']} × {workers}")
    items = info["num_images"] and info["num_images"] * (1 if dataset == "digits" else 2)  # folders add mirrors
    if items and train["batch_size"] > items:
        raise error_at("batch_size", f"{train['batch_size']} is larger than the dataset ({items} items)")


def _expand(raw, axes, info, where, warnings):
    """The trials of the grid: model × patch × swept train values, sharing step prefixes when the lr is constant.

    Grid points that resolve to one trial (an architecture field swept over null and its preset's value) are one
    trial, the first, with a warning.
    """
    from core.flops import gflops_from_config
    from core.models import check_shape

    swept = [key for key in axes if key.startswith("train.")]
    model_items = list(enumerate(axes["model"]))
    patch_items = list(enumerate(axes["patch"])) if axes["patch"] else [(None, None)]

    def error_at(name, message):
        key_path = ("sweep", f"train.{name}") if f"train.{name}" in axes else ("train", name)
        return where.error(key_path, message)

    from core.train import MAX_STEPS

    trials = {}  # trial id -> Trial
    for (m, (size, own_patch)), (p, patch) in itertools.product(model_items, patch_items):
        patch = own_patch if patch is None else patch
        for values in itertools.product(*(axes[key] for key in swept)):
            point = dict(zip(swept, values))
            train = {**raw["train"], **{key[len("train."):]: value for key, value in point.items()}}
            _check_point(train, raw["resources"]["workers_per_trial"], info, raw["data"]["dataset"], error_at)
            config = _model_config(size, patch, train, info)
            preset_config = _model_config(size, patch, {**train, **dict.fromkeys(ARCHITECTURE_FIELDS)}, info)
            try:
                check_shape(config["input_size"], config["patch_size"], config["hidden_size"],
                            config["num_heads"], config["depth"], config["mlp_ratio"])
            except ValueError as err:
                raise _shape_error(err, config, size, (m, p), axes, raw, where) from None
            gflops = gflops_from_config(**config)
            params = _params(_canonical_json(config))
            groups = _step_groups(axes, gflops, train)
            if groups[-1][0][-1] > MAX_STEPS:  # a compute budget far past any training run
                raise where.error(("sweep", "compute"), f"{max(axes['compute']):g} Gflops is {groups[-1][0][-1]:.3g} "
                                                        f"steps of DiT-{size}/{patch}, more than {MAX_STEPS:.0e}")
            shortest = groups[0][0][0]
            if train["warmup_steps"] > shortest:  # a scaling point measured before its lr ever reached train.lr
                raise error_at("warmup_steps", f"{train['warmup_steps']} is longer than the shortest run, "
                                               f"DiT-{size}/{patch}'s {shortest} steps: its lr would never reach "
                                               f"train.lr; shorten the warm-up or drop the short step counts")
            model = model_name(size, patch, config, preset_config)
            for milestones, budgets in groups:
                trial_train = {**train, "max_steps": milestones[-1]}
                hashed_train, hashed_eval = hashed_settings(raw, trial_train, config, preset_config)
                digest = result_hash(config, raw["data"], hashed_train, milestones, hashed_eval)
                trial_id = f"DiT-{size}-{patch}-{digest[:10]}"
                if trial_id in trials:
                    warnings.append(_same_trial_warning(trials[trial_id], point, where))
                    continue
                trials[trial_id] = Trial(
                    trial_id=trial_id, model=model, size=size, patch=patch,
                    model_config=config, train=trial_train, milestones=milestones, eval=dict(raw["eval"]),
                    data=dict(raw["data"]), gflops=gflops, params=params, swept=point, budgets=budgets,
                    data_encode=info.get("encode"))
    return list(trials.values())


def _same_trial_warning(first, point, where):
    """The warning for a grid point that is an earlier point's trial."""
    differ = [key for key in point if _canonical_json(point[key]) != _canonical_json(first.swept[key])]
    key = differ[0]
    return (f"{where(('sweep', key))}: sweep.{key}: {_shown(first.swept[key])} and {_shown(point[key])} make the same "
            f"trial of {first.model} ({first.trial_id}: {key.removeprefix('train.')} "
            f"{_shown(first.model_config.get(key.removeprefix('train.')))} is its preset's), which runs once")


def _step_groups(axes, gflops, train):
    """[(milestones, budgets)]: one group when the lr is constant (prefixes are shared), else one per step count.

    With compute budgets, each budget's steps are round(C / (3 × Gflops × batch)), at least 1; budgets
    that land on the same step count share it.
    """
    if axes["steps"] is not None:
        pairs = [(None, s) for s in axes["steps"]]
    else:
        # A budget past a float's steps stays inf, for the caller's bound to refuse (round() cannot take it).
        pairs = [(c, max(1, _round(c / (3 * gflops * train["batch_size"])))) for c in axes["compute"]]
    steps = sorted({s for _, s in pairs})

    def budgets(of_steps):
        return tuple((c, s) for c, s in pairs if c is not None and s in of_steps)
    if train["lr_schedule"] == "constant":
        return [(tuple(steps), budgets(steps))]
    return [((s,), budgets({s})) for s in steps]


def _round(x):
    """round(x), but inf stays inf."""
    return round(x) if math.isfinite(x) else x


def _shape_error(err, config, size, positions, axes, raw, where):
    """Point a core.models.check_shape error at the study field that the user can change."""
    message = str(err)
    m, p = positions
    culprit = ("sweep", "patch", p) if axes["patch"] else ("sweep", "model", m)
    if not message.startswith("patch_size"):
        for name in re.findall(r"\b(num_heads|hidden_size|depth|mlp_ratio)\b", message):
            if f"train.{name}" in axes:
                culprit = ("sweep", f"train.{name}")
                break
            if raw["train"][name] is not None:
                culprit = ("train", name)
                break
    data = raw["data"]["dataset"]
    s = config["input_size"]
    return where.error(culprit, f"{message} (DiT-{size}/{config['patch_size']} on {data}, "
                                f"{s}×{s}×{config['in_channels']})")


#################################################################################
#                                   The study                                   #
#################################################################################

@dataclass
class Study:
    """A validated study: its resolved settings and its trials."""

    name: str
    path: Path
    raw: dict  # every field, defaults filled, paths absolute, overrides applied
    output: Path
    trials: list
    dataset_info: dict
    warnings: list = field(default_factory=list)  # e.g. a dataset absent when check_data=False
    locations: Locations = field(default=None, repr=False, compare=False)

    def resolved_yaml(self):
        """The fully resolved study as YAML (an MLflow artifact, and <output>/study.yaml): it loads as this study."""
        raw = copy.deepcopy(self.raw)
        for key in raw["sweep"]:
            if key.startswith("train."):  # a swept field's default in train would clash with its axis
                raw["train"].pop(key.removeprefix("train."), None)
        return yaml.dump(raw, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)

    def locate(self, dotted):
        """Where a field was written: 'file:line', '--set key=value', or the file for a default."""
        return self.locations(_key_path(dotted))

    def given(self, dotted):
        """Whether the study file or a `--set` gives the field (else it has its default)."""
        key_path = _key_path(dotted)
        return key_path in self.locations.lines or key_path in self.locations.overrides


def load_study(path, overrides=(), check_data=True):
    """Read, override, validate and expand a study file. Raises StudyError; writes nothing.

    With check_data=False (for --dry-run) a missing dataset or model file is a warning in
    `study.warnings` and the registry's shapes stand in for the data's.
    """
    tree, lines = _read_yaml(path)
    where = Locations(path, lines)
    for item in overrides:
        _apply_override(tree, item, where)
    raw = _sections(tree, where)
    train_given = tree.get("train") or {}
    axes = _sweep(raw["sweep"], train_given, where)
    raw["sweep"] = {key: _sweep_yaml(key, values) for key, values in axes.items() if values is not None}
    _resolve_paths(raw, Path(path).absolute().parent, where)
    warnings = []
    _check_resources(raw, where, warnings)
    info = _dataset_info(raw, where, check_data, warnings)
    _check_eval(raw, info, where, check_data, warnings)
    trials = _expand(raw, axes, info, where, warnings)
    return Study(name=raw["name"], path=Path(path), raw=raw, output=Path(raw["output"]), trials=trials,
                 dataset_info=info, warnings=warnings, locations=where)


def _sweep_yaml(key, values):
    """A sweep axis as it reads in the resolved study."""
    if key != "model":
        return values
    return [f"DiT-{size}" if patch is None else f"DiT-{size}/{patch}" for size, patch in values]


def launch_order(trials):
    """The order trials are launched in: largest training compute first, so the longest start at once and the
    short ones fill in around them."""
    return sorted(trials, key=lambda t: -t.gflops * t.train["batch_size"] * t.train["max_steps"])


def max_concurrent_trials(study, resources, nodes=None, counts=None):
    """As many trials as the cluster's resources hold at once: no GPU idles while trials wait (trials_that_fit, at
    least one), or resources.max_concurrent_trials where the study gives it."""
    res = study.raw["resources"]
    if res["max_concurrent_trials"]:
        return res["max_concurrent_trials"]
    return max(1, trials_that_fit(study, resources, nodes, counts))


def trials_that_fit(study, resources, nodes=None, counts=None):
    """How many of the study's trials the cluster's resources hold at once, 0 where none (whatever
    resources.max_concurrent_trials says). nodes (and counts, worker_slots'): each worker is placed whole on one node,
    so the cluster holds no more trials than its nodes hold workers (a 64-CPU head beside 8-GPU nodes holds none of a
    GPU trial's workers)."""
    res = study.raw["resources"]
    workers = res["workers_per_trial"]
    fits = [how_many_fit(resources.get("CPU", 0), workers * res["cpus_per_worker"])] if res["cpus_per_worker"] else []
    if res["gpus_per_worker"]:
        fits.append(resource_fit(resources.get("GPU", 0), workers * res["gpus_per_worker"], "GPU"))
    if nodes is not None:
        fits.append(worker_slots(study, nodes, counts) // workers)
    return min(fits or [1])


def worker_request(resources):
    """What one worker asks Ray for ({"CPU": 1.0, "GPU": 1.0}), of a study's resources section; none of a zero."""
    return {r: resources[key] for key, r in (("cpus_per_worker", "CPU"), ("gpus_per_worker", "GPU")) if resources[key]}


def worker_slots(study, nodes, counts=None):
    """How many of the study's workers the nodes hold at once (each worker whole on one node); counts: how many
    there may be of each of nodes (an autoscaler's node types; UNLIMITED: no limit), one each where None."""
    res = study.raw["resources"]
    worker = worker_request(res)
    if not worker:  # asks for nothing: Ray places any number of them on a node
        return UNLIMITED
    slots = 0
    for node, count in zip(nodes, counts or [1] * len(nodes), strict=True):
        fit = node_holds(node, worker)
        if fit and count >= UNLIMITED:
            return UNLIMITED
        slots += fit * count
    return slots


def how_many_fit(have, need):
    """How many times need fits in have, as Ray counts resources (to 1e-4): 1.0 CPU holds ten workers of 0.1, where
    floating point's 1.0 // 0.1 is 9."""
    return math.floor(round(have / need, 4))


def resource_fit(have, need, resource):
    """How many times need of the resource fits in have, as Ray places it: a share of a GPU (under 1) lies within one
    GPU, so each GPU holds floor(1 / share) of them (0.3: three, 0.1 of each GPU idle), where have / need pooled the
    GPUs' leftovers (8 GPUs: 24 shares of 0.3, not 26)."""
    if resource == "GPU" and need < 1:
        return math.floor(round(have, 4)) * how_many_fit(1.0, need)
    return how_many_fit(have, need)


def node_holds(node, worker):
    """How many workers of the request worker (worker_request's) one node (its resources) holds at once."""
    return min(resource_fit(node.get(r, 0.0), n, r) for r, n in worker.items())


def workers_per_node(study, nodes, concurrent_trials):
    """The most of the study's workers one node runs at once (nodes: the resources of each node up, as ray.nodes()
    gives them, and of each node type an autoscaler may add), with concurrent_trials trials at a time: the processes
    of a node that may each hold the data in memory."""
    res = study.raw["resources"]
    worker = worker_request(res)
    most = concurrent_trials * res["workers_per_trial"]
    if not worker:  # asks for nothing: Ray places any number of them on a node
        return most
    fits = [node_holds(node, worker) for node in nodes]
    # No node up holds one (an autoscaler adds them): as many as could come together.
    return min(max(fits, default=0) or most, most)


def check_cluster(study, cluster_resources, nodes=(), autoscaled=False, counts=None):
    """Raise StudyError when one trial needs more GPUs or CPUs than the cluster has (ray.cluster_resources()), or
    one of its workers more than any node has (nodes: each live node's resources, from ray.nodes()), or its workers
    more than the nodes hold together: Ray would wait for such nodes for ever, the trial started and at step 0,
    and say so only in the trial's own log. autoscaled: cluster_resources are the most the cluster's autoscaler
    lets it grow to, and nodes include the node types it may add (scaling.autoscaler_limits), counts how many of
    each (worker_slots')."""
    res = study.raw["resources"]
    workers = res["workers_per_trial"]
    has = "grows to at most" if autoscaled else "has"
    for key, resource in (("gpus_per_worker", "GPU"), ("cpus_per_worker", "CPU")):
        need, have = workers * res[key], float(cluster_resources.get(resource, 0.0))
        if need and how_many_fit(have, need) < 1:  # to 1e-4, as Ray counts: 3 × 1.1 is 3.3000000000000003 > 3.3
            raise study.locations.error(("resources", key), f"a trial needs {workers} × {res[key]:g} = {need:g} "
                                                             f"{resource}s, the cluster {has} {have:g}"
                                                             + (" with what its autoscaler may add" if autoscaled
                                                                else ""))
    worker = worker_request(res)
    if not nodes:
        return
    if any(node_holds(node, worker) for node in nodes):
        slots = worker_slots(study, nodes, counts)
        if slots < workers:  # each fits somewhere, not all of them at once
            raise study.locations.error(
                ("resources", "workers_per_trial"),
                f"a trial's {workers} workers need {' and '.join(f'{n:g} {r}s' for r, n in worker.items())} each on "
                f"one node; the cluster's nodes " + ("and the node types its autoscaler adds " if autoscaled else "")
                + f"hold {slots} such worker(s) at once")
        return
    short = next((r for r, n in worker.items() if not any(resource_fit(node.get(r, 0.0), n, r) for node in nodes)),
                 "CPU")
    sizes = sorted({" and ".join(f"{node.get(r, 0.0):g} {r}s" for r in worker) for node in nodes})
    raise study.locations.error(
        ("resources", "gpus_per_worker" if short == "GPU" else "cpus_per_worker"),
        f"a worker needs {' and '.join(f'{n:g} {r}s' for r, n in worker.items())} on one node; the cluster's nodes "
        + ("and the node types its autoscaler adds " if autoscaled else "") + f"have {', '.join(sizes)}")
