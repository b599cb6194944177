"""Datasets, the per-rank batch sampler and the latent encoder."""
import itertools
import json
import os
import re
import shutil
import time
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import ShardedBatchSampler, build_dataset, center_crop, dataset_info
from core.data_error import DataError
from core.digits import bundled_digits, digits_arrays
from core.latents import LatentShards, encode_id

REPO = Path(__file__).resolve().parents[1]


def make_folder(root, sizes=((40, 24), (24, 40), (33, 33)), classes=("zebra", "ant", "moth")):
    """An image folder of random RGB PNGs, classes created out of sorted order."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


#################################################################################
#                                    Digits                                     #
#################################################################################

def test_digits_in_memory_with_fixed_split():
    train, heldout = build_dataset("digits"), build_dataset("digits", split="heldout")
    x, y = train.tensors
    assert x.shape == (1500, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(heldout) == 297 and x.min() == -1 and x.max() == 1 and set(y.tolist()) == set(range(10))
    item_x, item_y = train[7]
    assert torch.equal(item_x, train[7][0]) and torch.equal(item_x, x[7]) and item_y == y[7]  # no random flips

    # The two splits partition the 1797 images (as a multiset: some digits may repeat).
    from sklearn.datasets import load_digits

    def rows(images, labels):
        return Counter((im.tobytes(), int(lab)) for im, lab in zip(images, labels))

    whole = load_digits()
    everything = rows((whole.images.astype(np.float32) / 16.0) * 2.0 - 1.0, whole.target)
    assert rows(*digits_arrays("train")) + rows(*digits_arrays("heldout")) == everything
    pixels, labels = bundled_digits()  # read without importing sklearn.datasets: the same arrays
    assert np.array_equal(pixels, whole.images) and np.array_equal(labels, whole.target)
    assert torch.equal(build_dataset("digits").tensors[0], x)  # fixed across calls
    assert dataset_info("digits") == dict(input_size=8, in_channels=1, num_classes=10, num_images=1500,
                                          pixel_space=True, encode=None)


#################################################################################
#                                    Sampler                                    #
#################################################################################

def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_shards_are_disjoint_and_add_up_to_the_global_batch():
    single = take(ShardedBatchSampler(50, 8, seed=3), 14)  # 6 batches per epoch: crosses two epoch boundaries
    ranks = [take(ShardedBatchSampler(50, 8, rank=r, world_size=4, seed=3), 14) for r in range(4)]
    for b, global_batch in enumerate(single):
        shards = [ranks[r][b] for r in range(4)]
        assert all(len(s) == 2 for s in shards)
        assert sum(shards, []) == global_batch  # contiguous, in rank order, so disjoint
    epoch = sum(single[:6], [])
    assert len(set(epoch)) == 48 and single[6:12] != single[:6]  # no repeats in an epoch; a new order the next


def test_sampler_resumes_mid_epoch_even_on_another_world_size():
    sampler = ShardedBatchSampler(50, 8, seed=1)
    take(sampler, 9)
    state = sampler.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 3)
    expected = take(sampler, 5)

    resumed = ShardedBatchSampler(50, 8, seed=1)
    resumed.load_state_dict(state)
    assert take(resumed, 5) == expected
    halves = []
    for r in range(2):
        half = ShardedBatchSampler(50, 8, rank=r, world_size=2, seed=1)
        half.load_state_dict(json.loads(json.dumps(state)))  # the state survives a JSON round trip
        halves.append(take(half, 5))
    assert [a + b for a, b in zip(*halves)] == expected
    sought = ShardedBatchSampler(50, 8, seed=1)
    sought.seek(9)
    assert take(sought, 5) == expected
    with pytest.raises(ValueError, match="seed"):
        ShardedBatchSampler(50, 8, seed=2).load_state_dict(state)


def test_seeds_have_their_own_data_orders():
    # Each (seed, epoch) its own order: with seed + epoch, seed 1's epochs were seed 0's from its second on,
    # so the runs of a seed sweep trained on the same sequence of batches, one epoch apart.
    orders = {(seed, epoch): tuple(ShardedBatchSampler(50, 10, seed=seed).permutation(epoch).tolist())
              for seed in range(4) for epoch in range(4)}
    assert len(set(orders.values())) == len(orders)
    assert orders[(1, 0)] == tuple(ShardedBatchSampler(50, 10, seed=1).permutation(0).tolist())  # and repeatable
    # A run resumed from a checkpoint written before (its sampler state has no "order") keeps its own orders.
    state = ShardedBatchSampler(50, 10, seed=1).state_dict()
    assert state["order"] == "hashed"
    earlier = ShardedBatchSampler(50, 10, seed=1)
    earlier.load_state_dict({k: v for k, v in state.items() if k != "order"})
    assert earlier.permutation(2).tolist() == torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    assert earlier.state_dict()["order"] == "seed+epoch"
    with pytest.raises(ValueError, match="order='shuffled'"):
        earlier.load_state_dict({**state, "order": "shuffled"})


def test_sampler_rejects_an_indivisible_batch():
    with pytest.raises(ValueError, match="10.*4"):
        ShardedBatchSampler(100, 10, rank=0, world_size=4)
    with pytest.raises(ValueError, match="larger than the dataset"):
        ShardedBatchSampler(5, 8)


#################################################################################
#                                  Image folder                                 #
#################################################################################

def test_center_crop_resizes_the_short_side_then_crops_the_middle():
    image = Image.new("RGB", (300, 100), (0, 0, 0))
    image.paste((255, 255, 255), (140, 0, 160, 100))  # a white bar in the middle
    cropped = np.asarray(center_crop(image, 16))
    assert cropped.shape == (16, 16, 3)
    assert cropped[:, 7:9].min() > 200 and cropped[:, :4].max() < 30 and cropped[:, -4:].max() < 30


def test_the_identity_ranks_compare_tells_other_data_of_the_same_size_apart(tmp_path, encode_tiny_latents):
    # Node-local copies of one size that differ passed the ranks' size check: each rank trained on its own data.
    from core.data import data_identity

    a, b = make_folder(tmp_path / "a"), make_folder(tmp_path / "b")

    def identity(root):
        return data_identity(build_dataset("imagefolder", path=root, image_size=16))
    assert identity(a) == identity(b) and 0 < identity(a) < 2 ** 62  # the same files, wherever the folder is
    moth = sorted((b / "moth").iterdir())[0]
    moth.rename(b / "zebra" / f"z-{moth.name}")  # as many images, one of them under another label
    assert identity(b) != identity(a)
    latents = tmp_path / "latents"
    encode_tiny_latents(latents, seed=0)
    first = data_identity(build_dataset("latents", path=latents))
    encode_tiny_latents(latents, seed=1)  # encoded again: as many images, other latents
    assert data_identity(build_dataset("latents", path=latents)) != first
    assert data_identity(build_dataset("digits")) == 0  # shipped with scikit-learn: the same everywhere


def test_imagefolder_labels_shapes_and_flips(tmp_path):
    root = make_folder(tmp_path / "images")
    train = build_dataset("imagefolder", path=root, image_size=16)
    assert train.classes == ["ant", "moth", "zebra"]  # sorted folder order, as torchvision's ImageFolder
    assert [y for _, y in train.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x, y = train[6]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1 and -1 <= x.min() < x.max() <= 1
    assert not hasattr(train, "tensors")

    # Training items are every image and its mirror (item j: image j // 2, mirrored when j is odd), the same
    # whatever the global generator's state: a resumed run or another world size sees the same views.
    heldout = build_dataset("imagefolder", split="heldout", path=root, image_size=16)
    assert len(train) == 18 and len(heldout) == 9
    for j in range(18):
        torch.manual_seed(j)
        image, label = heldout[j // 2]
        assert torch.equal(train[j][0], image.flip(-1) if j % 2 else image) and train[j][1] == label
    assert not torch.equal(train[6][0], train[7][0])
    assert dataset_info("imagefolder", path=root, image_size=16) == dict(
        input_size=16, in_channels=3, num_classes=3, num_images=9, pixel_space=True, encode=None)


def test_an_image_folder_dataset_lists_its_folder_once(tmp_path, monkeypatch):
    # Checked by our scan, then listed again by torchvision's ImageFolder: ImageNet's 1.28M files twice per dataset
    # on every rank at a trial's start. The samples are torchvision's own listing still.
    from torchvision.datasets import ImageFolder

    root = make_folder(tmp_path / "images")
    walked = []
    walk = os.walk
    monkeypatch.setattr(os, "walk", lambda top, *args, **kwargs: walked.append(top) or walk(top, *args, **kwargs))
    train = build_dataset("imagefolder", path=root, image_size=16)
    assert sorted(walked) == [str(root / c) for c in ("ant", "moth", "zebra")]  # once each class
    monkeypatch.setattr(os, "walk", walk)
    own = ImageFolder(str(root))
    assert train.samples == own.samples and train.classes == own.classes and train.folder.class_to_idx == \
        own.class_to_idx


def test_bad_paths_are_named_in_the_error(tmp_path):
    missing = tmp_path / "nowhere"
    for name in ("imagefolder", "latents"):
        with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
            dataset_info(name, path=missing, image_size=16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty} is empty"):
        build_dataset("imagefolder", path=empty, image_size=16)
    (empty / "cats").mkdir()
    (empty / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{empty} has class folders.*no images"):
        dataset_info("imagefolder", path=empty, image_size=16)
    with pytest.raises(FileNotFoundError, match=f"{empty} has no meta.json"):
        dataset_info("latents", path=empty)
    # A class folder without images beside ones with them: a label trained on nothing, yet sampled for FID.
    gappy = make_folder(tmp_path / "gappy", classes=("ant", "moth"))
    (gappy / "bee").mkdir()
    (gappy / "cat").mkdir()
    for check in (lambda: dataset_info("imagefolder", path=gappy, image_size=16),
                  lambda: build_dataset("imagefolder", path=gappy, image_size=16)):
        with pytest.raises(ValueError, match=re.escape(f"{gappy}: class folders without images: ['bee', 'cat']")):
            check()
    from core.real_images import folder_images

    assert len(folder_images(gappy, 16)) == 6  # FID's real images: their labels are not used
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_dataset("mnist")


def test_encoder_command_reports_a_missing_folder(tmp_path, capsys):
    from scaling.encode_latents import main

    with pytest.raises(SystemExit) as exit_:
        main(["--data-path", str(tmp_path / "nowhere"), "--vae", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and f"{tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


#################################################################################
#                                 Latent encoder                                #
#################################################################################

def save_tiny_vae(folder):
    """A tiny random AutoencoderKL (downsampling ×2, 4 latent channels) saved as a diffusers folder."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae.save_pretrained(folder)


