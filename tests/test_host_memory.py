"""core.host_memory: a process that frees and takes the same tensors every step keeps their pages mapped."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from core.host_memory import users_settings

REPO = Path(__file__).resolve().parents[1]

# A 9 MiB block (the size of a step's larger tensors) taken from glibc's malloc, written and freed, eight rounds for
# the heap to grow to it, then twenty more whose minor page faults it prints. START "trimming" first sets glibc as it
# is where it thrashes: blocks over 128 KiB mapped afresh and handed back at their free, the heap's top trimmed at
# every free. Its own moving thresholds land there or not by the order of a process's first allocations (torch
# tensors taken and freed the same way faulted all their pages again every round in a quarter to a half of fresh
# processes here, and never in the rest). malloc itself, not torch: torch's small allocations between the blocks
# decide from process to process whether the heap's top can be trimmed at all.
ROUNDS = """
import ctypes, resource, sys
from core.host_memory import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, hold_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
assert libc.prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE: one fault a 4 KiB page, whatever the host's huge pages
start, hold = sys.argv[1:]
if start == "trimming":
    libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)
    libc.mallopt(M_TRIM_THRESHOLD, 0)
held = hold_freed_memory() if hold == "hold" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def step():
    block = libc.malloc(9 << 20)
    ctypes.memset(block, 1, 9 << 20)
    libc.free(block)

for _ in range(8):
    step()
count_from = faults()
for _ in range(20):
    step()
print(held, faults() - count_from)
"""
BLOCK_PAGES = 9 << 8  # 4 KiB pages
ALL_PAGES = 20 * BLOCK_PAGES  # the block's pages mapped again in every round

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's malloc's")


@pytest.fixture
def glibc_env(fresh_process_env):
    """The environment of a process on glibc's malloc as it starts: no user thresholds, no preloaded allocator."""
    drop = {*users_settings(fresh_process_env), "LD_PRELOAD"}
    # CPU alone: core.train and sampling set the thresholds for CPU work only.
    return {**{k: v for k, v in fresh_process_env.items() if k not in drop}, "CUDA_VISIBLE_DEVICES": ""}


def rounds(env, start, hold):
    """(what hold_freed_memory returned, the counted rounds' page faults) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", ROUNDS, start, hold], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    held, faults = out.stdout.split()
    return held, int(faults)


@glibc
@pytest.mark.parametrize("start", ["default", "trimming"])
def test_freed_tensors_keep_their_pages(glibc_env, start):
    # From glibc's start these rounds do not thrash either (its threshold moves up to the block at the first free):
    # "trimming" is the start that shows both thresholds are needed; "default" that holding changes nothing there.
    held, faults = rounds(glibc_env, start, "hold")
    assert held == "True"
    assert faults < BLOCK_PAGES  # fewer than one block's pages: those the first rounds mapped, taken again (0 here)


@glibc
def test_without_it_the_rounds_map_their_pages_again(glibc_env):
    _, faults = rounds(glibc_env, "trimming", "-")
    assert faults >= 0.99 * ALL_PAGES


@glibc
@pytest.mark.parametrize("setting", [{"MALLOC_TRIM_THRESHOLD_": "0"},
                                     {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_a_users_own_malloc_settings_stand(glibc_env, setting):
    held, faults = rounds({**glibc_env, **setting}, "default", "hold")  # trim at every free: theirs, kept
    assert held == "False"
    assert faults >= 0.99 * ALL_PAGES


def test_only_threshold_settings_count_as_the_users():
    assert users_settings({"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) == []
    assert users_settings({"MALLOC_MMAP_MAX_": "0", "GLIBC_TUNABLES": "glibc.malloc.top_pad=0:glibc.pthread.rseq=0"}) \
        == ["MALLOC_MMAP_MAX_", "GLIBC_TUNABLES"]


# A CPU training run, then (another process) CPU sampling: each sets the thresholds before its first step.
TRAIN = """
import sys
from core import host_memory
from core.train import TrainConfig, train
assert not host_memory.held
train(TrainConfig(model="DiT-P/4", dataset="digits", batch_size=8, max_steps=1, zero_stage=0, val_batch=0,
                  num_workers=0), sys.argv[1])
print(host_memory.held)
"""
SAMPLE = """
import torch
from core import host_memory
from core.evaluate import EvalConfig, generate
from core.models import DiT, model_config
assert not host_memory.held
images = generate(DiT(**model_config("DiT-P/4")).eval(), EvalConfig(num_steps=2, batch_size=4), torch.arange(4),
                  torch.arange(4), device="cpu")
print(host_memory.held, tuple(images.shape))
"""


@glibc
def test_cpu_training_and_sampling_hold_freed_memory(tmp_path, glibc_env):
    for code, printed in ((TRAIN, "True"), (SAMPLE, "True (4, 1, 8, 8)")):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=glibc_env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.splitlines()[-1] == printed
