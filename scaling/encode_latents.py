"""`python -m scaling.encode_latents`: encode an image folder once into VAE latent shards, in parallel with Ray Data.

core.latents holds the shard format and writes the folder; this module spreads the VAE over Ray: one copy per
GPU, or per CPU process (`--device` chooses; by default GPUs where any are up).
"""
import argparse
import functools
from pathlib import Path

import scaling.no_telemetry  # noqa: F401 - first: before MLflow and Ray are imported
import numpy as np
import torch

from core.latents import (VAEError, encode_images, encode_option_problem, load_vae, out_problem, write_latent_folder,
                          write_shard)
from scaling.autoscaler_limits import UNLIMITED, autoscaler_limits


DEVICES = ("auto", "gpu", "cpu")


def encode_folder(data_path, vae_path, out_dir, image_size, batch_size=64, num_workers=None, shard_size=4096, seed=0,
                  device="auto"):
    """Encode an image folder into latent shards at out_dir (core.latents.write_latent_folder); returns its meta.

    Uses the running Ray instance (or starts a local one). A failed encode leaves out_dir as it was.
    """
    from core.data import scan_image_folder

    problem = encode_option_problem(image_size, batch_size, shard_size, num_workers, seed)
    if problem:
        raise ValueError("{} {}: {}".format(*problem))
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: must be one of {', '.join(DEVICES)}")
    classes, samples = scan_image_folder(data_path)
    vae = load_vae(vae_path)  # fail here, not in a Ray worker, on a bad VAE folder
    scale_factor, downsample = vae.config.scaling_factor, 2 ** (len(vae.config.block_out_channels) - 1)
    del vae
    if image_size % downsample:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling factor {downsample}")
    write_shards = functools.partial(_encode_shards, samples, image_size=image_size, vae_path=vae_path,
                                     batch_size=batch_size, num_workers=num_workers, shard_size=shard_size, seed=seed,
                                     device=device)
    meta = dict(num_images=len(samples), classes=classes, scale_factor=scale_factor, vae=str(Path(vae_path).resolve()),
                image_size=image_size, seed=seed)
    return write_latent_folder(out_dir, write_shards, meta)


def vae_workers(device, resources, num_workers=None, autoscaler=lambda: None):
    """(fewest VAE copies, most or None for no limit, each copy's Ray resources) for --device on a cluster holding
    `resources` now."""
    gpus = resources.get("GPU", 0)
    if device == "auto":
        device = "gpu" if gpus else "cpu"
    if device == "cpu":  # leave a CPU for the tasks that load images
        n = num_workers or max(1, int(resources.get("CPU", 1)) - 1)
        return n, n, dict(num_cpus=1)
    if gpus:
        n = num_workers or int(gpus) or 1  # a fraction of one GPU up still holds a copy
        return n, n, dict(num_gpus=1)
    # None up: a copy would wait for ever where none can come; ask the autoscaler (autoscaler_limits; None: none runs).
    limits = autoscaler()
    if limits is None:
        raise ValueError("--device gpu: the cluster has no GPU, and no autoscaler to add one")
    most = limits.max_resources.get("GPU", 0) if limits.known else UNLIMITED
    if not most:
        raise ValueError("--device gpu: the cluster has no GPU, and its autoscaler adds no node with one")
    if num_workers:
        return num_workers, num_workers, dict(num_gpus=1)
    # One copy asks for the first GPU node; Ray Data's autoscaling pool adds a copy for each GPU that comes while
    # images wait, so a node of 8 GPUs encodes on 8 (a fixed pool of one would leave 7 idle).
    return 1, None if most == UNLIMITED else max(1, int(most)), dict(num_gpus=1)