def encode_tiny_folder(root):
    """Encode a 9-image folder with a tiny random AutoencoderKL (downsampling ×2) through Ray Data, in root."""
    import ray

    from scaling.encode_latents import main

    images = make_folder(root / "images")
    save_tiny_vae(root / "vae")
    # A Ray of its own, as conftest's _private_ray gives each test: a module fixture is set up before it, and would
    # share /tmp/ray with any Ray on the machine, or join one that `ray start` recorded there.
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", temp)
        env.delenv("RAY_ADDRESS", raising=False)
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            main(["--data-path", str(images), "--vae", str(root / "vae"), "--out", str(root / "latents"),
                  "--image-size", "16", "--batch-size", "2", "--num-workers", "1", "--shard-size", "4"])
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """(folder holding images/, vae/ and latents/, the VAE in eval mode): one encode per test run.

    xdist spreads this module's tests over its workers; they share one encode (each its own would start
    a Ray and a Ray Data pipeline again, 30 s and more): the first worker here makes it, the others wait.
    """
    import fcntl
    import shutil

    from diffusers import AutoencoderKL

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "encoded"  # parent: this run's
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "latents" / "meta.json").is_file():  # written last, by the swap of a complete encode
            shutil.rmtree(root, ignore_errors=True)  # a worker's attempt that failed
            encode_tiny_folder(root)
    return root, AutoencoderKL.from_pretrained(root / "vae", local_files_only=True).eval()


def test_encoder_round_trips_shapes_labels_and_scale(encoded):
    from safetensors.torch import load_file

    from core.latents import image_seed

    root, vae = encoded
    out = root / "latents"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_images"] == 9 and meta["classes"] == ["ant", "moth", "zebra"]
    assert meta["latent_shape"] == [4, 8, 8] and meta["scale_factor"] == 0.18215 and meta["image_size"] == 16
    assert meta["vae"] == str((root / "vae").resolve()) and [s["num_images"] for s in meta["shards"]] == [4, 4, 1]

    shards = [load_file(out / s["file"]) for s in meta["shards"]]
    latents = torch.cat([s["latents"] for s in shards])  # (9, 2, 4, 8, 8)
    assert latents.shape == (9, 2, 4, 8, 8)
    assert torch.cat([s["labels"] for s in shards]).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.cat([s["indices"] for s in shards]).tolist() == list(range(9))

    # Image 4, encoded here alone with its seed, is the stored sample times 0.18215; view 1 is its mirror.
    x = build_dataset("imagefolder", split="heldout", path=root / "images", image_size=16)[4][0]
    with torch.no_grad():
        for view, image in enumerate((x, x.flip(-1))):
            dist = vae.encode(image[None]).latent_dist
            z = dist.sample(generator=torch.Generator().manual_seed(image_seed(0, 4, view)))[0]
            torch.testing.assert_close(latents[4, view], z * 0.18215, atol=1e-5, rtol=1e-4)


def test_the_encode_seed_changes_every_sample():
    # CPU generators keep a seed's low 32 bits: a seed above them (seed * 2**32 + ...) changed nothing.
    from core.latents import MAX_ENCODE_SEED, image_seed

    def first_draw(seed, index, view):
        return torch.randn(4, generator=torch.Generator().manual_seed(image_seed(seed, index, view)))

    assert [image_seed(0, i, v) for i in range(3) for v in range(2)] == list(range(6))  # seed 0's samples as ever
    seeds = (0, 1, 2, 12345, MAX_ENCODE_SEED)
    draws = [first_draw(s, i, v) for s in seeds for i in (0, 1, 1000) for v in (0, 1)]
    assert len({tuple(d.tolist()) for d in draws}) == len(draws)
    assert all(0 <= image_seed(s, 2**32 - 1, 1) < 2**32 for s in seeds)


def test_latent_dataset_holds_every_image_and_its_mirror(encoded):
    root, _ = encoded
    out = root / "latents"
    info = dataset_info("latents", path=out)
    assert info == dict(input_size=8, in_channels=4, num_classes=3, num_images=9, pixel_space=False,
                        encode=encode_id(json.loads((out / "meta.json").read_text())))
    assert re.fullmatch("[0-9a-f]{16}", info["encode"])
    train = build_dataset("latents", path=out)
    lazy = build_dataset("latents", path=out, in_memory=False)
    assert not hasattr(lazy, "tensors") and len(train) == len(lazy) == 18
    both = train.latents  # (9, 2, 4, 8, 8)
    x, y = train.tensors
    assert x.shape == (18, 4, 8, 8) and y.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    for j in range(18):
        assert torch.equal(x[j], both[j // 2, j % 2]) and torch.equal(lazy[j][0], x[j]) and lazy[j][1] == y[j]
    heldout = build_dataset("latents", split="heldout", path=out)
    assert len(heldout) == 9 and torch.equal(heldout.tensors[0], both[:, 0]) and torch.equal(heldout[4][0], both[4, 0])
    with pytest.raises(ValueError, match="image_size 16, not 32"):
        dataset_info("latents", path=out, image_size=32)


def test_corrupt_shard_is_named(encoded, tmp_path):
    import shutil

    root, _ = encoded
    broken = tmp_path / "latents"
    shutil.copytree(root / "latents", broken)
    shard = broken / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])  # a truncated copy
    with pytest.raises(ValueError, match=f"{shard} is corrupt"):
        dataset_info("latents", path=broken)
    (broken / "shard-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard} is missing"):
        build_dataset("latents", path=broken)
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is corrupt"):
        dataset_info("latents", path=broken)


