"""Whether every node of a Ray cluster sees the study's files where the driver does, checked before launch.

Ray keeps each trial's checkpoints under `<output>/ray`, written by the node the trial's workers run on and read
back by whichever node resumes it, and every worker reads data.path and the eval files. Ray Train checks its own
storage as each trial's workers start (a marker file its controller writes): a study whose output is on one node's
disk would launch, and fail its trials one by one, each after its retries, with nothing said of data.path or the
eval files, which a worker reads only when it trains or evaluates.
"""
import os
import uuid
from pathlib import Path

CHECK_TIMEOUT_S = 120  # a node's first task sets up the study's runtime environment there


def unseen_paths(paths, timeout=CHECK_TIMEOUT_S):
    """{node address and id: [the paths it cannot see]} over the cluster's live nodes, by a zero-CPU task pinned to
    each; empty on a one-node cluster, and None when a node did not answer within timeout seconds."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return {}
    check = ray.remote(num_cpus=0)(_missing)
    refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        [str(p) for p in paths]) for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if len(ready) < len(refs):
        for ref in refs:
            ray.cancel(ref, force=True)
        return None
    seen = {}
    for node, missing in zip(nodes, ray.get(refs)):
        if missing:
            seen[f"{node['NodeManagerAddress']} (id {node['NodeID'][:12]})"] = missing  # nodes may share an address
    return seen


def _missing(paths):
    return [p for p in paths if not os.path.exists(p)]


def output_marker(output):
    """A new, empty file in the output folder that only this run knows of: a node that sees it sees the output."""
    marker = Path(output) / f".shared-check-{uuid.uuid4().hex[:12]}"
    marker.touch()
    return marker
