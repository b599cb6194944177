"""A description of the machine a benchmark ran on, and its measured fp32 matmul peak."""
import os
import platform
import threading
import time
from importlib import metadata

import torch

from core.cpus import usable_cpus
from core.linear import ONEDNN_PREFERRED


def describe():
    """One line: CPU model and the vector instructions torch uses on it, the CPUs this process may use (of those the
    machine has), torch's, DeepSpeed's and Ray's versions, the GPUs if any.

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
        vector += " with bf16 dot products" + (" and AMX tiles" if "amx_bf16" in flags else "")
    if ONEDNN_PREFERRED:
        vector += ", fp32 linears on oneDNN"
    gpu = (f", {torch.cuda.device_count()} × GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
           if torch.cuda.is_available() else "")
    # A container's or taskset's share may be less than the machine's: the figures are that share's.
    share, machine = usable_cpus(), os.cpu_count()
    cpus = f"{share} CPUs" + (f" of the machine's {machine}" if machine and machine != share else "")
    return (f"{cpu} ({vector}), {cpus}, torch {torch.__version__} on {torch.get_num_threads()} threads, "
            f"{_version('deepspeed')}, {_version('ray')}{gpu}")


def _version(package):
    """'package X.Y' from its installed metadata (no import: Ray's and DeepSpeed's start threads and logs)."""
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"no {package}"


def matmul_peak_tflops(n=2048, dtype=torch.float32, device="cpu", seconds=2.0, copies=1):
    """Achieved TFLOP/s of a large square matmul: the practical peak the training step is held to.

    On CPU the best of torch's BLAS (MKL) and oneDNN: on AVX-512 CPUs that are not Intel's MKL runs its
    AVX2 kernels and reaches half of what the machine does (see core/linear.py). The figure is the best of
    short windows, as the training figures are, not a mean that a busy moment would lower. With COPIES > 1 it
    is the higher of one product on all threads and COPIES one-thread products run at once (summed): MKL's
    product on two threads can fall short of two one-thread products, the layout of one trial per core.
    """
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    products = [lambda: a @ b]
    if torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available():
        b_t = b.t().contiguous()
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], ""))
    peak = max(_product_tflops(product, n, device, seconds) for product in products)
    if copies > 1:
        peak = max(peak, max(_side_by_side_tflops(product, n, seconds, copies) for product in products))
    return peak


def _product_tflops(product, n, device, seconds, window=0.25):
    """The best rate over windows of at least WINDOW seconds, after SECONDS / 2 of warm-up."""
    warm = time.perf_counter()
    while time.perf_counter() - warm < seconds / 2:  # let clocks settle before timing
        product()
        _sync(device)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        runs, start = 0, time.perf_counter()
        while runs == 0 or time.perf_counter() - start < window:
            product()
            runs += 1
        _sync(device)  # a GPU runs behind the loop that queues its products: the window ends when they are done
        best = max(best, 2 * n ** 3 * runs / (time.perf_counter() - start) / 1e12)
    return best


def _side_by_side_tflops(product, n, seconds, copies):
    """Summed rate of COPIES CPU threads each running the product on one thread, best of four rounds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each product runs in its calling thread; torch releases the GIL inside it
    try:
        best = 0.0
        for _ in range(4):
            barrier, rates = threading.Barrier(copies), []

            def run():
                # Each thread's own: OpenMP's thread count is per thread, and a new one starts with the default (all
                # cores), so each "one-thread" product ran on two threads, the copies on twice the cores there are.
                torch.set_num_threads(1)
                barrier.wait()
                runs, start = 0, time.perf_counter()
                while runs == 0 or time.perf_counter() - start < seconds / 4:
                    product()
                    runs += 1
                rates.append(2 * n ** 3 * runs / (time.perf_counter() - start) / 1e12)

            workers = [threading.Thread(target=run) for _ in range(copies)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            best = max(best, sum(rates))
        return best
    finally:
        torch.set_num_threads(threads)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":  # python -m benchmarks.machine: what each benchmark prints first
    print(f"machine: {describe()}")
    print(f"fp32 matmul peak (2048², best window): {matmul_peak_tflops(copies=torch.get_num_threads()) * 1e3:.1f} GFLOP/s")
