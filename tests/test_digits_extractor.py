"""The digits FID extractor: shipped classifier accuracy, deterministic training, FID through torch-fidelity."""
import json

import numpy as np
import pytest
import torch
import torch_fidelity

from core.digits import digits_arrays
from core.digits_classifier import WEIGHTS_PATH, load_digits_classifier
from core.fid_extractor import DIGITS_EXTRACTOR, LOGITS, PENULTIMATE, UInt8ImageDataset, metric_kwargs, register
from core.train_digits_classifier import MIN_ACCURACY, accuracy, train


def fidelity(images1, images2, **overrides):
    """calculate_metrics of two image sets in [-1, 1] with the digits extractor, all four metrics unless overridden."""
    kwargs = {"fid": True, "kid": True, "prc": True, "isc": True, **metric_kwargs(min(len(images1), len(images2))),
              **overrides}
    return torch_fidelity.calculate_metrics(input1=UInt8ImageDataset(images1), input2=UInt8ImageDataset(images2),
                                            **kwargs)


@pytest.fixture(scope="module")
def heldout():
    return digits_arrays("heldout")[0]  # (297, 1, 8, 8)


@pytest.fixture(scope="module")
def train_subset(heldout):
    images = digits_arrays("train")[0]
    return images[np.random.default_rng(0).choice(len(images), len(heldout), replace=False)]  # (297, 1, 8, 8)


def test_shipped_weights_reach_accuracy():
    assert WEIGHTS_PATH.is_file() and WEIGHTS_PATH.stat().st_size < 1_000_000
    assert accuracy(load_digits_classifier(), "heldout") >= MIN_ACCURACY


def test_training_is_deterministic():
    settings = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    a, b = train(epochs=1, seed=0).state_dict(), train(epochs=1, seed=0).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == settings  # restored


def test_register_is_idempotent():
    register()
    register()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    assert DIGITS_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY


def test_fid_real_small_noise_large(heldout, train_subset):
    real = fidelity(train_subset, heldout)
    noise = torch.rand(len(heldout), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fake = fidelity(noise, heldout)
    fid = torch_fidelity.KEY_METRIC_FID
    assert 0 < real[fid] and fake[fid] > 10 * real[fid]
    assert fake[torch_fidelity.KEY_METRIC_KID_MEAN] > real[torch_fidelity.KEY_METRIC_KID_MEAN]
    assert real[torch_fidelity.KEY_METRIC_PRECISION] > 0.7 > fake[torch_fidelity.KEY_METRIC_PRECISION]
    assert real[torch_fidelity.KEY_METRIC_RECALL] > 0.7 > fake[torch_fidelity.KEY_METRIC_RECALL]
    assert real[torch_fidelity.KEY_METRIC_ISC_MEAN] > 6  # ten well-separated classes: close to 10


def frechet_distance(a, b):
    """The Fréchet distance of two Gaussians fitted to feature rows a and b, in float64.

    tr √(Σa Σb) as the sum of the square roots of the eigenvalues of the symmetric √Σa Σb √Σa, which is stable where
    features that are always 0 (a ReLU's) make the covariances singular.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    tr_root = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_root)


def penultimate_features(images):
    """The classifier's 64-d features of images in [-1, 1], quantised to uint8 as torch-fidelity's inputs are."""
    x = torch.from_numpy(np.asarray(images)).float()
    x = ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # (N, 1, 8, 8): the uint8 image, back in [-1, 1]
    with torch.no_grad():
        features, logits = load_digits_classifier().forward_features(x)
    assert features.shape == (len(x), 64) and logits.shape == (len(x), 10)
    return features.numpy()


def test_fid_is_the_frechet_distance_of_the_penultimate_features(heldout, train_subset):
    fid = torch_fidelity.KEY_METRIC_FID
    noise = torch.rand(len(heldout), 1, 8, 8, generator=torch.Generator().manual_seed(0)).numpy() * 2 - 1
    for images in (train_subset, noise):
        expected = frechet_distance(penultimate_features(images), penultimate_features(heldout))
        assert fidelity(images, heldout, kid=False, prc=False, isc=False)[fid] == pytest.approx(expected, rel=1e-5)


def test_enlarged_images_give_the_same_fid(heldout, train_subset):
    # Area downscaling of a nearest ×4 enlargement recovers the 8×8 digit exactly.
    big = torch.from_numpy(train_subset).repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # (N, 1, 32, 32)
    fid = torch_fidelity.KEY_METRIC_FID
    assert fidelity(big, heldout)[fid] == pytest.approx(fidelity(train_subset, heldout)[fid], rel=1e-5)


def test_feature_layers(heldout):
    register()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    extractor = FEATURE_EXTRACTORS_REGISTRY[DIGITS_EXTRACTOR](DIGITS_EXTRACTOR, [PENULTIMATE, LOGITS])
    images = UInt8ImageDataset(heldout[:5]).images  # (5, 3, 8, 8) uint8
    features, logits = extractor(images)
    assert features.shape == (5, 64) and logits.shape == (5, 10)
    # The classifier's own penultimate layer and logits, on the grey channel back in its [-1, 1] training range.
    grey = images[:, :1].float() / 127.5 - 1.0  # (5, 1, 8, 8)
    with torch.no_grad():
        expected = load_digits_classifier().forward_features(grey)
    assert torch.equal(features, expected[0]) and torch.equal(logits, expected[1])
    # Held-out digits are classified as the classifier was trained to: not a random network's features.
    assert (logits.argmax(1) == torch.as_tensor(digits_arrays("heldout")[1][:5])).all()


def test_missing_weights_name_the_path(tmp_path, heldout):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_digits_classifier(missing)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):  # also through torch-fidelity
        fidelity(heldout, heldout, feature_extractor_weights_path=str(missing))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(WEIGHTS_PATH.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_digits_classifier(corrupt)


def test_fidelity_on_digits_in_a_fresh_process_computes_its_metrics(tmp_path, fresh_process_env):
    # fidelity() chose its metrics by the registry before it registered the digits extractor: a process that had not
    # registered it yet (a benchmark, a notebook) asked torch-fidelity for no metric ("At least one metric must be
    # specified"). evaluate() registered it first, by chance of its order.
    import subprocess
    import sys
    from pathlib import Path

    code = ("import json, sys\n"
            "from core.fid import fidelity\n"
            "from core.fid_extractor import DIGITS_EXTRACTOR\n"
            "from core.digits_classifier import WEIGHTS_PATH\n"
            "from core.real_images import digits_images\n"
            "out = fidelity(digits_images('heldout', 100).dataset, digits_images('train', 100), "
            "extractor=DIGITS_EXTRACTOR, weights=WEIGHTS_PATH, cache_root=sys.argv[1], metrics=('fid', 'kid'))\n"
            "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).parent.parent,
                          env=fresh_process_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert set(out) == {"fid", "kid"} and out["fid"] > 0 and out["kid"] is not None