def test_a_shard_of_the_wrong_dtype_or_labels_is_named(encoded, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    root, _ = encoded
    shard_name = "shard-00001.safetensors"
    tensors = load_file(str(root / "latents" / shard_name))
    classes = len(json.loads((root / "latents" / "meta.json").read_text())["classes"])
    for name, change, problem in [
            ("half", dict(latents=tensors["latents"].half()), "expected"),
            ("label", dict(labels=torch.full_like(tensors["labels"], classes)),
             f"label {classes} of image 0 is not one of the {classes} classes")]:
        broken = tmp_path / name
        shutil.copytree(root / "latents", broken)
        save_file({**tensors, **change}, str(broken / shard_name))
        with pytest.raises(ValueError, match=re.escape(f"latent shard {broken / shard_name} is corrupt")) as err:
            build_dataset("latents", path=broken)
        assert problem in str(err.value)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_shards_get_the_mode_of_a_normally_created_file(tmp_path, umask, mode):
    # safetensors writes its files private (0600): another user of the cluster could not train on a shared encode.
    from core.latents import write_shard

    old = os.umask(umask)
    try:
        entry = write_shard(tmp_path, 0, torch.zeros(2, 2, 4, 2, 2), [0, 1], [0, 1])
    finally:
        os.umask(old)
    assert (tmp_path / entry["file"]).stat().st_mode & 0o777 == mode


def test_latents_that_are_not_finite_are_named_not_trained_on(encoded, tmp_path, capsys):
    # A NaN in a shard trained to "diverged at step 1", a row a re-run never retries.
    import shutil

    from safetensors.torch import load_file, save_file

    from core import train as core_train
    from core.latents import CorruptLatents

    root, _ = encoded
    broken, shard = tmp_path / "nan", "shard-00001.safetensors"
    shutil.copytree(root / "latents", broken)
    tensors = load_file(str(broken / shard))
    tensors["latents"][1, 1, 0, 2, 3] = float("nan")  # image 1 of the shard, its mirror
    save_file(tensors, str(broken / shard))
    problem = f"latent shard {broken / shard} is corrupt: image 1 holds values that are not finite (NaN or inf)"
    with pytest.raises(CorruptLatents, match=re.escape(problem)):
        build_dataset("latents", path=broken)
    lazy = build_dataset("latents", path=broken, in_memory=False)  # read item by item: said where it is read
    first = json.loads((broken / "meta.json").read_text())["shards"][0]["num_images"]
    assert torch.isfinite(lazy[2 * (first + 1)][0]).all()  # the image itself is whole
    with pytest.raises(CorruptLatents, match=re.escape(problem)):
        lazy[2 * (first + 1) + 1]
    # core.train says it as a refusal, as it says a bad image: no traceback, exit 2.
    args = ["--model", "DiT-P/4", "--dataset", "latents", "--data-path", str(broken), "--global-batch-size", "2",
            "--max-steps", "2", "--zero-stage", "0", "--precision", "fp32", "--val-batch", "0", "--num-workers", "0",
            "--results-dir", str(tmp_path / "res")]
    assert core_train.main(args) == 2
    assert capsys.readouterr().err.endswith(f"error: {problem}\n")


def test_shards_whose_indices_are_not_their_place_are_named(encoded, tmp_path):
    # An encode writes images 0..N-1 in order; shards put together by hand (or a shard of another encode copied in)
    # trained on images under other images' places unnoticed.
    import shutil

    from safetensors.torch import load_file, save_file

    from core.latents import CorruptLatents

    root, _ = encoded
    broken, shard = tmp_path / "moved", "shard-00001.safetensors"
    shutil.copytree(root / "latents", broken)
    tensors = load_file(str(broken / shard))
    tensors["indices"] = tensors["indices"].flip(0)
    save_file(tensors, str(broken / shard))
    with pytest.raises(CorruptLatents, match=f"^latent shard {re.escape(str(broken / shard))} is corrupt: its indices "
                                             r"are not images 4 to 7 in order, as meta.json places it$"):
        build_dataset("latents", path=broken)


#################################################################################
#                          Malformed latent folders                             #
#################################################################################

def write_meta(folder, **changes):
    """A latent folder whose meta.json is a valid one's with changes (a None value removes the key)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(format="dit-scaling-latents/1", num_images=2, classes=["ant"], latent_shape=[4, 8, 8],
                image_size=16, scale_factor=0.18215, shards=[{"file": "shard-00000.safetensors", "num_images": 2}])
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    return folder / "meta.json"


@pytest.mark.parametrize("changes, problem", [
    (dict(shards=[{"num_images": 2}]), 'shard 0 has no "file"'),
    (dict(shards=[{"file": "shard-00000.safetensors"}]), 'shard 0 has no "num_images"'),
    (dict(shards=[{"file": "../elsewhere.safetensors", "num_images": 2}]),
     "shard 0's file '../elsewhere.safetensors' is not a file name in the folder"),
    (dict(shards=[{"file": "/etc/passwd", "num_images": 2}]),
     "shard 0's file '/etc/passwd' is not a file name in the folder"),
    (dict(shards=["shard-00000.safetensors"]), "shard 0 is 'shard-00000.safetensors', not an object"),
    (dict(shards={"file": "x"}), "\"shards\" is {'file': 'x'}, not a list"),
    (dict(shards=[{"file": "shard-00000.safetensors", "num_images": -1}]),
     "shard 0's num_images is -1, not a whole number >= 0"),
    (dict(num_images=3), "shard sizes add up to 2, not num_images 3"),
    (dict(num_images=0, shards=[]), "it holds no images"),
    (dict(classes=[]), "it lists no classes"),
    (dict(classes="ant"), "\"classes\" is 'ant', not a list of class names"),
    (dict(latent_shape=None), "missing ['latent_shape']"),
    (dict(latent_shape=[4, 8]), '"latent_shape" is [4, 8], not 3 whole numbers >= 1'),
    (dict(image_size="16"), "\"image_size\" is '16', not a whole number >= 1"),
    (dict(format="other/1"), "format is 'other/1', expected 'dit-scaling-latents/1'"),
    # Passed before: a model built square from the height alone; a decode dividing by a string; a shard read twice
    # (another's images never).
    (dict(latent_shape=[4, 2, 3]), '"latent_shape" [4, 2, 3] is not square (channels, h, h)'),
    (dict(scale_factor="oops"), "\"scale_factor\" is 'oops', not a number > 0"),
    # Passed before, read as 1 by this check and as the VAE's own factor (0.18215) by the decode: samples 5.5× off.
    (dict(scale_factor=None), "missing ['scale_factor']"),
    (dict(scale_factor=0), '"scale_factor" is 0, not a number > 0'),
    (dict(num_images=4, shards=[{"file": "shard-00000.safetensors", "num_images": 2}] * 2),
     "shard file shard-00000.safetensors is listed twice"),
])
def test_malformed_meta_is_named(tmp_path, changes, problem):
    meta_file = write_meta(tmp_path / "latents", **changes)
    with pytest.raises(ValueError) as err:
        dataset_info("latents", path=tmp_path / "latents")
    assert str(err.value) == f"{meta_file} is corrupt: {problem}"


def test_meta_that_is_not_a_json_object_or_not_a_file(tmp_path):
    folder = tmp_path / "latents"
    folder.mkdir()
    (folder / "meta.json").write_text("[]")
    with pytest.raises(ValueError, match=f"^{folder / 'meta.json'} is corrupt: it holds a JSON list, not an object$"):
        dataset_info("latents", path=folder)
    (folder / "meta.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=f"^{folder / 'meta.json'} is corrupt: "):
        dataset_info("latents", path=folder)
    (folder / "meta.json").unlink()
    (folder / "meta.json").mkdir()
    with pytest.raises(ValueError, match=f"^{folder / 'meta.json'} is not a file$"):
        dataset_info("latents", path=folder)
    plain = tmp_path / "plain"
    plain.write_text("not a folder")
    with pytest.raises(ValueError, match=f"^latent folder {plain} is not a folder$"):
        dataset_info("latents", path=plain)
    with pytest.raises(ValueError, match=f"^latent folder {plain} is not a folder$"):
        build_dataset("latents", path=plain)


#################################################################################
#                          The encoder's bad input                              #
#################################################################################

def encoder_main(*args):
    """The exit code of `python -m scaling.encode_latents ARGS`, run in this process."""
    from scaling.encode_latents import main

    try:
        main(list(map(str, args)))
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "error: --batch-size 0: must be an integer >= 1\n"),
    (["--shard-size", "0"], "error: --shard-size 0: must be an integer >= 1\n"),
    (["--image-size", "0"], "error: --image-size 0: must be an integer >= 1\n"),
    (["--image-size", "-16"], "error: --image-size -16: must be an integer >= 1\n"),
    (["--num-workers", "-1"], "error: --num-workers -1: must be an integer >= 0\n"),
    (["--seed", "-1"], "error: --seed -1: must be an integer in 0..4294967295\n"),
    (["--seed", str(2**32)], "error: --seed 4294967296: must be an integer in 0..4294967295\n"),
])
def test_encoder_refuses_bad_numbers_before_anything_starts(tmp_path, capsys, args, message):
    import ray

    missing = tmp_path / "nowhere"  # not looked at: the numbers are checked first
    code = encoder_main("--data-path", missing, "--vae", missing, "--out", tmp_path / "out", *args)
    assert code == 2 and capsys.readouterr().err == message
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_encoder_refuses_an_empty_data_path_before_anything_starts(tmp_path, capsys, monkeypatch):
    import ray

    # An unset variable's "" encoded the current folder's files as one class.
    monkeypatch.chdir(tmp_path)
    code = encoder_main("--data-path", "", "--vae", tmp_path / "vae", "--out", tmp_path / "out")
    assert code == 2 and capsys.readouterr().err == ("error: --data-path is empty; give the image folder (one "
                                                     "sub-folder of images per class)\n")
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_encoder_refuses_an_out_it_cannot_write_before_anything_starts(tmp_path, capsys):
    import ray

    locked = tmp_path / "locked"
    locked.mkdir()
    # Unwritable even for root (CI runs as root, for whom permission bits do not count): the immutable flag.
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        locked.chmod(0o555)
        if os.access(locked, os.W_OK):
            pytest.skip("no way to make a folder unwritable here (root without chattr)")
    try:
        for out in (locked / "out", locked / "deeper" / "out"):
            code = encoder_main("--data-path", tmp_path / "images", "--vae", tmp_path, "--out", out, "--image-size", 16)
            assert code == 2 and capsys.readouterr().err == f"error: --out {out}: {locked} does not allow writing\n"
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        locked.chmod(0o755)
    assert list(locked.iterdir()) == [] and not ray.is_initialized()


def test_encoder_places_its_vae_copies_by_device():
    from scaling.autoscaler_limits import UNLIMITED, AutoscalerLimits
    from scaling.encode_latents import vae_workers

    gpus, cpus = {"CPU": 32.0, "GPU": 4.0}, {"CPU": 8.0}
    assert vae_workers("auto", gpus) == (4, 4, {"num_gpus": 1})
    assert vae_workers("auto", cpus) == (7, 7, {"num_cpus": 1})  # a CPU left to the image loading
    assert vae_workers("cpu", gpus) == (31, 31, {"num_cpus": 1})  # CPUs, though GPUs are up
    assert vae_workers("cpu", gpus, num_workers=3) == (3, 3, {"num_cpus": 1})
    assert vae_workers("gpu", gpus) == (4, 4, {"num_gpus": 1})
    assert vae_workers("gpu", gpus, num_workers=2) == (2, 2, {"num_gpus": 1})
    assert vae_workers("gpu", {"CPU": 8.0, "GPU": 0.5}) == (1, 1, {"num_gpus": 1})
    # An autoscaling cluster with no GPU up: auto encodes on CPUs; gpu starts one copy, which asks for the first GPU
    # node, and grows a copy per GPU as they come, up to the most the autoscaler may add (no limit where it does not
    # say, or where a node type has none); --num-workers fixes the count.
    unknown, with_gpus = AutoscalerLimits(), AutoscalerLimits([{"GPU": 8.0}], {"CPU": 64.0, "GPU": 16.0})
    unlimited = AutoscalerLimits([{"GPU": 8.0}], {"GPU": UNLIMITED})
    assert vae_workers("auto", cpus, autoscaler=lambda: with_gpus) == (7, 7, {"num_cpus": 1})
    assert vae_workers("gpu", cpus, autoscaler=lambda: with_gpus) == (1, 16, {"num_gpus": 1})
    assert vae_workers("gpu", cpus, autoscaler=lambda: unknown) == (1, None, {"num_gpus": 1})
    assert vae_workers("gpu", cpus, autoscaler=lambda: unlimited) == (1, None, {"num_gpus": 1})
    half = AutoscalerLimits([{"GPU": 0.5}], {"GPU": 0.5})  # a share of one GPU: still one copy at most
    assert vae_workers("gpu", cpus, autoscaler=lambda: half) == (1, 1, {"num_gpus": 1})
    assert vae_workers("gpu", cpus, num_workers=8, autoscaler=lambda: unknown) == (8, 8, {"num_gpus": 1})
    with pytest.raises(ValueError, match="^--device gpu: the cluster has no GPU, and no autoscaler to add one$"):
        vae_workers("gpu", cpus)
    with pytest.raises(ValueError, match="^--device gpu: the cluster has no GPU, and no autoscaler to add one$"):
        vae_workers("gpu", cpus, num_workers=8)  # a fixed count waits for GPUs as long
    with pytest.raises(ValueError, match="its autoscaler adds no node with one$"):
        vae_workers("gpu", cpus, autoscaler=lambda: AutoscalerLimits([{"CPU": 16.0}], {"CPU": 64.0}))
    asked = []
    vae_workers("gpu", gpus, autoscaler=lambda: asked.append(1))
    assert asked == []  # GPUs up: the autoscaler is not asked


def test_encoder_refuses_an_unknown_device_before_any_work():
    from scaling.encode_latents import encode_folder

    with pytest.raises(ValueError, match="^device 'cuda': must be one of auto, gpu, cpu$"):
        encode_folder("/nowhere", "/nowhere", "/nowhere", 16, device="cuda")  # not looked at


def test_a_cpu_vae_copy_stays_off_the_gpus_it_sees(monkeypatch):
    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for an actor without GPUs: a CPU copy on a GPU node sees them all.
    import scaling.encode_latents as encode_latents

    loaded = []
    monkeypatch.setattr(encode_latents, "load_vae", lambda path, device: loaded.append(device))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    encode_latents._Encode("vae", seed=0, on_gpu=False)
    encode_latents._Encode("vae", seed=0, on_gpu=True)
    assert loaded == ["cpu", "cuda"]


def test_encoder_refuses_gpus_a_fixed_cluster_has_none_of(tmp_path, capsys):
    import ray

    images = make_folder(tmp_path / "images")
    save_tiny_vae(tmp_path / "vae")
    (tmp_path / "latents").mkdir()
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False)  # a local Ray: no autoscaler
    try:
        code = encoder_main("--data-path", images, "--vae", tmp_path / "vae", "--out", tmp_path / "latents",
                            "--image-size", 16, "--device", "gpu")
    finally:
        ray.shutdown()
    assert code == 2
    # The last line: Ray's own start-up lines come before it where this process's first Ray logs to the test's stderr.
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "error: --device gpu: the cluster has no GPU, and no autoscaler to add one", err
    assert list((tmp_path / "latents").iterdir()) == []  # nothing written, nothing left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "latents", "vae"]


@pytest.fixture
def tiny_vae(tmp_path):
    save_tiny_vae(tmp_path / "vae")
    return tmp_path / "vae"


def test_encoder_names_a_vae_folder_it_cannot_load(tmp_path, capsys, monkeypatch, tiny_vae):
    import logging

    import ray

    # diffusers logs while it fails; a handler left by an earlier test in this process may hold a stream pytest
    # has closed since, and logging would print its own "Logging error" traceback into the stderr checked here.
    monkeypatch.setattr(logging, "raiseExceptions", False)

    images = make_folder(tmp_path / "images")
    bad = tmp_path / "bad-vae"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    cases = {bad: "is not a valid JSON file"}
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_vae / "config.json").read_text())
    cases[no_weights] = "no file named diffusion_pytorch_model"
    cases[tmp_path / "nowhere"] = "does not exist"
    cases[bad / "config.json"] = "is not a folder"
    cases[tmp_path / "images"] = "has no config.json"
    # These loaded without an error: diffusers built an AutoencoderKL and left what the file lacks random.
    from safetensors.torch import load_file, save_file

    other_class = tmp_path / "unet"
    shutil.copytree(tiny_vae, other_class)
    config = json.loads((other_class / "config.json").read_text())
    (other_class / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    cases[other_class] = "holds a UNet2DModel (its config.json's _class_name), not an AutoencoderKL"
    partial = tmp_path / "partial"
    shutil.copytree(tiny_vae, partial)
    weights = load_file(partial / "diffusion_pytorch_model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("decoder.")},
              partial / "diffusion_pytorch_model.safetensors")
    lacked = sum(k.startswith("decoder.") for k in weights)
    cases[partial] = f"holds weights that lack {lacked} of its AutoencoderKL's tensors (e.g. decoder."
    for vae, problem in cases.items():
        code = encoder_main("--data-path", images, "--vae", vae, "--out", tmp_path / "out", "--image-size", 16)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: --vae {vae}: VAE folder {vae} "), err
        assert problem in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_encoder_refuses_an_out_that_is_not_a_latent_folder(tmp_path, capsys, tiny_vae):
    import ray

    images = make_folder(tmp_path / "images")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("someone's notes")
    plain = tmp_path / "plain"
    plain.write_text("a file")
    mixed = tmp_path / "mixed"
    write_meta(mixed)
    (mixed / "notes.txt").write_text("someone's notes beside latents")
    cases = {taken: f"{taken} is a folder of other files (notes.txt) and no meta.json",
             plain: f"{plain} is not a folder",
             mixed: f"{mixed} holds files that are not latents (notes.txt)"}
    for out, problem in cases.items():
        before = {p: p.read_bytes() for p in out.parent.rglob("*") if p.is_file()}
        code = encoder_main("--data-path", images, "--vae", tiny_vae, "--out", out, "--image-size", 16)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: --out {out}: {problem}"), err
        assert {p: p.read_bytes() for p in out.parent.rglob("*") if p.is_file()} == before
    assert not ray.is_initialized()


def test_reencoding_replaces_a_latent_folder_only_once_complete(encoded, tmp_path, capsys):
    import shutil

    import ray

    root, _ = encoded
    out = tmp_path / "latents"
    shutil.copytree(root / "latents", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    images = tmp_path / "images"
    shutil.copytree(root / "images", images)
    bad = images / "moth" / "1.png"
    bad.write_bytes(b"not a png")
    args = ["--vae", root / "vae", "--out", out, "--image-size", 16, "--batch-size", 2, "--num-workers", 1,
            "--shard-size", 4]
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        code = encoder_main("--data-path", images, *args)
        err = capsys.readouterr().err
        assert code == 2 and err.endswith(f"error: image {bad} cannot be read: not an image file PIL can identify\n")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old encode, whole
        assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "latents"]  # no half-written sibling

        shutil.copy(root / "images" / "moth" / "1.png", bad)
        abandoned = tmp_path / ".latents.encoding-0badf00d"  # as a killed encode leaves its folder
        abandoned.mkdir()
        (abandoned / "shard-00000.safetensors").write_bytes(b"half of a shard")
        assert encoder_main("--data-path", images, *args, "--seed", 1) == 0
    finally:
        ray.shutdown()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 1 and meta["num_images"] == 9
    assert re.fullmatch(r"\.latents\.encoding-[0-9a-f]{8}", meta["encoded_in"])  # the name it was written under
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"] + [f"shard-0000{k}.safetensors" for k in range(3)]
    assert (out / "shard-00000.safetensors").read_bytes() != before["shard-00000.safetensors"]  # another seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "latents"]  # the abandoned encode removed


def test_a_finished_encode_never_replaces_files_put_beside_latents_meanwhile(tmp_path):
    from core.latents import _swap_in

    out = tmp_path / "latents"
    write_meta(out)
    new = tmp_path / ".latents.encoding-1"
    write_meta(new, num_images=5, shards=[{"file": "shard-00000.safetensors", "num_images": 5}])
    (out / "notes.txt").write_text("written while the encode ran")
    with pytest.raises(ValueError, match=f"^{out} changed while the encode ran: {out} holds files that are not latents "
                                         f"\\(notes.txt\\); the finished encode is left in {new}$"):
        _swap_in(new, out)
    assert (out / "notes.txt").exists() and json.loads((new / "meta.json").read_text())["num_images"] == 5
    (out / "notes.txt").unlink()
    _swap_in(new, out)
    assert json.loads((out / "meta.json").read_text())["num_images"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents"]


def test_an_encode_killed_while_writing_its_meta_json_is_removed_by_the_next(tmp_path, encode_tiny_latents,
                                                                             monkeypatch):
    # A half-written meta.json made the folder look finished: kept for its owner, never removed.
    out = tmp_path / "latents"
    write_text = Path.write_text

    def killed_midway(path, text, *args, **kwargs):
        if path.name.startswith("meta.json"):
            write_text(path, text[:len(text) // 2])
            raise KeyboardInterrupt("killed")
        return write_text(path, text, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", killed_midway)
        patch.setattr(shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
        with pytest.raises(KeyboardInterrupt):
            encode_tiny_latents(out, seed=0)
    [left] = tmp_path.glob(".latents.encoding-*")
    assert not (left / "meta.json").exists()
    encode_tiny_latents(out, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents"]


def test_abandoned_encodes_are_removed_and_a_running_one_is_respected(tmp_path, caplog):
    from core.folder_lock import lock_folder
    from core.latents import _clear_abandoned_encodes

    out = tmp_path / "latents"
    write_meta(out)
    abandoned = tmp_path / ".latents.encoding-11111111"
    abandoned.mkdir()
    (abandoned / "shard-00000.safetensors").write_bytes(b"half of a shard")
    finished = write_meta(tmp_path / ".latents.encoding-22222222",  # complete, not swapped in: its owner's
                          encoded_in=".latents.encoding-22222222").parent
    older = write_meta(tmp_path / ".latents.encoding-20000000").parent  # the same, from before encodes named theirs
    # The encode that was at out, exchanged out by a later one killed before renaming it to .replaced-*.
    exchanged = write_meta(tmp_path / ".latents.encoding-66666666", encoded_in=".latents.encoding-77777777").parent
    other = tmp_path / ".latents-b.encoding-33333333"  # another target's
    other.mkdir()
    running = tmp_path / ".latents.encoding-44444444"
    running.mkdir()
    replaced = write_meta(tmp_path / ".latents.replaced-55555555").parent  # swapped out by an encode killed then
    held = lock_folder(running)  # as the encode writing into it holds it
    try:
        with pytest.raises(ValueError, match=f"^{out}: another encode is writing into it now \\(in {running}\\); "):
            _clear_abandoned_encodes(out)
    finally:
        os.close(held)
    assert running.exists()  # not taken for abandoned while it ran
    with caplog.at_level("WARNING", logger="core.latents"):
        _clear_abandoned_encodes(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".latents-b.encoding-33333333", older.name, finished.name,
                                                          "latents"]
    assert f"removed {abandoned}, left by an encode into {out}" in caplog.text
    assert f"removed {running}," in caplog.text  # its encode has ended since
    assert f"removed {replaced}, an earlier encode into {out} that a later one replaced" in caplog.text
    assert f"removed {exchanged}, an earlier encode into {out} that a later one replaced" in caplog.text


def test_a_folder_left_by_an_encode_killed_as_it_started_is_removed(tmp_path):
    # Made as .starting-* and renamed at once: a kill between the two left the empty folder beside the output for good.
    from core.latents import STARTING_ABANDONED_S, _clear_abandoned_encodes

    out = tmp_path / "latents"
    write_meta(out)
    left, starting = tmp_path / ".latents.starting-11111111", tmp_path / ".latents.starting-22222222"
    not_empty, other = tmp_path / ".latents.starting-33333333", tmp_path / ".latents-b.starting-44444444"
    for folder in (left, starting, not_empty, other):
        folder.mkdir()
    (not_empty / "notes.txt").write_text("not an encode's: it writes nothing there")
    old = time.time() - STARTING_ABANDONED_S - 5
    for folder in (left, not_empty, other):
        os.utime(folder, (old, old))
    _clear_abandoned_encodes(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, starting.name, not_empty.name, "latents"])


def test_latents_held_in_memory_take_their_own_size_not_three_times_it(encoded, tmp_path):
    # Loading read every shard, then concatenated them (a second copy) and checked them (a quarter more): 2.8 times
    # the latents' size at once, in every rank of a node, where the rule for holding them left room for one.
    from safetensors.torch import save_file

    root, _ = encoded
    meta = json.loads((root / "latents" / "meta.json").read_text())
    per_shard, shape = 1600, [4, 32, 32]
    folder = tmp_path / "big"
    folder.mkdir()
    for k in range(4):
        save_file({"latents": torch.randn(per_shard, 2, *shape), "labels": torch.zeros(per_shard, dtype=torch.int64),
                   "indices": torch.arange(k * per_shard, (k + 1) * per_shard)},
                  str(folder / f"shard-{k:05d}.safetensors"))
    meta.update(num_images=4 * per_shard, latent_shape=shape,
                shards=[{"file": f"shard-{k:05d}.safetensors", "num_images": per_shard} for k in range(4)])
    (folder / "meta.json").write_text(json.dumps(meta))
    size = 4 * per_shard * 2 * 4 * 32 * 32 * 4  # 210 MB
    script = textwrap.dedent(f"""\
        import torch
        from core.latents import LatentShards

        def peak():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

        before = peak()
        data = LatentShards({str(folder)!r}, in_memory=True)
        assert data.latents.shape == (6400, 2, 4, 32, 32)
        print(peak() - before)
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown = int(proc.stdout.split()[-1])
    # The tensor, and one shard read (its copy, and its file's pages while mapped): 1.66 times the size here, with a
    # quarter of the latents a shard (2.8 times before).
    assert size < grown < 2 * size, grown / size
    # Held in memory, the same latents as read from the shards one by one.
    held, lazy = LatentShards(folder, in_memory=True), LatentShards(folder, in_memory=False)
    for j in (0, 1, 3199, 3200, 12799):
        assert torch.equal(held[j][0], lazy[j][0])


def test_the_ranks_of_a_node_hold_latents_in_memory_only_where_all_their_copies_fit(encoded, monkeypatch):
    # Each rank decides alone, and all of a node's at once: eight ranks that each took an eighth of the free memory
    # took all of it together.
    from core import latents

    folder = encoded[0] / "latents"
    meta = latents.read_meta(folder)
    size = meta["num_images"] * 2 * int(np.prod(meta["latent_shape"])) * 4  # (N, 2 views, C, h, w) float32
    monkeypatch.setattr(latents, "available_memory", lambda: 8 * 4 * size)  # room for four copies
    held = {}
    for ranks in ("1", "4", "5", "8"):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        held[ranks] = LatentShards(folder).in_memory
    assert held == {"1": True, "4": True, "5": False, "8": False}
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # one process on its own
    assert LatentShards(folder).in_memory
    # Trials packed on a node together: the study says how many processes there may hold them.
    assert not LatentShards(folder, copies=5).in_memory and LatentShards(folder, copies=4).in_memory


def test_the_memory_left_counts_a_control_groups_limit(tmp_path, monkeypatch):
    # A container's (a Kubernetes pod's) limit: the machine's free memory said the latents fit when the pod had
    # far less left, and every rank of the trial was killed at its start.
    from core.latents import available_memory, cgroup_headroom

    def group(folder, files):
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)

    v2 = tmp_path / "v2"
    group(v2 / "pod", {"memory.max": "1000000", "memory.current": "300000"})
    group(v2 / "pod" / "job", {"memory.max": "max", "memory.current": "100000"})
    (tmp_path / "own-v2").write_text("0::/pod/job\n")
    assert cgroup_headroom(v2, tmp_path / "own-v2") == 700000  # the pod's limit binds its job
    v1 = tmp_path / "v1"
    group(v1 / "memory" / "pod", {"memory.limit_in_bytes": "5000000", "memory.usage_in_bytes": "1000000"})
    group(v1 / "memory", {"memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": "7000000"})
    (tmp_path / "own-v1").write_text("5:cpuacct,cpu:/pod\n4:memory:/pod\n0::/\n")
    assert cgroup_headroom(v1, tmp_path / "own-v1") == 4000000
    # The page cache a group's usage counts is reclaimed before the group is killed: its inactive files are room.
    group(v2 / "pod", {"memory.stat": "anon 100000\nfile 250000\ninactive_file 200000\nactive_file 50000\n"})
    assert cgroup_headroom(v2, tmp_path / "own-v2") == 900000
    group(v1 / "memory" / "pod", {"memory.stat": "cache 900000\ninactive_file 1\ntotal_inactive_file 800000\n"})
    assert cgroup_headroom(v1, tmp_path / "own-v1") == 4800000
    (tmp_path / "own-none").write_text("4:memory:/\n")
    assert cgroup_headroom(v1, tmp_path / "own-none") is None  # the root's "limit" is none
    assert cgroup_headroom(v1, tmp_path / "missing") is None
    # The least of the machine's free memory and its group's headroom (here as the files above would give it).
    import core.latents as latents

    monkeypatch.setattr(latents, "cgroup_headroom", lambda: 12345)
    assert available_memory() == 12345
    monkeypatch.setattr(latents, "cgroup_headroom", lambda: 10 ** 18)  # a limit above the machine's memory
    # The kernel's MemAvailable, reclaimable cache counted: the free pages alone left out a cache full of the shards.
    (tmp_path / "meminfo").write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\n"
                                      "MemAvailable:   20000000 kB\nCached:         18000000 kB\n")
    assert available_memory(tmp_path / "meminfo") == 20000000 * 1024
    (tmp_path / "old-meminfo").write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\n")  # before 3.14
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0.5 * free <= available_memory(tmp_path / "old-meminfo") <= 2 * free  # the free pages, as they move
    available = int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) * 1024
    assert 0.5 * available <= available_memory() <= 2 * available


