"""argparse types for the benchmarks' flags, so that a bad flag is a usage error (exit 2) rather than a traceback."""
import argparse

from core.models import DiT_models


def positive_int(text):
    """A whole number of at least 1: a batch, a step or round count, a thread count."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def preset(text):
    """A name in core.models' registry, e.g. "DiT-T/2"."""
    if text not in DiT_models:
        raise argparse.ArgumentTypeError(f"unknown model {text!r} (known: {', '.join(DiT_models)})")
    return text


def check_window_steps(parser, steps, window):
    """Refuse --steps that are not whole windows of `window` steps, two at least: the first is warm-up, and core.train
    logs at max_steps too, so a partial last window (noisier) would be among those the best is taken of."""
    if steps < 2 * window or steps % window:
        parser.error(f"--steps must be a multiple of {window}, at least {2 * window}: the first {window}-step window "
                     "is warm-up, and every window as long")
