"""core.evaluate: FID through torch-fidelity on digits, its cache, the noise floor, sampling across ranks, errors."""
import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from core import fid as fid_module
from core import evaluate as evaluate_module
from core.evaluate import EvalConfig, draw_grid, evaluate, fid_basis_now, generate, grid_plan, rank_slice, \
    sample_plan
from core.fid_extractor import FeatureExtractorDigits
from core.latents import FORMAT
from core.models import DiT_models
from core.real_images import RealImages, UInt8Images, digits_images, folder_images, heldout_images, \
    reference_images, to_uint8
from core.sample_grid import grid_size, save_grid
from core.train import Callbacks, TrainConfig, train
from evaluate_worker import CONFIG as WORKER_CONFIG, jittered_model  # tests/, on pytest's path
from two_ranks import on_two_ranks

REPO = Path(__file__).resolve().parents[1]

N = 297  # as many as the digits' held-out images: the floor is at the same count as the FID
FAST = dict(num_samples=N, num_steps=10, guided_channels=None)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fid_cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The EMA of DiT-P/2 after 200 steps on digits (a few seconds)."""
    kept = {}

    class Keep(Callbacks):
        def on_milestone(self, trial, metrics):
            kept["ema"] = copy.deepcopy(trial.ema.model)
            return {}

    cfg = TrainConfig(model="DiT-P/2", dataset="digits", batch_size=32, max_steps=200, lr=1e-3, ema_decay=0.99,
                      zero_stage=0, log_every=1000, ckpt_every=10_000, val_batch=0, num_workers=0)
    train(cfg, tmp_path_factory.mktemp("train"), callbacks=Keep())
    return kept["ema"]


def count_extracted(monkeypatch):
    """A list that collects the batch sizes the digits extractor sees."""
    seen = []
    forward = FeatureExtractorDigits.forward

    def counting(self, x):
        seen.append(len(x))
        return forward(self, x)
    monkeypatch.setattr(FeatureExtractorDigits, "forward", counting)
    return seen


def real_set(images, name):
    return RealImages(UInt8Images(images), dict(source="test", name=name, count=len(images)), name)


def test_real_vs_real_is_near_the_floor_and_noise_is_far(cache_dir):
    extractor, weights = fid_module.resolve_extractor("digits")
    common = dict(extractor=extractor, weights=weights, cache_root=cache_dir)
    reference = reference_images("digits")  # the 1500 training images
    floor = fid_module.fidelity(heldout_images("digits"), reference, metrics=("fid",), **common)["fid"]

    # Two disjoint real sets: a random third of the training images against the rest.
    train_images = digits_images("train").dataset.images  # (1500, 1, 8, 8) uint8
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(1))
    real = fid_module.fidelity(UInt8Images(train_images[order[:N]]), real_set(train_images[order[N:]], "rest"),
                               **common)
    noise = torch.randint(0, 256, (N, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fake = fid_module.fidelity(UInt8Images(noise), reference, **common)

    assert 0 < floor < 20 and 0 < real["fid"] < 2 * floor
    assert fake["fid"] > 20 * floor
    assert real["precision"] > 0.7 > fake["precision"]
    assert fake["kid"] > real["kid"] and real["inception_score"] > fake["inception_score"]


def test_trained_model_beats_untrained_and_writes_a_grid(trained, cache_dir, tmp_path):
    torch.manual_seed(0)
    untrained = type(trained)(**trained.config).eval()
    cfg = EvalConfig(**FAST, cache_dir=str(cache_dir))
    before = evaluate(untrained, cfg, dataset="digits", device="cpu")
    grid = tmp_path / "grids" / "step.png"
    after = evaluate(trained, cfg, dataset="digits", device=next(trained.parameters()).device, grid_path=grid)

    for r in (before, after):
        assert r["fid_samples"] == N and r["fid_floor_samples"] == N and r["fid_reference_samples"] == 1500
        assert r["feature_extractor"] == "digits-cnn" and "not comparable" in r["fid_note"]
        assert r["eval_time_s"] > 0 and r["sample_images_per_s"] > 0
        assert all(isinstance(r[k], float) for k in ("fid", "fid_floor", "kid", "precision", "recall",
                                                     "inception_score"))
    assert before["fid_floor"] == after["fid_floor"] < 20
    # What they were measured against, as a row records it and the driver computes it without a model.
    assert before["fid_basis"] == after["fid_basis"] == fid_basis_now(cfg, "digits", input_size=8)
    # An untrained DiT predicts zero noise: its samples are the clipped starting noise.
    assert after["fid"] < before["fid"] - 50 and after["precision"] > before["precision"]
    assert before["grid_path"] is None and after["grid_path"] == str(grid)
    assert Image.open(grid).size == grid_size(10, 4, 8)
    assert not [p for p in grid.parent.iterdir() if p != grid]  # no temporary left behind


def plan_with_grid(cfg, num_classes):
    """FID's labels and seeds followed by the grid's (of num_classes rows), as one plan."""
    (labels, seeds), (grid, grid_seeds) = sample_plan(cfg, num_classes), grid_plan(cfg, num_classes)
    return torch.cat([labels, grid]), seeds + grid_seeds


def test_ranks_sample_whole_batches_so_every_batch_holds_the_same_images_for_any_world_size():
    # Slices as even as they went put other images together in a batch on each world size: on a GPU an image's last
    # bits under bf16 may depend on its batch, and FID then on the number of GPUs.
    from core.evaluate import rank_counts

    assert rank_counts(100, 3, 16) == [48, 32, 20] and rank_counts(100, 1, 16) == [100]
    assert rank_counts(100, 8, 16) == [16] * 6 + [4, 0]  # 7 batches: one rank has none, and joins every gather
    for world in (1, 2, 3, 5, 8):
        starts = [rank_slice(100, r, world, 16).start for r in range(world)]
        assert all(s % 16 == 0 or s == 100 for s in starts) and sum(rank_counts(100, world, 16)) == 100
    assert rank_counts(10, 3) == [4, 3, 3]  # one item a batch: slices as even as they go, as before


def test_same_seed_same_result_for_any_world_size_or_batch(cache_dir):
    model = jittered_model()
    cfg = EvalConfig(num_samples=60, num_steps=5, guided_channels=None, batch_size=16, cache_dir=str(cache_dir))
    labels, seeds = plan_with_grid(cfg, 10)
    assert len(labels) == 60 + 40 and labels[60:].tolist() == [c for c in range(10) for _ in range(4)]
    one = generate(model, cfg, labels, seeds, device="cpu")  # (100, 1, 8, 8)
    small_batches = EvalConfig(**{**cfg.__dict__, "batch_size": 7})
    three = torch.cat([generate(model, small_batches, labels[s], seeds[s], device="cpu")
                       for s in (rank_slice(len(labels), r, 3) for r in range(3))])
    assert one.dtype == torch.uint8 and one.shape == (100, 1, 8, 8) and torch.equal(one, three)

    other_seed = EvalConfig(**{**cfg.__dict__, "seed": 1})
    labels_1, seeds_1 = plan_with_grid(other_seed, 10)
    assert not set(seeds) & set(seeds_1)
    # The grid's labels are fixed: its images differ only through the seeds.
    assert (generate(model, cfg, labels[60:], seeds_1[60:], device="cpu") != one[60:]).flatten(1).any(1).all()

    a = evaluate(model, cfg, dataset="digits", device="cpu")
    b = evaluate(model, cfg, dataset="digits", device="cpu")
    c = evaluate(model, other_seed, dataset="digits", device="cpu")
    timing = ("eval_time_s", "sample_images_per_s", "fid_time_s")
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert c["fid"] != a["fid"] and c["fid_floor"] == a["fid_floor"]


def no_fid_work(monkeypatch):
    """Makes every step of FID fail: real images, held-out images, the feature extractor, torch-fidelity."""
    def refused(*args, **kwargs):
        raise AssertionError("FID work without FID")
    for name in ("reference_images", "heldout_images", "fidelity", "resolve_extractor", "check"):
        monkeypatch.setattr(evaluate_module, name, refused)
    monkeypatch.setattr(fid_module, "fidelity", refused)


def count_sampled(monkeypatch):
    """A list that collects the number of images each generate() call samples."""
    seen = []

    def counting(model, cfg, labels, seeds, **kwargs):
        seen.append(len(labels))
        return generate(model, cfg, labels, seeds, **kwargs)
    monkeypatch.setattr(evaluate_module, "generate", counting)
    return seen


def test_the_grid_without_fid_is_the_grid_with_fid_and_costs_only_its_own_sampling(tmp_path, monkeypatch):
    model = jittered_model()
    cfg = EvalConfig(num_samples=20, num_steps=4, guided_channels=None, batch_size=16, grid_images_per_class=3,
                     cache_dir=str(tmp_path / "cache"))
    with_fid = evaluate(model, cfg, dataset="digits", device="cpu", grid_path=tmp_path / "fid" / "step.png")
    assert with_fid["fid"] > 0 and with_fid["grid_path"] == str(tmp_path / "fid" / "step.png")

    no_fid_work(monkeypatch)
    seen = count_sampled(monkeypatch)
    alone = draw_grid(model, cfg, dataset="digits", device="cpu", grid_path=tmp_path / "nofid" / "step.png")
    assert alone["grid_path"] == str(tmp_path / "nofid" / "step.png") and alone["grid_images"] == 10 * 3
    assert alone["eval_time_s"] > 0 and alone["sample_images_per_s"] > 0
    assert sum(seen) == 10 * 3  # the grid's images, none of FID's
    grid = (tmp_path / "nofid" / "step.png").read_bytes()
    assert grid == (tmp_path / "fid" / "step.png").read_bytes()
    assert Image.open(tmp_path / "nofid" / "step.png").size == grid_size(10, 3, 8)
    assert not [p for p in (tmp_path / "nofid").iterdir() if p.name != "step.png"]  # no temporary left behind

    # The very grid of the plan's grid items sampled among the FID images, as evaluate() sampled them before
    # draw_grid: image i depends on its seed alone.
    labels, seeds = plan_with_grid(cfg, 10)
    save_grid(generate(model, cfg, labels, seeds, device="cpu")[20:], 3, tmp_path / "together.png")
    assert (tmp_path / "together.png").read_bytes() == grid

    # Other seeds, another grid; no grid asked for, nothing sampled.
    other = draw_grid(model, EvalConfig(**{**cfg.__dict__, "seed": 1}), dataset="digits", device="cpu",
                      grid_path=tmp_path / "seed1.png")
    assert (tmp_path / "seed1.png").read_bytes() != grid and other["grid_images"] == 30
    seen.clear()
    none = EvalConfig(**{**cfg.__dict__, "grid_images_per_class": 0})
    assert draw_grid(model, none, dataset="digits", device="cpu", grid_path=tmp_path / "none.png")["grid_path"] is None
    assert draw_grid(model, cfg, dataset="digits", device="cpu")["grid_path"] is None
    assert seen == [] and not (tmp_path / "none.png").exists()


def write_folder(root, images, labels):
    """uint8 (N, 1, 8, 8) digits as an image folder of RGB PNGs, one sub-folder per class."""
    for i, (x, y) in enumerate(zip(images, labels)):
        (root / f"class{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[0].numpy()).convert("RGB").save(root / f"class{y}" / f"{i:04d}.png")


def test_reference_cache_is_reused_and_a_changed_folder_gets_a_new_entry(tmp_path, monkeypatch):
    from core.digits import digits_arrays

    images, labels = digits_arrays("train")
    images = to_uint8(torch.from_numpy(images[:40]))
    write_folder(tmp_path / "real", images[:30], labels[:30])
    extractor, weights = fid_module.resolve_extractor("digits")
    common = dict(extractor=extractor, weights=weights, cache_root=tmp_path / "cache")
    generated = UInt8Images(images[30:])  # 10 images
    seen = count_extracted(monkeypatch)

    first = fid_module.fidelity(generated, folder_images(tmp_path / "real", 8), **common)
    assert sum(seen) == 10 + 30  # generated and reference
    entries = sorted(p.name for p in (tmp_path / "cache").glob("*.json"))
    assert len(entries) == 1
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}

    seen.clear()
    again = fid_module.fidelity(generated, folder_images(tmp_path / "real", 8), **common)
    assert sum(seen) == 10 and again == first  # the reference came from the cache
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == mtimes

    seen.clear()
    write_folder(tmp_path / "real", images[30:31], labels[30:31])  # one more real image
    changed = fid_module.fidelity(generated, folder_images(tmp_path / "real", 8), **common)
    assert sum(seen) == 10 + 31 and changed["fid"] != first["fid"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_the_fid_basis_changes_with_the_files_it_is_measured_against(tmp_path):
    # A results row's fid_basis: the reference and held-out sets and the extractor's weights, each by its own digest,
    # so the driver can name what was rewritten in place (scaling.run.check_fid_basis).
    import shutil

    from core.digits import digits_arrays

    images, labels = digits_arrays("train")
    images = to_uint8(torch.from_numpy(images[:40]))
    write_folder(tmp_path / "real", images[:30], labels[:30])
    write_folder(tmp_path / "held", images[30:39], labels[30:39])
    shutil.copy(fid_module.resolve_extractor("digits")[1], tmp_path / "digits.safetensors")
    cfg = EvalConfig(num_samples=20, num_steps=2, guided_channels=None, reference=str(tmp_path / "real"),
                     heldout=str(tmp_path / "held"), feature_extractor_weights=str(tmp_path / "digits.safetensors"),
                     cache_dir=str(tmp_path / "c"))

    def basis():
        return json.loads(fid_basis_now(cfg, "digits", input_size=8))

    first = basis()
    assert set(first) == {"reference", "heldout", "extractor", "weights"} and first["extractor"] == "digits-cnn"
    # The driver's basis is the one an evaluation records, folders and weights file included.
    torch.manual_seed(0)
    measured = evaluate(DiT_models["DiT-P/4"]().eval(), cfg, dataset="digits", device="cpu")
    assert json.loads(measured["fid_basis"]) == first and measured["fid_floor_samples"] == 9
    # The same files moved elsewhere, a link left in their place (or another node's mount): the same basis.
    (tmp_path / "real").rename(tmp_path / "moved")
    os.symlink(tmp_path / "moved", tmp_path / "real")
    assert basis() == first
    assert basis() == first  # nothing read changed
    write_folder(tmp_path / "real", images[39:40], labels[39:40])  # one more real image
    second = basis()
    assert second["reference"] != first["reference"] and {**second, "reference": first["reference"]} == first
    write_folder(tmp_path / "held", images[:1], labels[:1])
    third = basis()
    assert third["heldout"] != second["heldout"] and {**third, "heldout": second["heldout"]} == second
    with open(tmp_path / "digits.safetensors", "ab") as f:  # the weights file replaced by another
        f.write(b"\0")
    fourth = basis()
    assert fourth["weights"] != third["weights"] and {**fourth, "weights": third["weights"]} == third


def test_a_corrupt_reference_image_is_named(tmp_path):
    from core.data import UnreadableImage
    from core.digits import digits_arrays

    images, labels = digits_arrays("train")
    write_folder(tmp_path / "real", to_uint8(torch.from_numpy(images[:3])), labels[:3])
    bad = sorted((tmp_path / "real").rglob("*.png"))[1]
    bad.write_bytes(b"PNG? no")
    real = folder_images(tmp_path / "real", 8)
    with pytest.raises(UnreadableImage, match=f"^image {bad} cannot be read: not an image file PIL can identify$"):
        real.dataset[0]  # the whole chunk is decoded at once: its bad file shows at the first image


def test_evaluate_computes_the_digits_reference_once(tmp_path, monkeypatch):
    model = jittered_model()
    cfg = EvalConfig(num_samples=20, num_steps=2, guided_channels=None, cache_dir=str(tmp_path))
    seen = count_extracted(monkeypatch)
    evaluate(model, cfg, dataset="digits", device="cpu")
    assert sum(seen) == 20 + 1500 + 20  # samples, reference, held-out (min(N, 297))
    seen.clear()
    evaluate(model, cfg, dataset="digits", device="cpu")
    assert sum(seen) == 20


def test_missing_inception_weights_name_the_file_and_download_nothing(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("attempted a download")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    model = jittered_model()
    url = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"

    cfg = EvalConfig(num_samples=10, feature_extractor="inception-v3-compat", cache_dir=str(tmp_path / "cache"))
    expected = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError) as err:
        evaluate(model, cfg, dataset="digits", device="cpu")
    assert str(expected) in str(err.value) and url in str(err.value)

    cfg.feature_extractor_weights = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        evaluate(model, cfg, dataset="digits", device="cpu")

    # A weights file present in torch-fidelity's cache is what torch-fidelity is told to load.
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"weights")
    assert fid_module.resolve_extractor("inception-v3-compat") == ("inception-v3-compat", expected)


def test_a_vae_folder_written_again_in_place_is_loaded_again(tmp_path):
    # The loaded VAE was kept by its path alone: a folder replaced between milestones was decoded with the old weights.
    from test_data import save_tiny_vae

    latent_decoder = evaluate_module.latent_decoder
    torch.manual_seed(0)
    save_tiny_vae(tmp_path / "vae")
    meta = {"vae": str(tmp_path / "vae"), "scale_factor": 0.5}
    z = torch.randn(2, 4, 4, 4)
    first = latent_decoder(meta, None, "cpu")(z)
    assert torch.equal(latent_decoder(meta, None, "cpu")(z), first)
    held = evaluate_module._load_vae(str(tmp_path / "vae"), "cpu")
    assert evaluate_module._load_vae(str(tmp_path / "vae"), "cpu") is held  # loaded once while it stays
    torch.manual_seed(1)
    save_tiny_vae(tmp_path / "vae")  # the same files, of the same sizes, written again
    assert not torch.allclose(latent_decoder(meta, None, "cpu")(z), first)


def test_latents_are_decoded_through_the_vae_and_need_a_reference(tmp_path):
    from diffusers import AutoencoderKL

    from core.digits import digits_arrays
    from core.models import DiT

    # A tiny VAE (4×4×4 latents <-> 8×8 RGB), saved where meta.json points, as encode_latents does.
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    latents = tmp_path / "latents"
    latents.mkdir()
    # A folder as encode_latents writes it: one shard of two images (evaluation reads only the meta).
    save_file({"latents": torch.zeros(2, 2, 4, 4, 4), "labels": torch.tensor([0, 1]), "indices": torch.tensor([0, 1])},
              str(latents / "shard-00000.safetensors"))
    meta = dict(format=FORMAT, num_images=2, classes=["a", "b"], latent_shape=[4, 4, 4], image_size=8,
                scale_factor=0.18215, vae=str(tmp_path / "vae"),
                shards=[{"file": "shard-00000.safetensors", "num_images": 2}])
    (latents / "meta.json").write_text(json.dumps(meta))
    images, labels = digits_arrays("train")
    write_folder(tmp_path / "real", to_uint8(torch.from_numpy(images[:30])), labels[:30] % 2)
    model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=2)

    cfg = EvalConfig(num_samples=12, num_steps=2, grid_classes=2, grid_images_per_class=3,
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="eval.reference"):
        evaluate(model, cfg, dataset="latents", data_path=latents, device="cpu")
    # The grid alone needs no reference: it is decoded through the VAE, and is the grid FID's evaluation draws.
    alone = draw_grid(model, cfg, dataset="latents", data_path=latents, device="cpu", grid_path=tmp_path / "a.png")
    assert alone["grid_path"] == str(tmp_path / "a.png") and Image.open(tmp_path / "a.png").size == grid_size(2, 3, 8)
    cfg.reference = str(tmp_path / "real")
    result = evaluate(model, cfg, dataset="latents", data_path=latents, device="cpu", grid_path=tmp_path / "g.png")
    assert result["fid"] > 0 and result["fid_reference_samples"] == 30
    assert result["fid_floor"] is None and result["fid_floor_samples"] == 0  # no eval.heldout
    # What it was measured against names the VAE that decoded it (meta.json's here), as the driver computes it.
    assert json.loads(result["fid_basis"])["decoder"] == json.loads(fid_basis_now(cfg, "latents", latents))["decoder"]
    assert Image.open(tmp_path / "g.png").size == grid_size(2, 3, 8)
    assert (tmp_path / "g.png").read_bytes() == (tmp_path / "a.png").read_bytes()


def tiny_vae():
    """A randomly initialised diffusers AutoencoderKL: 8×8 RGB <-> 4×4×4 latents, scaling_factor 0.18215."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1).eval()


