"""Trial packing on a cluster: a simulated cluster of CPU nodes, more trials than fit at once.

    python -m benchmarks.packing [--nodes 3] [--cpus-per-node 2] [--trials 7]

Starts a Ray cluster of --nodes nodes on this machine (ray.cluster_utils.Cluster; each node
advertises --cpus-per-node CPUs), runs a study of --trials short trials of 2 workers × 1 CPU each
(a trial's workers on one node or spread over several: Ray Train's PACK placement is soft)
through `python -m scaling.run --address`, and reads each trial's start and end from its MLflow
run. It prints the timeline and, for every trial that had to wait, how long its slot stayed free
before it started: packing works when the cluster runs as many trials as fit whenever some are
pending, and a freed slot is refilled within moments. The nodes share this machine's cores, so
trials run slower than on a real cluster; the scheduling is what is measured.
"""
import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import scaling.no_telemetry  # noqa: F401 - first: before MLflow and Ray are imported
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from benchmarks.flags import positive_int
from benchmarks.machine import describe
from scaling.tracking import default_tracking_uri

REPO = Path(__file__).resolve().parents[1]
WORKERS, CPUS_PER_WORKER = 2, 1


def study_file(folder, trials):
    path = folder / "packing.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: packing
        data: {{dataset: digits}}
        sweep: {{model: [DiT-P], patch: [4], steps: [30], train.seed: {list(range(trials))}}}
        train: {{batch_size: 32, ema_decay: 0.9, log_every: 10, ckpt_every: 30, val_batch: 32}}
        eval: {{fid: false}}
        resources: {{workers_per_trial: {WORKERS}, cpus_per_worker: {CPUS_PER_WORKER}}}
        output: {folder / "out"}
        """))
    return path


def trial_spans(output):
    """[(start, end)] in seconds of every trial, from the study's first start: when its Tune trial
    started (its MLflow run's started_at tag; the run itself is created at launch) to its run's end."""
    client = MlflowClient(default_tracking_uri(output))  # where scaling.run logs it (MLFLOW_TRACKING_URI, if set)
    exp = client.get_experiment_by_name("packing")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    spans = sorted((float(r.data.tags["dit_scaling.started_at"]), r.info.end_time / 1e3) for r in runs)
    t0 = spans[0][0]
    return [(s - t0, e - t0) for s, e in spans]


def trials_at_once(nodes, cpus_per_node, trials):
    """How many of the study's trials the cluster holds at once, as scaling.run packs them (scaling.study's
    trials_that_fit: the cluster's totals, and each worker whole on one node)."""
    from scaling.study import load_study, trials_that_fit

    with tempfile.TemporaryDirectory(prefix="packing-") as tmp:
        study = load_study(study_file(Path(tmp), trials), check_data=False)
    node = {"CPU": float(cpus_per_node)}
    return trials_that_fit(study, {"CPU": float(nodes * cpus_per_node)}, [node] * nodes)


def refill_gaps(spans, capacity):
    """For each trial beyond the first wave: seconds between the slot it took becoming free and its start."""
    gaps = []
    ends = sorted(e for _, e in spans)
    for k, (start, _) in enumerate(spans[capacity:]):
        freed = ends[k]  # the (k+1)-th trial to finish frees the slot the (capacity+k+1)-th trial takes
        gaps.append(start - freed)
    return gaps


def concurrency(spans, t):
    return sum(s <= t < e for s, e in spans)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=positive_int, default=3)
    parser.add_argument("--cpus-per-node", type=positive_int, default=2)
    parser.add_argument("--trials", type=positive_int, default=7)
    args = parser.parse_args()
    capacity = trials_at_once(args.nodes, args.cpus_per_node, args.trials)
    if not capacity:
        parser.error(f"--nodes × --cpus-per-node must be at least {WORKERS * CPUS_PER_WORKER}: a trial's {WORKERS} "
                     f"workers of {CPUS_PER_WORKER} CPU, on one node or spread over several")
    print(f"machine: {describe()}")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=args.cpus_per_node)
    cluster.wait_for_nodes()
    try:
        with tempfile.TemporaryDirectory(prefix="packing-") as tmp:
            tmp = Path(tmp)
            proc = subprocess.run([sys.executable, "-m", "scaling.run", str(study_file(tmp, args.trials)),
                                   "--address", cluster.address, "--no-report"], cwd=REPO, capture_output=True,
                                  text=True)
            if proc.returncode:
                sys.exit(f"scaling.run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            spans = trial_spans(tmp / "out")
    finally:
        cluster.shutdown()
    wall = max(e for _, e in spans)
    print(f"cluster: {args.nodes} nodes × {args.cpus_per_node} CPUs; trials of {WORKERS} workers × "
          f"{CPUS_PER_WORKER} CPU: {capacity} fit at once; {len(spans)} trials")
    for i, (s, e) in enumerate(spans):
        bar = " " * int(s / wall * 60) + "█" * max(1, int((e - s) / wall * 60))
        print(f"  trial {i}: {s:6.1f} → {e:6.1f} s  |{bar}")
    busy_until = sorted(s for s, _ in spans)[-1]  # the last start: trials were pending until then
    samples = [t * busy_until / 200 for t in range(200)]
    full = sum(concurrency(spans, t) >= capacity for t in samples) / len(samples)
    gaps = refill_gaps(spans, capacity)
    print(f"while trials were pending (0 – {busy_until:.1f} s): all {capacity} slots busy {full:.0%} of the time")
    if gaps:
        print(f"a freed slot was refilled after {sum(gaps) / len(gaps):.2f} s on average (max {max(gaps):.2f} s)")


if __name__ == "__main__":
    main()
