"""FID, KID, precision / recall and Inception Score through torch-fidelity, with the real features cached on disk.

The real set's features and FID statistics are cached by torch-fidelity itself (`cache_root`,
`input2_cache_name`) under a name that hashes everything that determines them: the set's identity
(core.real_images), the feature extractor, a digest of its weights and torch-fidelity's version.
Generated images are never cached. The paper's sFID (spatial Inception features) has no
torch-fidelity extractor layer and is not reported.
"""
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from core.digits_classifier import WEIGHTS_PATH as DIGITS_WEIGHTS
from core.fid_extractor import DIGITS_EXTRACTOR, metric_kwargs, register
from core.latents import one_line
from core.precision import ieee_products
from core.real_images import RealImages

INCEPTION = "inception-v3-compat"
EXTRACTORS = ("digits", INCEPTION)  # the names a config uses
CACHE_FORMAT = 1  # bump when what a cache entry holds changes

# Our result key -> (torch-fidelity metric switch, torch-fidelity result key).
METRICS = {
    "fid": ("fid", torch_fidelity.KEY_METRIC_FID),
    "kid": ("kid", torch_fidelity.KEY_METRIC_KID_MEAN),
    "precision": ("prc", torch_fidelity.KEY_METRIC_PRECISION),
    "recall": ("prc", torch_fidelity.KEY_METRIC_RECALL),
    "inception_score": ("isc", torch_fidelity.KEY_METRIC_ISC_MEAN),
}

FID_NOTES = {
    DIGITS_EXTRACTOR: "Fréchet distance in the digits classifier's 64-d penultimate features "
                      "(not Inception-v3): not comparable to ImageNet FID",
    INCEPTION: "Fréchet distance in Inception-v3 pool features (torch-fidelity inception-v3-compat)",
}


def inception_weights_file():
    """Where torch-fidelity's download of the Inception-v3 weights lies: torch.hub's checkpoint folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def inception_weights(path=None):
    """The local Inception-v3 weights: `path` (which must exist), else torch-fidelity's cached download.

    Never downloads: offline nodes and tests must not reach for the network in the middle of a study.
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception-v3 weights not found at {path} (eval.feature_extractor_weights); "
                                    f"download {URL_INCEPTION_V3} to that path")
        return path
    cached = inception_weights_file()
    if not cached.is_file():
        raise FileNotFoundError(f"Inception-v3 weights for FID not found: put {URL_INCEPTION_V3} at {cached} "
                                "(torch-fidelity's cache; $TORCH_HOME moves it) or set "
                                "eval.feature_extractor_weights to a local copy")
    return cached


def inception_weights_problem(path):
    """Why torch-fidelity's Inception-v3 cannot be built from the weights file at path (None if it can).

    torch-fidelity reads the file only when it scores a trial's samples, after training and sampling; this builds
    the network once (a few seconds on a CPU), so a study can refuse another network's weights or a damaged file
    before it starts.
    """
    from torch_fidelity.utils import create_feature_extractor

    try:
        create_feature_extractor(INCEPTION, ["2048"], cuda=False, verbose=False,
                                 feature_extractor_weights_path=str(path))
    # Deliberately broad: torch.load of an arbitrary file raises what its unpickling meets (zip, pickle, EOF, key and
    # attribute errors), and load_state_dict a RuntimeError; each means the file is not these weights.
    except Exception as err:
        return f"{path} is not torch-fidelity's Inception-v3 weights ({URL_INCEPTION_V3}): {one_line(err)}"
    return None


def resolve_extractor(name, weights=None):
    """(torch-fidelity extractor name, local weights file) of a config's feature extractor; raises before any work."""
    if name == "digits":
        register()
        weights = Path(weights).expanduser() if weights is not None else DIGITS_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"digits classifier weights not found: {weights} (eval.feature_extractor_weights)")
        return DIGITS_EXTRACTOR, weights
    if name == INCEPTION:
        return INCEPTION, inception_weights(weights)
    raise ValueError(f"feature_extractor must be one of {EXTRACTORS}, got {name!r}")


@lru_cache(maxsize=8)
def _file_digest(path, size, mtime_ns):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_digest(path):
    """sha256 of a file (remembered per size and mtime: the 91 MB Inception weights are hashed once a process)."""
    st = os.stat(path)
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


def cache_name(real, extractor, weights):
    """The torch-fidelity cache name of a real set's features: a hash of all that determines them."""
    key = dict(format=CACHE_FORMAT, real=real.identity, extractor=extractor, weights=file_digest(weights),
               torch_fidelity=torch_fidelity.__version__)
    return "dit-scaling-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20], key


def supports(extractor, metric):
    """Whether a torch-fidelity extractor has a feature layer for a metric ("fid", "kid", "prc", "isc")."""
    try:
        return FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric(metric) is not None
    except (KeyError, NotImplementedError):
        return False


def fidelity_kwargs(extractor, weights, n1, n2, cuda):
    """calculate_metrics keyword arguments sized for n1 images against n2 (KID subsets, PRC neighbourhood)."""
    n = min(n1, n2)
    if extractor == DIGITS_EXTRACTOR:
        kwargs = metric_kwargs(n, cuda)
    else:
        kwargs = dict(feature_extractor=extractor, kid_subset_size=min(1000, max(2, n // 2)),
                      prc_neighborhood=min(3, n - 1), batch_size=256 if cuda else 64,
                      cuda=cuda, verbose=False)
    # One process: images in memory need no DataLoader workers, and PRC then goes batch by batch
    # instead of holding N × N distances (the whole matrix is 10 GB at FID-50K).
    kwargs.update(feature_extractor_weights_path=str(weights), save_cpu_ram=True, isc_splits=min(10, n1))
    return kwargs


def fidelity(images, real, *, extractor, weights, cache_root, cuda=False, metrics=tuple(METRICS)):
    """The requested metrics of images against a real set (RealImages); None where the extractor has no layer.

    images: a Dataset of uint8 (3, H, W) (generated: never cached) or RealImages (the held-out set
    of the noise floor: cached like the reference).
    """
    cache_root = Path(cache_root).expanduser()
    cache_root.mkdir(parents=True, exist_ok=True)
    switches = {METRICS[m][0] for m in metrics if supports(extractor, METRICS[m][0])}
    kwargs = fidelity_kwargs(extractor, weights, len(images), len(real), cuda)
    kwargs.update(cache=True, cache_root=str(cache_root), input2_cache_name=_cache_entry(cache_root, real, extractor,
                                                                                          weights))
    if isinstance(images, RealImages):
        kwargs["input1_cache_name"] = _cache_entry(cache_root, images, extractor, weights)
        images = images.dataset
    with ieee_products():  # one numeric mode for every set's features, whatever the trial's precision (cached ones too)
        out = torch_fidelity.calculate_metrics(input1=images, input2=real.dataset,
                                               **{s: s in switches for s in ("fid", "kid", "prc", "isc")}, **kwargs)
    return {m: float(out[key]) if key in out else None for m, (_, key) in METRICS.items() if m in metrics}


def _cache_entry(cache_root, real, extractor, weights):
    """The cache name of a real set, with a readable note of what it hashes beside torch-fidelity's .pt files."""
    name, key = cache_name(real, extractor, weights)
    note = cache_root / f"{name}.json"
    if not note.exists():
        tmp = note.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(key, indent=1, sort_keys=True))
        os.replace(tmp, note)
    return name