def test_latent_decoder_undoes_the_scale_factor_the_encoder_applied():
    from core.evaluate import DECODE_BATCH, latent_decoder

    vae = tiny_vae()
    # More latents than one decoding batch: they are decoded in pieces and put back in order.
    z = torch.randn(DECODE_BATCH + 3, 4, 4, 4, generator=torch.Generator().manual_seed(1))  # scaled latents
    decode = latent_decoder({"scale_factor": 0.5}, vae, "cpu")  # meta.json's factor, not the VAE's default
    with torch.no_grad():
        expected = vae.decode(z / 0.5).sample  # (N, 3, 8, 8)
        wrong = vae.decode(z * 0.5).sample
    decoded = decode(z)
    assert decoded.shape == (DECODE_BATCH + 3, 3, 8, 8) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)
    assert (decoded - wrong).abs().max() > 1e-2  # the scale makes a difference this test sees

    # Round trip with core.latents' encoder, which multiplies by the VAE's scaling_factor and records it in
    # meta.json: the decoder must see the encoder's unscaled latent again.
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        unscaled = vae.encode(images).latent_dist.mode()  # (4, 4, 4, 4)
        expected = vae.decode(unscaled).sample
    scaled = unscaled * vae.config.scaling_factor  # as core.latents.encode_images stores them
    meta = {"scale_factor": vae.config.scaling_factor}
    torch.testing.assert_close(latent_decoder(meta, vae, "cpu")(scaled), expected, atol=1e-5, rtol=1e-5)


