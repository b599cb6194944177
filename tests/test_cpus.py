"""core.cpus: the CPUs a process may run on, as its affinity mask sets them."""
import os
import subprocess
import sys

import pytest

from core.cpus import usable_cpus


def allowed_by_the_kernel():
    """The CPUs the kernel lets this process run on, from /proc/self/status's list ("0-3,8,10-11")."""
    line = next(l for l in open("/proc/self/status") if l.startswith("Cpus_allowed_list:"))
    spans = [part.split("-") for part in line.split(":")[1].strip().split(",")]
    return sum(int(s[-1]) - int(s[0]) + 1 for s in spans)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the kernel's list is Linux's /proc")
def test_usable_cpus_is_what_this_process_may_run_on():
    assert usable_cpus() == allowed_by_the_kernel()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="affinity masks are Linux's")
def test_usable_cpus_follows_a_narrowed_affinity_mask():
    # A process pinned to one CPU (taskset, a container's cpuset) must plan for one, whatever the machine has.
    one_cpu = sorted(os.sched_getaffinity(0))[:1]
    code = f"import os; os.sched_setaffinity(0, {one_cpu}); from core.cpus import usable_cpus; print(usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
