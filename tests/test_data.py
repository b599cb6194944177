"""Datasets, the per-rank batch sampler and the latent encoder."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import ShardedBatchSampler, build_dataset, center_crop, dataset_info
from core.digits import bundled_digits, digits_arrays


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
                                          pixel_space=True)


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
        input_size=16, in_channels=3, num_classes=3, num_images=9, pixel_space=True)


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
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_dataset("mnist")


def test_encoder_command_reports_a_missing_folder(tmp_path, capsys):
    from core.encode_latents import main

    with pytest.raises(SystemExit) as exit_:
        main(["--data-path", str(tmp_path / "nowhere"), "--vae", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and f"{tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


#################################################################################
#                                 Latent encoder                                #
#################################################################################

@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A 9-image folder encoded by a tiny random AutoencoderKL (downsampling ×2) through Ray Data."""
    import ray
    from diffusers import AutoencoderKL

    from core.encode_latents import main

    root = tmp_path_factory.mktemp("encode")
    images = make_folder(root / "images")
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae.save_pretrained(root / "vae")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        main(["--data-path", str(images), "--vae", str(root / "vae"), "--out", str(root / "latents"),
              "--image-size", "16", "--batch-size", "2", "--num-workers", "1", "--shard-size", "4"])
    finally:
        ray.shutdown()
    return root, vae.eval()


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


def test_latent_dataset_holds_every_image_and_its_mirror(encoded):
    root, _ = encoded
    out = root / "latents"
    assert dataset_info("latents", path=out) == dict(input_size=8, in_channels=4, num_classes=3, num_images=9,
                                                     pixel_space=False)
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
