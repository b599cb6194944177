"""FID, KID, precision / recall and Inception Score through torch-fidelity, with the real features cached on disk.

The real set's features and FID statistics are cached by torch-fidelity itself (`cache_root`,
`input2_cache_name`) under a name that hashes everything that determines them: the set's identity
(core.real_images), the feature extractor, a digest of its weights and torch-fidelity's version.
Generated images are never cached. The paper's sFID (spatial Inception features) has no
torch-fidelity extractor layer and is not reported.

A reference given as FID statistics (core.real_images.ReferenceStatistics: ADM's reference batch)
has its mu and sigma compared with the generated images' statistics by torch-fidelity's own
Fréchet distance, and its images (arr_0), where it has them, serve KID and precision / recall as
a reference folder's would; the features of both sets are extracted once, by torch-fidelity.
"""
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics_cached, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import (create_feature_extractor, extract_featuresdict_from_input_id_cached,
                                  get_cacheable_input_name, resolve_feature_layer_for_metric)

from core.digits_classifier import FEATURE_DIM as DIGITS_FEATURE_DIM
from core.digits_classifier import WEIGHTS_PATH as DIGITS_WEIGHTS
from core.fid_extractor import DIGITS_EXTRACTOR, metric_kwargs, register
from core.latents import one_line
from core.precision import ieee_products
from core.real_images import RealImages, ReferenceStatistics

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


def fid_feature_dim(extractor):
    """Width D of the features FID reads from a torch-fidelity extractor: a statistics file's mu (D,), sigma (D, D)."""
    if extractor == DIGITS_EXTRACTOR:
        return DIGITS_FEATURE_DIM  # the classifier's penultimate layer (core.fid_extractor.PENULTIMATE)
    # torch-fidelity names Inception-v3's pool features, FID's layer, by their width: "2048".
    return int(FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid"))


def supports(extractor, metric):
    """Whether a torch-fidelity extractor has a feature layer for a metric ("fid", "kid", "prc", "isc")."""
    if extractor == DIGITS_EXTRACTOR:  # ours, registered on first use: unregistered, it had none (and fidelity() no
        register()                     # metric to compute)
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
    """The requested metrics of images against a real set (RealImages) or FID statistics (ReferenceStatistics);
    None where the extractor has no layer, or the statistics no images for KID and precision / recall.

    images: a Dataset of uint8 (3, H, W) (generated: never cached) or RealImages (the held-out set
    of the noise floor: cached like the reference).
    """
    cache_root = Path(cache_root).expanduser()
    cache_root.mkdir(parents=True, exist_ok=True)
    if isinstance(real, ReferenceStatistics):
        return _against_statistics(images, real, extractor=extractor, weights=weights, cache_root=cache_root,
                                   cuda=cuda, metrics=metrics)
    switches = {METRICS[m][0] for m in metrics if supports(extractor, METRICS[m][0])}
    kwargs = fidelity_kwargs(extractor, weights, len(images), len(real), cuda)
    kwargs.update(cache=True, cache_root=str(cache_root), **_inputs(1, images, cache_root, extractor, weights),
                  **_inputs(2, real, cache_root, extractor, weights))
    with ieee_products():  # one numeric mode for every set's features, whatever the trial's precision (cached ones too)
        out = torch_fidelity.calculate_metrics(**{s: s in switches for s in ("fid", "kid", "prc", "isc")}, **kwargs)
    return {m: float(out[key]) if key in out else None for m, (_, key) in METRICS.items() if m in metrics}


def _inputs(slot, images, cache_root, extractor, weights):
    """torch-fidelity's input<slot> keyword arguments: a Dataset, and for a real set (RealImages) its cache name."""
    if not isinstance(images, RealImages):
        return {f"input{slot}": images}
    return {f"input{slot}": images.dataset, f"input{slot}_cache_name": _cache_entry(cache_root, images, extractor,
                                                                                   weights)}


def _against_statistics(images, reference, *, extractor, weights, cache_root, cuda, metrics):
    """fidelity() against ReferenceStatistics: FID of the images' statistics against the file's mu and sigma, KID and
    precision / recall against its images (None without them), the Inception Score of the images alone.

    torch-fidelity's calculate_metrics takes two sets of images; this is its pipeline with the second set's FID
    statistics given: its feature extraction (cached for real sets), statistics and metric functions.
    """
    real = reference.images  # RealImages of the file's arr_0, or None
    wanted = {METRICS[m][0] for m in metrics if supports(extractor, METRICS[m][0])}
    if real is None:
        wanted -= {"kid", "prc"}
    if not wanted:  # kid alone, say, without the file's images: torch-fidelity refuses a call that computes nothing
        return {m: None for m in metrics if m in METRICS}
    kwargs = fidelity_kwargs(extractor, weights, len(images), len(real) if real is not None else len(images), cuda)
    kwargs.update(cache=True, cache_root=str(cache_root), **{s: s in wanted for s in ("fid", "kid", "prc", "isc")},
                  **_inputs(1, images, cache_root, extractor, weights))
    if wanted & {"kid", "prc"}:
        kwargs.update(_inputs(2, real, cache_root, extractor, weights))
    layers = {s: resolve_feature_layer_for_metric(s, **kwargs) for s in wanted}
    out = {}
    with ieee_products():  # as fidelity()'s: the same features, cached or not, for either kind of reference
        network = create_feature_extractor(extractor, sorted(set(layers.values())), **kwargs)
        features = extract_featuresdict_from_input_id_cached(1, network, **kwargs)  # {layer: (N, D)}
        if "fid" in wanted:
            stats = fid_featuresdict_to_statistics_cached(features, get_cacheable_input_name(1, **kwargs), network,
                                                          layers["fid"], **kwargs)
            out.update(fid_statistics_to_metric(_float64(stats), dict(mu=reference.mu, sigma=reference.sigma),
                                                verbose=False))
        if "isc" in wanted:
            out.update(isc_featuresdict_to_metric(features, layers["isc"], **kwargs))
        if wanted & {"kid", "prc"}:
            real_features = extract_featuresdict_from_input_id_cached(2, network, **kwargs)  # {layer: (M, D)}
            if "kid" in wanted:
                out.update(kid_featuresdict_to_metric(features, real_features, layers["kid"], **kwargs))
            if "prc" in wanted:
                out.update(prc_featuresdict_to_metric(features, real_features, layers["prc"], **kwargs))
    return {m: float(out[key]) if key in out else None for m, (_, key) in METRICS.items() if m in metrics}


def _float64(stats):
    """FID statistics in float64, as a statistics file's (torch-fidelity's mu is float32, and its Fréchet distance
    takes both sides in one dtype)."""
    return {key: np.asarray(value, np.float64) for key, value in stats.items()}


def _cache_entry(cache_root, real, extractor, weights):
    """The cache name of a real set, with a readable note of what it hashes beside torch-fidelity's .pt files."""
    name, key = cache_name(real, extractor, weights)
    note = cache_root / f"{name}.json"
    if not note.exists():
        tmp = note.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(key, indent=1, sort_keys=True))
        os.replace(tmp, note)
    return name
