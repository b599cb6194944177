"""`python -m core.encode_latents`: encode an image folder once into VAE latent shards, in parallel with Ray Data."""
import argparse

from core.latents import VAEError, encode_folder, encode_option_problem, out_problem


def check_arguments(args):
    """Raise ValueError naming the flag whose value cannot work, before Ray starts or --out is touched."""
    problem = encode_option_problem(args.image_size, args.batch_size, args.shard_size, args.num_workers, args.seed)
    if problem:
        name, value, what = problem
        raise ValueError(f"--{name.replace('_', '-')} {value}: {what}")
    problem = out_problem(args.out)
    if problem:
        raise ValueError(f"--out {args.out}: {problem}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-path", required=True, help="ImageNet-style folder: one sub-folder of images per class")
    parser.add_argument("--vae", required=True, help="local folder of a diffusers AutoencoderKL (e.g. sd-vae-ft-ema)")
    parser.add_argument("--out", required=True,
                        help="output folder for the shards and meta.json: new, empty, or an earlier encode, which is "
                             "replaced once the new one is complete")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="images per VAE forward pass")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="VAE copies; default (or 0): one per GPU, or the CPUs less one without GPUs")
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent samples (per image)")
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
        meta = encode_folder(args.data_path, args.vae, args.out, args.image_size, batch_size=args.batch_size,
                             num_workers=args.num_workers, shard_size=args.shard_size, seed=args.seed)
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