def test_two_gloo_processes_match_one(tmp_path):
    cache = tmp_path / "cache"
    cfg = EvalConfig(**{**WORKER_CONFIG.__dict__, "cache_dir": str(cache)})
    # One thread, as each torchrun rank has: MKL's products on Intel's AVX-512 sum in an order that depends on the
    # thread count (FID 379.61032 on one thread, 379.61035 on two), which is not what this test is about.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = evaluate(jittered_model(), cfg, dataset="digits", device="cpu", grid_path=tmp_path / "alone.png")
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "two.json"
    # --standalone: torchrun's agent binds a free port itself, as test_train's torchrun does.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(REPO / "tests" / "evaluate_worker.py"), str(out), str(cache)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["world_size"] == 2 and two["results"][0] == two["results"][1]  # every rank returns the same
    timing = ("eval_time_s", "sample_images_per_s", "fid_time_s", "grid_path")
    assert ({k: v for k, v in two["results"][0].items() if k not in timing}
            == {k: v for k, v in alone.items() if k not in timing})
    assert (tmp_path / "two.json.png").read_bytes() == (tmp_path / "alone.png").read_bytes()


def test_samples_that_are_not_finite_are_refused_not_scored(tmp_path):
    # NaN became black pixels and inf white ones (to_uint8), and torch-fidelity scored them: a finite FID in the
    # results of a sampler that overflowed.
    model = jittered_model()
    cfg = EvalConfig(num_samples=8, num_steps=2, guided_channels=None, batch_size=4, grid_images_per_class=1)
    labels, seeds = sample_plan(cfg, 10)
    with pytest.raises(evaluate_module.NonFiniteSamples, match=r"^4 of 256 values of the samples of classes \[.*\] "
                       r"are not finite \(NaN or inf\): the sampler overflowed"):
        generate(model, cfg, labels, seeds, device="cpu", decode=_nan_corner)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(evaluate_module.NonFiniteSamples):
        draw_grid(broken, cfg, dataset="digits", device="cpu", grid_path=tmp_path / "grid.png")
    assert not (tmp_path / "grid.png").exists()


