"""core.cpus: the CPUs a process may run on, as its affinity mask sets them."""
import os
import subprocess
import sys

import pytest

from core.cpus import usable_cpus


def test_usable_cpus_is_what_this_process_may_run_on():
    assert 1 <= usable_cpus() <= os.cpu_count()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="affinity masks are Linux's")
def test_usable_cpus_follows_a_narrowed_affinity_mask():
    # A process pinned to one CPU (taskset, a container's cpuset) must plan for one, whatever the machine has.
    one_cpu = sorted(os.sched_getaffinity(0))[:1]
    code = f"import os; os.sched_setaffinity(0, {one_cpu}); from core.cpus import usable_cpus; print(usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
