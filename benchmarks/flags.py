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