def _nan_corner(x):
    """The first image of a batch with a 2×2 corner of NaN: 4 values."""
    x = x.clone()
    x[0, :, :2, :2] = float("nan")
    return x


def _out_of_memory(x):
    raise RuntimeError("out of memory (decoding)")


def _generate_as_rank(rank, decode, store_path, out):
    """One of two gloo processes sampling 4 images each; rank 1 decodes with decode. What each raised, to out."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        cfg = EvalConfig(num_samples=8, num_steps=2, guided_channels=None, batch_size=4)
        labels, seeds = sample_plan(cfg, 10)
        mine = rank_slice(8, rank, 2, 4)
        evaluate_module.generate_on_every_rank(jittered_model(), cfg, labels[mine], seeds[mine], device="cpu",
                                               rank=rank, world_size=2, decode=decode if rank else None)
        out.put((rank, None))
    except (evaluate_module.NonFiniteSamples, RuntimeError) as e:
        out.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_samples_not_finite_on_one_rank_stop_every_rank(tmp_path):
    # The rank that raised alone left the others waiting for it in the gather, for ever.
    said = on_two_ranks(_generate_as_rank, _nan_corner, store=tmp_path / "store")
    assert said[0] == "NonFiniteSamples: the samples of another rank than 0 are not finite (NaN or inf)"
    assert said[1].startswith("NonFiniteSamples: 4 of 256 values of the samples of classes"), said
    # Any other error of one rank's sampling (out of memory, the VAE): the other waited in the gather until the
    # process group's timeout.
    said = on_two_ranks(_generate_as_rank, _out_of_memory, store=tmp_path / "store2")
    assert said == {0: "RuntimeError: sampling failed on another rank than 0 (its error says why)",
                    1: "RuntimeError: out of memory (decoding)"}


def test_a_folder_of_one_real_image_is_named_not_left_to_torch_fidelity(tmp_path):
    # One image has no covariance: torch-fidelity's LinAlgError came after all the sampling, naming no folder.
    (tmp_path / "real" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "real" / "a" / "0.png")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'real'} holds 1 image\\(s\\); FID's statistics need at least "
                                         "2 real images$"):
        folder_images(tmp_path / "real", 8)
    Image.new("RGB", (8, 8), "white").save(tmp_path / "real" / "a" / "1.png")
    assert len(folder_images(tmp_path / "real", 8)) == 2


def test_a_flat_folder_of_real_images_serves_fid_as_a_tree_of_class_folders_does(tmp_path):
    # FID uses no labels, and ImageNet's validation images come as one flat folder: it was refused ("no class
    # folders"), where torch-fidelity and ADM's suite take it.
    layout = (("flat", ["b.png", "a.png", "c.JPEG"]), ("tree/x", ["b.png", "a.png"]), ("tree/y", ["c.png"]))
    for folder, files in layout:
        (tmp_path / folder).mkdir(parents=True)
        for i, name in enumerate(files):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / folder / name, format="PNG")
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    (tmp_path / "flat" / ".ipynb_checkpoints").mkdir()  # a hidden folder beside them: still a flat folder
    flat, tree = folder_images(tmp_path / "flat", 8), folder_images(tmp_path / "tree", 8)
    assert [Path(f).name for f in flat.dataset.files] == ["a.png", "b.png", "c.JPEG"]  # sorted, images only
    assert [Path(f).relative_to(tmp_path / "tree").as_posix() for f in tree.dataset.files] == ["x/a.png", "x/b.png",
                                                                                            "y/c.png"]
    assert flat.identity["count"] == 3 and torch.equal(flat.dataset[0], tree.dataset[0])


def test_fid_features_are_extracted_in_ieee_fp32_whatever_the_precision(monkeypatch, tmp_path):
    # The real images' features are cached and shared by every trial: a tf32 or bf16 trial's TF32 convolutions and
    # an fp32 trial's IEEE ones would put two numeric modes into one FID.
    from core.digits import digits_arrays
    from core.fid_extractor import FeatureExtractorDigits
    from core.precision import use_precision

    seen, forward = [], FeatureExtractorDigits.forward

    def noting_the_switches(self, x):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return forward(self, x)

    monkeypatch.setattr(FeatureExtractorDigits, "forward", noting_the_switches)
    images = to_uint8(torch.from_numpy(digits_arrays("train")[0][:40]))  # (40, 1, 8, 8)
    extractor, weights = fid_module.resolve_extractor("digits")
    fids = []
    for precision in ("tf32", "bf16", "fp32"):
        use_precision(precision)
        seen.clear()
        fids.append(fid_module.fidelity(UInt8Images(images[:20]), real_set(images[20:], "twenty"), extractor=extractor,
                                        weights=weights, cache_root=tmp_path / precision, metrics=("fid",))["fid"])
        assert seen and set(seen) == {(False, False)}, precision  # every batch of both sets, in IEEE fp32
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == ((precision != "fp32"),) * 2
    assert fids[0] == fids[1] == fids[2] > 0


#################################################################################
#               eval.reference as an .npz of FID statistics (ADM's)             #
#################################################################################

def digits_statistics(images):
    """(mu (64,), sigma (64, 64)) of the digits extractor's FID features of uint8 images (N, 1, 8, 8), computed by
    torch-fidelity as it computes a reference folder's."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    from core.fid_extractor import PENULTIMATE

    extractor, weights = fid_module.resolve_extractor("digits")
    network = create_feature_extractor(extractor, [PENULTIMATE], cuda=False, verbose=False,
                                       feature_extractor_weights_path=str(weights))
    features = get_featuresdict_from_dataset(UInt8Images(images), network, 500, False, True, False)[PENULTIMATE]
    stats = fid_features_to_statistics(features)  # (64,), (64, 64)
    return stats["mu"], stats["sigma"]