def _encode_shards(samples, folder, image_size, vae_path, batch_size, num_workers, shard_size, seed, device):
    """Write the latents of samples [(file, label), ...] as shards into folder; returns (shard list, latent shape)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    fewest, most, resources_per_worker = vae_workers(device, ray.cluster_resources(), num_workers, autoscaler_limits)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # shards in folder order
    rows = [{"path": p, "label": y, "index": i} for i, (p, y) in enumerate(samples)]
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(_load_images, fn_kwargs=dict(image_size=image_size), batch_size=batch_size)
    encoder = dict(vae_path=str(vae_path), seed=seed, on_gpu="num_gpus" in resources_per_worker)
    ds = ds.map_batches(_Encode, fn_constructor_kwargs=encoder, batch_size=batch_size,
                        compute=ray.data.ActorPoolStrategy(min_size=fewest, max_size=most), **resources_per_worker)

    return _write_batches(ds.iter_batches(batch_size=shard_size, batch_format="numpy"), folder, shard_size,
                          len(samples))


def _write_batches(batches, folder, shard_size, num_images):
    """Write Ray Data's batches (shard_size images each, the last fewer) as shards into folder; returns (shard list,
    latent shape). Raises unless they hold images 0..num_images-1 in order, each readable."""
    from core.data import UnreadableImage

    shards, latent_shape, written = [], None, 0
    for k, batch in enumerate(batches):
        unreadable = [str(e) for e in batch["error"] if e]
        if unreadable:
            raise UnreadableImage(unreadable[0])
        start = k * shard_size
        if not np.array_equal(batch["index"], np.arange(start, start + len(batch["index"]))):
            raise RuntimeError(f"Ray Data returned images out of order in shard {k}")
        latents = torch.from_numpy(batch["latents"].copy())  # (n, 2, C, h, w); Ray's arrays are read-only
        latent_shape = list(latents.shape[2:])
        shards.append(write_shard(folder, k, latents, batch["label"], batch["index"]))
        written = start + len(batch["index"])
    if written != num_images:  # the last index written is not the folder's last: the shards lack images it holds
        raise RuntimeError(f"Ray Data ended after {written} of the folder's {num_images} images")
    return shards, latent_shape


def _load_images(batch, image_size):
    """Ray Data batch function: file paths -> centre-cropped float32 (B, 3, S, S) in [-1, 1], and for each image
    why it could not be read ("" when it could)."""
    from core.data import UnreadableImage, image_transform, load_image

    transform = image_transform(image_size)  # the training transform; the mirror is encoded as view 1
    images, errors = [], []
    for path in batch["path"]:
        try:
            images.append(transform(load_image(path)).numpy())
            errors.append("")
        except UnreadableImage as err:
            # Handed on as data: raised here, it would reach the driver as Ray's own error, its file named only
            # inside a worker's traceback. The placeholder is encoded and never written.
            images.append(np.zeros((3, image_size, image_size), np.float32))
            errors.append(str(err))
    return {"image": np.stack(images), "label": batch["label"], "index": batch["index"], "error": np.array(errors)}


class _Encode:
    """Ray Data actor holding the VAE: images -> latents of each image and its mirror."""

    def __init__(self, vae_path, seed, on_gpu):
        # A CPU copy on a GPU node stays off the GPU that Ray did not give it.
        self.vae = load_vae(vae_path, "cuda" if on_gpu and torch.cuda.is_available() else "cpu")
        self.seed = seed

    def __call__(self, batch):
        latents = encode_images(self.vae, torch.from_numpy(batch["image"]), batch["index"], self.seed)
        return {"latents": latents.numpy(), "label": batch["label"], "index": batch["index"], "error": batch["error"]}


def check_arguments(args):
    """Raise ValueError naming the flag whose value cannot work, before Ray starts or --out is touched."""
    if not args.data_path:  # an unset variable, say: the current folder would be encoded
        raise ValueError("--data-path is empty; give the image folder (one sub-folder of images per class)")
    problem = encode_option_problem(args.image_size, args.batch_size, args.shard_size, args.num_workers, args.seed)
    if problem:
        name, value, what = problem
        raise ValueError(f"--{name.replace('_', '-')} {value}: {what}")
    data, out = Path(args.data_path).resolve(), Path(args.out).resolve()
    if out == data or data in out.parents or out in data.parents:
        # Within the images, the encode and its hidden siblings would be read as class folders by the next encode
        # (or an imagefolder study); around them, the swap would replace the images being encoded.
        where = "is" if out == data else "lies inside" if data in out.parents else "holds"
        raise ValueError(f"--out {args.out}: it {where} the image folder --data-path {args.data_path}; write the "
                         "latents beside it")
    problem = out_problem(args.out)
    if problem:
        raise ValueError(f"--out {args.out}: {problem}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m scaling.encode_latents", description=__doc__)
    parser.add_argument("--data-path", required=True, help="ImageNet-style folder: one sub-folder of images per class")
    parser.add_argument("--vae", required=True, help="local folder of a diffusers AutoencoderKL (e.g. sd-vae-ft-ema)")
    parser.add_argument("--out", required=True,
                        help="output folder for the shards and meta.json: new, empty, or an earlier encode, which is "
                             "replaced once the new one is complete")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="images per VAE forward pass")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="VAE copies; default (or 0): one per GPU up (where --device gpu finds none up yet, one, "
                             "and one more for each GPU the autoscaler adds while images wait), or the CPUs less one on "
                             "CPUs")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the VAE copies run: auto (GPUs where the cluster has any up when the encode starts, "
                             "else CPUs), gpu (also on an autoscaling cluster with none up yet: it adds them), cpu")
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent samples (per image)")
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
        meta = encode_folder(args.data_path, args.vae, args.out, args.image_size, batch_size=args.batch_size,
                             num_workers=args.num_workers, shard_size=args.shard_size, seed=args.seed,
                             device=args.device)
    except VAEError as err:
        parser.exit(2, f"error: --vae {args.vae}: {err}\n")
    except (FileNotFoundError, ValueError) as err:  # an unreadable image among them: its message names the file
        parser.exit(2, f"error: {err}\n")
    except OSError as err:  # writing the shards (a full disk, storage that refuses the write): nothing is left
        parser.exit(1, f"error: {err}\n")
    print(f"encoded {meta['num_images']} images of {len(meta['classes'])} classes into {len(meta['shards'])} shards "
          f"of latents {tuple(meta['latent_shape'])} in {args.out}")


if __name__ == "__main__":
    main()
