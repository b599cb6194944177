"""core.host_memory: a process that frees and takes the same tensors every step keeps their pages mapped."""
import os
import platform
import subprocess
import sys

import pytest

from core.host_memory import USER_SETTINGS

# Three 3 MiB tensors (768 pages each) taken, written and freed, eight rounds for the heap to grow to its size, then
# twenty more whose minor page faults it prints. START "trimming" first sets glibc as it is when it thrashes: blocks
# over 128 KiB mapped afresh and handed back, the heap's top trimmed at every free. Its own dynamic thresholds land
# there or not by the order of a process's first allocations: the same rounds fault 30,080 times in about half of
# fresh processes and none in the others.
ROUNDS = """
import ctypes, resource, sys, torch
from core.host_memory import M_TRIM_THRESHOLD, hold_freed_memory
start, hold = sys.argv[1:]
if start == "trimming":
    ctypes.CDLL(None).mallopt(M_TRIM_THRESHOLD, 0)  # also fixes the mmap threshold at its first value, 128 KiB
held = hold_freed_memory() if hold == "hold" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    a = [torch.empty(3 << 18).fill_(1) for _ in range(3)]; del a
count_from = faults()
for _ in range(20):
    a = [torch.empty(3 << 18).fill_(1) for _ in range(3)]; del a
print(held, faults() - count_from)
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's malloc's")


def rounds(start, hold, **env):
    """(what hold_freed_memory returned, the counted rounds' page faults) in a fresh process."""
    environ = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", ROUNDS, start, hold], capture_output=True, text=True, check=True,
                         env={**environ, **env})
    held, faults = out.stdout.split()
    return held, int(faults)


@glibc
@pytest.mark.parametrize("start", ["default", "trimming"])
def test_freed_tensors_keep_their_pages(start):
    assert rounds(start, "hold") == ("True", 0)  # the pages the first rounds mapped, taken again every round


@glibc
def test_without_it_the_rounds_map_their_pages_again():
    _, faults = rounds("trimming", "-")
    assert faults >= 20 * 3 * 768 * 0.99  # every tensor's pages, every round


@glibc
def test_a_users_own_malloc_settings_stand():
    held, faults = rounds("default", "hold", MALLOC_TRIM_THRESHOLD_="0")  # trim at every free: theirs, kept
    assert held == "False"
    assert faults >= 20 * 3 * 768 * 0.99


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
def test_cpu_training_and_sampling_hold_freed_memory(tmp_path):
    # Without the one-process group an in-process test of this session may have left in the environment.
    own = {*USER_SETTINGS, "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    environ = {k: v for k, v in os.environ.items() if k not in own}
    for code, printed in ((TRAIN, "True"), (SAMPLE, "True (4, 1, 8, 8)")):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=environ,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.splitlines()[-1] == printed