def test_a_16_bit_grey_image_is_scaled_not_clipped_to_white(tmp_path):
    # PIL's convert("RGB") clips 16-bit values at 255: a 16-bit PNG trained as a nearly white image, silently.
    from core.data import UnreadableImage, load_image

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    loaded = np.asarray(load_image(tmp_path / "deep.png"))  # (64, 64, 3)
    assert loaded.shape == (64, 64, 3) and (loaded == (ramp >> 8)[..., None]).all()
    # A 16-bit PGM, which PIL opens as 32-bit integers (so does Pillow before 10.3 a 16-bit PNG): the same.
    (tmp_path / "deep.pgm").write_bytes(b"P5 64 64 65535\n" + ramp.astype(">u2").tobytes())
    assert Image.open(tmp_path / "deep.pgm").mode == "I"
    assert (np.asarray(load_image(tmp_path / "deep.pgm")) == loaded).all()
    # 32-bit grey of other formats has no range to scale from, even where its values fit in 16 bits (read as 16-bit,
    # a TIFF of 8-bit values, or a float mask of 0 and 1, was trained as black; a PFM's fractions too): named.
    for name, values in (("deeper.tif", ramp.astype(np.int32) * 4), ("eight.tif", np.full((4, 4), 200, np.int32)),
                         ("mask.tif", np.eye(4, dtype=np.float32)), ("float.pfm", np.eye(4, dtype=np.float32) / 2)):
        Image.fromarray(values).save(tmp_path / name)
        opened = Image.open(tmp_path / name)  # a PFM's floats: format PPM, as a 16-bit PGM's, but mode F
        with pytest.raises(UnreadableImage, match=re.escape(f"image {tmp_path / name} cannot be read: ValueError: PIL "
                                                            f"mode {opened.mode} ({opened.format}): 32-bit grey of no "
                                                            "set range; save it with 8 or 16 bits")):
            load_image(tmp_path / name)


