"""The CPUs this process may run on."""
import os


def usable_cpus():
    """CPUs in this process's affinity mask (a container's or taskset's share), else every CPU the OS reports."""
    # os.process_cpu_count says the same from Python 3.13; the project supports 3.10.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
