"""A description of the machine a benchmark ran on, and its measured fp32 matmul peak."""
import os
import platform
import time

import torch

from core.linear import ONEDNN_PREFERRED


def describe():
    """One line: CPU model and the vector instructions torch uses on it, cores, torch version, GPU if any.

    The instructions matter beside the model name: machines named alike ("AMD EPYC") differ in them,
    and with them the speed, bf16's cost on CPU, the library core's fp32 linears run on (core/linear.py),
    and the last digits of a trained model's FID.
    """
    cpu = platform.processor() or platform.machine()
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in info if line.startswith("flags")))
    except (OSError, StopIteration):
        pass
    vector = torch.backends.cpu.get_cpu_capability()
    if flags & {"avx512_bf16", "amx_bf16"}:
        vector += " with bf16 dot products"
    if ONEDNN_PREFERRED:
        vector += ", fp32 linears on oneDNN"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu} ({vector}), {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads{gpu}")


def matmul_peak_tflops(n=2048, dtype=torch.float32, device="cpu", seconds=2.0):
    """Achieved TFLOP/s of a large square matmul: the practical peak the training step is held to.

    On CPU the best of torch's BLAS (MKL) and oneDNN: on AVX-512 CPUs that are not Intel's MKL runs its
    AVX2 kernels and reaches half of what the machine does (see core/linear.py).
    """
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    products = [lambda: a @ b]
    if torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available():
        b_t = b.t().contiguous()
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], ""))
    return max(_product_tflops(product, n, device, seconds) for product in products)


def _product_tflops(product, n, device, seconds):
    warm = time.perf_counter()
    while time.perf_counter() - warm < seconds / 2:  # let clocks settle before timing
        product()
        _sync(device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        product()
        runs += 1
    _sync(device)
    return 2 * n ** 3 * runs / (time.perf_counter() - start) / 1e12


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