def test_a_running_trials_latents_stay_its_encode_when_the_folder_is_encoded_again(tmp_path, encode_tiny_latents):
    # Shards were opened by name as first read: an encode swapped into the folder meanwhile was read from there on
    # (the new encode's images under the old labels and offsets), in a run reading the memory-mapped shards.
    folder = tmp_path / "latents"
    encode_tiny_latents(folder, seed=0)
    expected = LatentShards(folder, in_memory=True)
    lazy = LatentShards(folder, in_memory=False)
    first = lazy[0]
    encode_tiny_latents(folder, seed=1)  # replaces the folder whole
    assert not torch.equal(LatentShards(folder, in_memory=True)[5][0], expected[5][0])  # the folder holds another
    assert torch.equal(first[0], expected[0][0])
    for j in range(len(lazy)):
        assert torch.equal(lazy[j][0], expected[j][0]) and lazy[j][1] == expected[j][1], j


def test_latents_read_from_disk_in_dataloader_workers_that_are_not_forked(tmp_path, encode_tiny_latents):
    # Shards were read through /dev/fd/N of descriptors only forked workers inherit: a worker started by spawn or
    # forkserver (Python 3.14's default) failed "No such device", or read whatever file held that number there.
    folder = tmp_path / "latents"
    encode_tiny_latents(folder, seed=0)
    expected = LatentShards(folder, in_memory=True)
    lazy = LatentShards(folder, in_memory=False)
    sampler = ShardedBatchSampler(len(lazy), 8, seed=3)
    loader = torch.utils.data.DataLoader(lazy, batch_sampler=sampler, num_workers=1, multiprocessing_context="spawn")
    batches = list(itertools.islice(loader, 3))  # the sampler is endless
    assert len(batches) == 3
    for b, (x, y) in enumerate(batches):
        idx = sampler.indices(0, b)
        assert torch.equal(x, torch.stack([expected[j][0] for j in idx]))
        assert torch.equal(y, torch.stack([expected[j][1] for j in idx]))