def write_statistics(path, images, with_images=True, **arrays):
    """An .npz laid out as ADM's reference batch: mu (float64, as ADM's), sigma of images (uint8 (N, 1, 8, 8)) and,
    with_images, the images as arr_0 (N, H, W, 3) uint8; arrays replace or add entries."""
    import numpy as np

    mu, sigma = digits_statistics(images)
    content = dict(mu=mu.astype(np.float64), sigma=sigma)
    if with_images:
        content["arr_0"] = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()  # (N, 8, 8, 3)
    content.update(arrays)
    np.savez(path, **content)
    return path


def test_fid_against_a_statistics_file_is_fid_against_the_images_it_summarises(tmp_path, monkeypatch):
    # ADM's reference batch holds the statistics of the whole training set (mu, sigma) and 10,000 of its images
    # (arr_0): FID is measured against the statistics, KID and precision / recall against the images.
    import dataclasses

    train_images = digits_images("train").dataset.images  # (1500, 1, 8, 8): the default reference, all of it
    npz = write_statistics(tmp_path / "digits_train.npz", train_images)
    model = jittered_model()
    cfg = EvalConfig(num_samples=100, num_steps=2, guided_channels=None, cache_dir=str(tmp_path / "cache"))
    assert cfg.reference_samples >= len(train_images)
    from_images = evaluate(model, cfg, dataset="digits", device="cpu")
    from_file = evaluate(model, dataclasses.replace(cfg, reference=str(npz)), dataset="digits", device="cpu")

    assert from_images["fid_reference_samples"] == 1500 and from_images["fid_floor_samples"] == 100
    assert from_file["fid"] == pytest.approx(from_images["fid"], rel=1e-6) and from_file["fid"] > 1
    assert from_file["fid_floor"] == pytest.approx(from_images["fid_floor"], rel=1e-6) and from_file["fid_floor"] > 1
    for key in ("kid", "precision", "recall", "inception_score"):  # the same images, the same features
        assert isinstance(from_file[key], float) and from_file[key] == from_images[key], key
    # What a row records: the file, not a count of images it does not give.
    assert from_file["fid_reference_samples"] is None and from_file["fid_floor_samples"] == 100
    assert "statistics" in from_file["fid_reference"] and str(npz) in from_file["fid_reference"]
    basis, basis_images = json.loads(from_file["fid_basis"]), json.loads(from_images["fid_basis"])
    assert basis["reference"] != basis_images["reference"] and basis["heldout"] == basis_images["heldout"]
    assert from_file["fid_basis"] == fid_basis_now(dataclasses.replace(cfg, reference=str(npz)), "digits",
                                                   input_size=8)

    # arr_0's features are cached as a reference folder's are: scoring again extracts the generated images alone, and
    # those each time (generated images are never cached); KID alone computes nothing more than it needs.
    seen = count_extracted(monkeypatch)
    reference = reference_images("digits", image_size=8, reference=npz)
    generated = UInt8Images(train_images[:50])
    extractor, weights = fid_module.resolve_extractor("digits")
    score = functools.partial(fid_module.fidelity, generated, extractor=extractor, weights=weights,
                              cache_root=tmp_path / "cache")
    again, twice = score(reference), score(reference)
    assert sum(seen) == 100 and again == twice and again["kid"] is not None
    without_images = reference_images("digits", image_size=8, reference=write_statistics(
        tmp_path / "no_images.npz", train_images, with_images=False))
    assert score(without_images, metrics=("kid",)) == {"kid": None}