def test_latents_unpickled_after_the_folder_was_encoded_again_are_refused(tmp_path, encode_tiny_latents):
    # The copy a spawned worker unpickles opens the shards by name: another encode's there is not this run's data.
    import pickle

    folder = tmp_path / "latents"
    encode_tiny_latents(folder, seed=0)
    lazy = LatentShards(folder, in_memory=False)
    sent = pickle.dumps(lazy)
    assert torch.equal(pickle.loads(sent)[5][0], lazy[5][0])
    encode_tiny_latents(folder, seed=1)  # replaces the folder whole
    with pytest.raises(DataError, match=f"^the latents in {folder} were encoded again since this run opened them"):
        pickle.loads(sent)
    held = pickle.loads(pickle.dumps(LatentShards(folder, in_memory=True)))  # in memory: nothing to open again
    assert held._fds == [] and torch.equal(held[5][0], LatentShards(folder, in_memory=True)[5][0])


def test_an_encode_swapped_in_while_the_shards_are_opened_is_refused(tmp_path, encode_tiny_latents, monkeypatch):
    # Between the meta's read and the shards' opening: the dataset held one encode's meta and id and read the other's
    # shards, and the checks of a re-encoded folder (at start, at each sampling milestone) compared ids that agreed.
    from core import latents

    folder = tmp_path / "latents"
    encode_tiny_latents(folder, seed=0)
    open_all = latents._open_all

    def encoded_meanwhile(files):
        monkeypatch.setattr(latents, "_open_all", open_all)
        encode_tiny_latents(folder, seed=1)
        return open_all(files)
    monkeypatch.setattr(latents, "_open_all", encoded_meanwhile)
    with pytest.raises(DataError, match=f"^the latents in {folder} were encoded again while this process opened "
                                        "them; start it again"):
        LatentShards(folder)
    assert len(LatentShards(folder)) == 32  # the next one opens the new encode whole