def test_a_statistics_file_without_images_gives_fid_and_no_kid_or_precision(tmp_path):
    import dataclasses

    train_images = digits_images("train").dataset.images  # (1500, 1, 8, 8)
    npz = write_statistics(tmp_path / "stats.npz", train_images, with_images=False)
    model = jittered_model()
    cfg = EvalConfig(num_samples=100, num_steps=2, guided_channels=None, cache_dir=str(tmp_path / "cache"))
    from_images = evaluate(model, cfg, dataset="digits", device="cpu")
    from_file = evaluate(model, dataclasses.replace(cfg, reference=str(npz)), dataset="digits", device="cpu")
    assert from_file["fid"] == pytest.approx(from_images["fid"], rel=1e-6) and from_file["fid"] > 1
    assert from_file["fid_floor"] == pytest.approx(from_images["fid_floor"], rel=1e-6)
    assert from_file["kid"] is None and from_file["precision"] is None and from_file["recall"] is None
    assert from_file["inception_score"] == from_images["inception_score"]  # needs no reference


def test_a_statistics_files_images_are_cropped_to_the_image_size_as_a_folders_are(tmp_path):
    images = digits_images("train").dataset.images[:20]  # (20, 1, 8, 8)
    big = images.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (20, 1, 16, 16)
    write_folder(tmp_path / "real", big, [0] * len(big))
    npz = write_statistics(tmp_path / "stats.npz", images, with_images=False,
                           arr_0=big.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy())
    from_file = reference_images("digits", image_size=8, reference=npz).images
    from_folder = folder_images(tmp_path / "real", 8)
    assert len(from_file) == 20 and from_file.dataset[0].shape == (3, 8, 8)
    assert all(torch.equal(from_file.dataset[i], from_folder.dataset[i]) for i in range(20))


def bad_statistics_files(tmp_path):
    """{name: (path, what the message says)}: .npz files that are not FID statistics of the digits extractor."""
    import numpy as np

    mu, sigma = np.zeros(64), np.eye(64)
    files = {}

    def npz(name, message, **arrays):
        np.savez(tmp_path / f"{name}.npz", **arrays)
        files[name] = (tmp_path / f"{name}.npz", message)
    npz("short_mu", "statistics of 63-d features; the feature extractor's are 64-d", mu=mu[:63], sigma=sigma[:63, :63])
    npz("not_square", r"mu \(64,\) and sigma \(64, 63\)", mu=mu, sigma=sigma[:, :63])
    nan = sigma.copy()
    nan[3, 5] = float("nan")
    npz("nan", r"sigma holds 1 value\(s\) that are not finite", mu=mu, sigma=nan)
    npz("no_mu", "no 'mu' array", sigma=sigma, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    npz("float_images", r"arr_0 is float32 \(2, 8, 8, 3\)", mu=mu, sigma=sigma,
        arr_0=np.zeros((2, 8, 8, 3), np.float32))
    (tmp_path / "text.npz").write_text("mu, sigma\n")
    files["text"] = (tmp_path / "text.npz", "not an .npz")
    files["missing"] = (tmp_path / "nowhere.npz", "does not exist")
    return files


def test_a_bad_statistics_file_is_refused_before_sampling(tmp_path, monkeypatch):
    import re

    monkeypatch.setattr(evaluate_module, "generate", lambda *a, **k: pytest.fail("sampled"))
    for name, (path, message) in bad_statistics_files(tmp_path).items():
        cfg = EvalConfig(num_samples=10, reference=str(path), cache_dir=str(tmp_path / "cache"))
        with pytest.raises(ValueError, match=f"^eval.reference: {re.escape(str(path))}.*{message}"):
            evaluate_module.check(cfg, "digits")
        with pytest.raises(ValueError, match=f"^eval.reference: {re.escape(str(path))}.*{message}"):
            evaluate(jittered_model(), cfg, dataset="digits", device="cpu")


def test_the_fid_basis_of_a_statistics_file_follows_its_contents_not_its_path(tmp_path):
    import shutil

    import numpy as np

    train_images = digits_images("train").dataset.images
    npz = write_statistics(tmp_path / "stats.npz", train_images)
    cfg = EvalConfig(reference=str(npz), cache_dir=str(tmp_path / "c"))

    def basis(path):
        return json.loads(fid_basis_now(EvalConfig(**{**cfg.__dict__, "reference": str(path)}), "digits",
                                        input_size=8))

    first = basis(npz)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(npz, tmp_path / "elsewhere" / "copy.npz")  # another path, another mtime: the same bytes
    assert basis(tmp_path / "elsewhere" / "copy.npz") == first
    with np.load(npz) as f:
        arrays = dict(f)
    np.savez(npz, **{**arrays, "mu": arrays["mu"] + 1})  # rewritten in place: same path, same size
    second = basis(npz)
    assert second["reference"] != first["reference"] and {**second, "reference": first["reference"]} == first


def test_a_folder_named_like_an_npz_is_a_folder_of_images(tmp_path):
    from core.real_images import is_statistics_file

    images = digits_images("train").dataset.images[:4]  # (4, 1, 8, 8)
    write_folder(tmp_path / "real.npz", images, [0] * len(images))
    assert not is_statistics_file(tmp_path / "real.npz") and is_statistics_file(tmp_path / "missing.npz")
    assert len(reference_images("digits", image_size=8, reference=tmp_path / "real.npz")) == 4