def test_latents_with_more_shards_than_a_process_may_hold_open_are_read_by_name(tmp_path, encode_tiny_latents,
                                                                                 monkeypatch, caplog):
    import resource

    folder = tmp_path / "latents"
    encode_tiny_latents(folder, seed=0)
    expected = LatentShards(folder, in_memory=True)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (64, 64))
    lazy = LatentShards(folder, in_memory=False)
    assert "1 latent shards are more than this process may hold open (64): they are opened by name" in caplog.text
    assert all(torch.equal(lazy[j][0], expected[j][0]) for j in range(len(lazy)))


def test_a_shard_the_disk_cannot_take_is_an_oserror_naming_it(tmp_path):
    # safetensors reports its I/O errors (a full disk, a file too large) as SafetensorError, no OSError: the encoder's
    # "error: ..., exit 1" for a failed write became a traceback.
    code = textwrap.dedent(f"""\
        import resource, signal, torch
        from pathlib import Path
        from core.latents import write_latent_folder, write_shard
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) rather than kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
        out = Path({str(tmp_path / 'latents')!r})
        try:
            write_latent_folder(out, lambda new: ([write_shard(new, 0, torch.zeros(64, 2, 4, 4, 4), [0] * 64,
                                                               range(64))], [4, 4, 4]),
                                {{"num_images": 64, "classes": ["a"], "image_size": 32, "scale_factor": 0.18215}})
        except OSError as err:
            print(err)
        """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.fullmatch(rf"cannot write {re.escape(str(tmp_path))}/\.latents\.encoding-[0-9a-f]{{8}}/shard-00000"
                        r"\.safetensors: .*File too large.*\n", done.stdout), done.stdout
    assert list(tmp_path.iterdir()) == []  # nothing half-written left


def test_a_folder_of_images_without_class_folders_is_named_as_such(tmp_path):
    # It was called empty: its images are there, not in one sub-folder per class.
    from core.data import scan_image_folder

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=re.escape(f"image folder {tmp_path} holds 2 images but no class folders: it "
                                                   "needs one sub-folder of images per class")):
        scan_image_folder(tmp_path)
    # Files of no image kind torchvision reads (.gif here) were "empty" too: the kinds it reads are named.
    for name in ("a.png", "b.JPG"):
        (tmp_path / name).rename(tmp_path / f"{name}.gif")
    with pytest.raises(ValueError, match=re.escape(f"image folder {tmp_path} holds no class folders and no images "
                                                   "(.jpg, .jpeg, .png, ")):
        scan_image_folder(tmp_path)


def test_an_encode_just_started_is_not_taken_for_abandoned_by_another(tmp_path, monkeypatch):
    # Its folder was made as .encoding-* before it was locked: another encode's clean-up in between locked it, took it
    # for abandoned and removed it, and the first encode failed writing its first shard.
    import core.latents as latents

    out = tmp_path / "latents"
    locked = latents.lock_folder

    def another_encode_cleans_up_first(folder):
        monkeypatch.setattr(latents, "lock_folder", locked)  # once, and its clean-up locks as it does
        latents._clear_abandoned_encodes(out)
        return locked(folder)

    monkeypatch.setattr(latents, "lock_folder", another_encode_cleans_up_first)
    meta = latents.write_latent_folder(out, lambda new: ([latents.write_shard(new, 0, torch.zeros(4, 2, 4, 4, 4),
                                                                               [0] * 4, range(4))], [4, 4, 4]),
                                       {"num_images": 4, "classes": ["a"], "image_size": 32, "scale_factor": 0.18215})
    assert re.fullmatch(r"\.latents\.encoding-[0-9a-f]{8}", meta["encoded_in"])
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "shard-00000.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["latents"]


def tiny_encode_into(out, shards=None):
    """write_latent_folder of one 4-image shard into out; shards(new) runs first, as the encode writes."""
    from core.latents import write_latent_folder, write_shard

    def write(new):
        if shards:
            shards(new)
        return [write_shard(new, 0, torch.zeros(4, 2, 4, 4, 4), [0] * 4, range(4))], [4, 4, 4]
    return write_latent_folder(out, write, {"num_images": 4, "classes": ["a"], "image_size": 32,
                                            "scale_factor": 0.18215})


def test_a_second_encode_into_the_same_out_is_refused_while_the_first_runs(tmp_path):
    # Refused only while the first wrote shards, through its folder's lock: NFS cannot lock a folder, and none was
    # refused there (nor a second encode started while the first synced or swapped its folder in).
    from core.latents import encode_lock_path

    out = tmp_path / "latents"
    refused = []

    def second_encode(new):
        with pytest.raises(ValueError, match=f"^{out}: another encode is writing into it now \\(it holds "
                                             f"{encode_lock_path(out)}\\); wait for it to end or stop it first$"):
            tiny_encode_into(out)
        refused.append(sorted(p.name for p in tmp_path.iterdir()))

    tiny_encode_into(out, second_encode)
    [(lock, first)] = refused
    assert lock == ".latents.encode.lock" and first.startswith(".latents.encoding-")  # the first's folder, left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents"]  # the lock file goes with its encode
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "shard-00000.safetensors"]


def test_where_folders_cannot_be_locked_the_encode_lock_still_clears_abandoned_encodes(tmp_path, monkeypatch, caplog):
    # NFS: a folder opened read-only cannot be locked. Every killed encode's folder (tens of GB) was left in place,
    # with a warning at each encode after.
    import errno

    import core.latents as latents

    def nfs(folder):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK), str(folder))

    monkeypatch.setattr(latents, "lock_folder", nfs)
    out = tmp_path / "latents"
    abandoned, starting = tmp_path / ".latents.encoding-11111111", tmp_path / ".latents.starting-22222222"
    abandoned.mkdir()
    (abandoned / "shard-00000.safetensors").write_bytes(b"half of a shard")
    starting.mkdir()  # young: under the encode lock no other encode can have made it
    # Its meta.json empty: its machine crashed before the file reached the disk (else it would be a finished encode).
    crashed = tmp_path / ".latents.encoding-33333333"
    crashed.mkdir()
    (crashed / "meta.json").write_text("")
    with caplog.at_level("WARNING", logger="core.latents"):
        tiny_encode_into(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents"]
    assert f"removed {abandoned}, left by an encode into {out}" in caplog.text
    assert f"removed {crashed}, left by an encode into {out}" in caplog.text


def test_a_lock_file_removed_by_its_holder_is_never_locked_by_two(tmp_path, monkeypatch):
    # A driver that opened the lock file before its holder removed it, and locked it after, held the removed file,
    # while a third, opening the path anew, made and locked another: both ran.
    import core.folder_lock as folder_lock

    path = tmp_path / ".lock"
    holder = folder_lock.lock_file(path)
    locked = folder_lock._locked

    def holder_removes_it_meanwhile(fd):
        monkeypatch.setattr(folder_lock, "_locked", locked)
        folder_lock.remove_lock_file(holder, path)
        return locked(fd)

    monkeypatch.setattr(folder_lock, "_locked", holder_removes_it_meanwhile)
    second = folder_lock.lock_file(path)
    try:
        assert second is not None and os.fstat(second).st_ino == os.stat(path).st_ino
        assert folder_lock.lock_file(path) is None  # the third finds it held
    finally:
        os.close(second)


@pytest.mark.parametrize("nested", ["inside", "same", "around"])
def test_encoder_refuses_an_out_inside_or_around_its_images(tmp_path, capsys, nested):
    import ray

    images = make_folder(tmp_path / "images")
    out = {"inside": images / "latents", "same": images, "around": tmp_path}[nested]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = encoder_main("--data-path", images, "--vae", tmp_path / "vae", "--out", out, "--image-size", 16)
    err = capsys.readouterr().err
    where = {"inside": "lies inside", "same": "is", "around": "holds"}[nested]
    assert code == 2 and err == f"error: --out {out}: it {where} the image folder --data-path {images}; write the " \
                                "latents beside it\n"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before and not ray.is_initialized()


@pytest.mark.parametrize("setting", [{"shift_factor": 0.0609}, {"latents_mean": [0.1] * 4, "latents_std": [1.1] * 4}])
def test_a_vae_that_shifts_or_normalises_its_latents_is_refused(tmp_path, tiny_vae, setting):
    from core.latents import VAEError, load_vae

    config = json.loads((tiny_vae / "config.json").read_text())
    (tiny_vae / "config.json").write_text(json.dumps({**config, **setting}))
    with pytest.raises(VAEError, match=f"^VAE folder {tiny_vae} sets {next(iter(setting))} "):
        load_vae(tiny_vae)
    (tiny_vae / "config.json").write_text(json.dumps({**config, "shift_factor": 0.0}))
    assert load_vae(tiny_vae).config.scaling_factor == pytest.approx(0.18215)


def test_an_encode_lock_file_this_user_cannot_open_is_named_and_one_not_removed_is_a_warning(tmp_path, monkeypatch):
    # Another user's killed encode left its lock file (mode 0644): the encode went on unguarded, saying the storage
    # could not lock. A lock file that could not be removed after a finished encode failed the encode.
    import core.folder_lock as folder_lock
    import core.latents as latents

    out = tmp_path / "latents"
    lock = latents.encode_lock_path(out)
    real_open = os.open

    def another_users(path, flags, *args):
        if str(path) == str(lock) and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    with monkeypatch.context() as patch:
        patch.setattr(folder_lock.os, "open", another_users)
        with pytest.raises(ValueError, match=f"^{out}: its encode lock file {lock} is not this user's to open for "
                                             "writing; if no encode into it runs now, remove that file$"):
            tiny_encode_into(out)
    assert list(tmp_path.iterdir()) == []
    with monkeypatch.context() as patch:
        patch.setattr(folder_lock.os, "unlink", lambda path: (_ for _ in ()).throw(OSError(116, "Stale file handle")))
        with pytest.warns(UserWarning, match=f"the lock file {lock} could not be removed \\(Stale file handle\\)"):
            tiny_encode_into(out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "shard-00000.safetensors"]


def test_a_vae_of_another_latent_space_is_refused_for_decoding(tmp_path, tiny_vae):
    # SDXL's VAE (4 channels, ×8, like SD's) passed for latents encoded with sd-vae-ft-ema (scale_factor 0.18215):
    # the decode divides by the encode's factor, so FID and grids were those of noise, without a word.
    from core.latents import load_vae, vae_fit_problem

    meta = json.loads(write_meta(tmp_path / "latents", vae="/models/sd-vae-ft-ema").read_text())
    same_space = tmp_path / "sd-vae-ft-mse"  # another VAE of the same space: the reference DiT decodes with it
    shutil.copytree(tiny_vae, same_space)
    other_space = tmp_path / "sdxl-vae"
    shutil.copytree(tiny_vae, other_space)
    config = json.loads((other_space / "config.json").read_text())
    (other_space / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.13025}))
    assert vae_fit_problem(load_vae(same_space), meta) is None
    assert vae_fit_problem(load_vae(other_space), meta) == (
        f"its scaling_factor is 0.13025 ({other_space}), not the scale_factor 0.18215 of the VAE the latents were "
        "encoded with (/models/sd-vae-ft-ema): it belongs to another latent space, and would decode them to noise")


def latent_files(folder):
    """Every file beside and in a latent folder, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("images, written, problem", [
    # Shards of fewer images than the folder holds (a stream that ended early).
    (8, 4, "its meta.json would say: shard sizes add up to 4, not num_images 8"),
    # A shard entry that is not what its file holds.
    (4, 3, r"latent shard .*/\.latents\.encoding-[0-9a-f]{8}/shard-00000\.safetensors is corrupt: tensors \(dtype, "
           r"shape\) .*'latents': \('F32', \[3, 2, 4, 4, 4\]\).*, expected .*\[4, 2, 4, 4, 4\].*"),
])
def test_an_inconsistent_encode_leaves_the_earlier_one_as_it_was(tmp_path, encode_tiny_latents, images, written,
                                                                 problem):
    # It was swapped in all the same: the earlier encode, usable, was replaced by one no reader takes.
    from core.latents import write_latent_folder, write_shard

    out = tmp_path / "latents"
    encode_tiny_latents(out, seed=0)
    before = latent_files(tmp_path)

    def shards(new):
        write_shard(new, 0, torch.zeros(written, 2, 4, 4, 4), [0] * written, range(written))
        return [{"file": "shard-00000.safetensors", "num_images": 4}], [4, 4, 4]

    with pytest.raises(RuntimeError, match=f"^the encode into {re.escape(str(out))} is inconsistent \\({problem}\\); "
                                           f"{re.escape(str(out))} is left as it was$"):
        write_latent_folder(out, shards, {"num_images": images, "classes": ["a"], "image_size": 32,
                                          "scale_factor": 0.18215})
    assert latent_files(tmp_path) == before and len(LatentShards(out)) == 32


def test_an_encode_whose_stream_of_images_ends_early_leaves_the_earlier_one_as_it_was(tmp_path, encode_tiny_latents):
    # Ray Data's batches were written as they came: fewer than the folder's images made an encode that was swapped in.
    from core.latents import write_latent_folder
    from scaling.encode_latents import _write_batches

    out = tmp_path / "latents"
    encode_tiny_latents(out, seed=0)
    before = latent_files(tmp_path)
    batches = [{"error": np.array([""] * 4), "index": np.arange(start, start + 4), "label": np.zeros(4, np.int64),
                "latents": np.zeros((4, 2, 4, 4, 4), np.float32)} for start in (0, 4)]  # 8 of the 16
    with pytest.raises(RuntimeError, match="^Ray Data ended after 8 of the folder's 16 images$"):
        write_latent_folder(out, lambda new: _write_batches(iter(batches), new, 4, 16),
                            {"num_images": 16, "classes": ["a", "b"], "image_size": 32, "scale_factor": 0.18215})
    assert latent_files(tmp_path) == before and len(LatentShards(out)) == 32


def test_a_finished_encode_killed_before_its_swap_is_named_by_the_next(tmp_path, encode_tiny_latents, monkeypatch,
                                                                      caplog):
    # Killed between its meta.json and its swap, it left a complete hidden folder that every later encode kept
    # without a word (an ImageNet encode: tens of GB, and hours of encoding that could be put in place).
    import core.latents as latents

    out = tmp_path / "latents"
    with monkeypatch.context() as patch:
        patch.setattr(latents, "_swap_in", lambda new, out: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
        patch.setattr(shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
        with pytest.raises(KeyboardInterrupt):
            encode_tiny_latents(out, seed=0)
    [finished] = tmp_path.glob(".latents.encoding-*")
    assert (finished / "meta.json").exists()
    with caplog.at_level("WARNING", logger="core.latents"):
        encode_tiny_latents(out, seed=1)
    assert caplog.messages == [f"kept {finished}, a finished encode into {out} that was never swapped in: rename it "
                               f"to {out} to use it, or remove it to free its space"]
    assert finished.exists() and len(LatentShards(finished)) == 32  # kept, whole
