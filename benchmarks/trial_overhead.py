"""Orchestration overhead of scaling.run: per-trial start-up and teardown, and the study's efficiency.

    python -m benchmarks.trial_overhead [--trials 4] [--steps 20] [--study studies/gflops_sweep.yaml] [--cpu]
    python -m benchmarks.trial_overhead --trials 1 --timeline

Without --study it runs a study of `--trials` tiny trials (DiT-P/4 on digits, FID off), so that
nearly all of a trial's time is overhead: scheduled → first training step (Tune trial actor, Ray
Train controller and worker group, imports, process group, DeepSpeed engine, data) and last report →
free slot. With --study it runs that study (e.g. the default) in a fresh output folder and reports
its efficiency: training + evaluation time as a share of the trial slots' wall time. The numbers
come from what scaling.run itself logs to MLflow (startup_s, teardown_s, efficiency).
With --cpu (Linux) it also prints the CPU seconds of every process the study started, by kind
(Ray's actors by class): where the trials' start-up and idle costs go on a small machine.
With --timeline (one tiny trial) the study runs on a Ray instance this script starts, so that Ray's task events
outlive the driver: the lone trial's start-up, phase by phase, from the moment Tune scheduled it.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import scaling.no_telemetry  # noqa: F401 - first: before MLflow and Ray are imported
from mlflow.tracking import MlflowClient

from benchmarks.flags import positive_int
from benchmarks.machine import describe
from scaling.study import StudyError, load_study
from scaling.tracking import OUTPUT_TAG

REPO = Path(__file__).resolve().parents[1]


def tiny_study(folder, trials, steps):
    """A study of `trials` identical-cost trials (seeds differ) whose time is mostly overhead."""
    path = folder / "overhead.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: overhead
        data: {{dataset: digits}}
        sweep: {{model: [DiT-P], patch: [4], steps: [{steps}], train.seed: {list(range(trials))}}}
        train: {{batch_size: 32, ema_decay: 0.9, log_every: {max(1, steps // 2)}, ckpt_every: {steps}, val_batch: 32}}
        eval: {{fid: false}}
        resources: {{workers_per_trial: 1, cpus_per_worker: 1}}
        output: {folder / "out"}
        """))
    return path


def run_study(study, output, cpu=None, address=None):
    """Run scaling.run on a study with its output redirected; returns (wall seconds, stdout).

    cpu: a dict that receives {process kind: CPU seconds} of the driver and everything it started.
    address: a running Ray instance to run on (default: the driver starts its own).
    """
    start = time.time()
    command = [sys.executable, "-m", "scaling.run", str(study), "--no-report", "--set", f"output={output}"]
    if address:
        command += ["--address", address]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = None
    if cpu is not None:
        watcher = threading.Thread(target=_watch_cpu, args=(proc, cpu), daemon=True)
        watcher.start()
    stdout, stderr = proc.communicate()
    if watcher:
        watcher.join()
    if proc.returncode != 0:
        sys.exit(f"scaling.run failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return time.time() - start, stdout


def _watch_cpu(proc, totals, every=0.25):
    """Poll /proc until the driver exits: the last CPU time seen of each of its descendants, by kind."""
    tick = os.sysconf("SC_CLK_TCK")
    last = {}  # pid -> (kind, CPU seconds); processes that exit keep their last reading
    while proc.poll() is None:
        parents, seen = {}, {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            pid = int(stat.parent.name)
            fields = text.rsplit(")", 1)[1].split()  # state, ppid, ..., utime (12th), stime (13th)
            parents[pid] = int(fields[1])
            seen[pid] = (_kind(text[text.index("(") + 1:text.rindex(")")], cmdline),
                         (int(fields[11]) + int(fields[12])) / tick, cmdline != [b""])
        for pid, (kind, seconds, named) in seen.items():
            ancestor = pid
            while ancestor not in (0, 1, proc.pid) and ancestor in parents:
                ancestor = parents[ancestor]
            if ancestor == proc.pid:
                # An exiting process has no cmdline left, only its name cut to 15 characters: it keeps its kind.
                last[pid] = (kind if named or pid not in last else last[pid][0], seconds)
        time.sleep(every)
    for kind, seconds in last.values():
        totals[kind] = totals.get(kind, 0.0) + seconds


def _kind(comm, cmdline):
    """A process's kind: Ray's actor class, a Ray daemon's name, or the script it runs."""
    head = cmdline[0].decode(errors="replace")
    if head.startswith("ray::"):
        return head.split(".")[0].split()[0]  # ray::ImplicitFunc.train -> ray::ImplicitFunc
    if "scaling.run" in b" ".join(cmdline).decode(errors="replace"):
        return "driver (python -m scaling.run)"
    for arg in cmdline[1:3]:
        name = Path(arg.decode(errors="replace")).name
        if name.endswith(".py"):
            return name
    return comm


# A trial's start as Ray records it, in order: (task name, state it starts from, state it ends at, what it is).
START_PHASES = [
    ("ImplicitFunc.__init__", "PENDING_NODE_ASSIGNMENT", "RUNNING", "Tune trial actor: a worker process starts"),
    ("ImplicitFunc.__init__", "RUNNING", "FINISHED", "Tune trial actor: imports (Ray Tune, Train)"),
    ("trial_function.train", "RUNNING", None, "Tune trial function runs"),
    ("TrainController.__init__", "PENDING_NODE_ASSIGNMENT", "RUNNING", "Train controller: a worker process starts"),
    ("TrainController.__init__", "RUNNING", "FINISHED", "Train controller: imports (Ray Train)"),
    ("SynchronizationActor.__init__", "PENDING_NODE_ASSIGNMENT", "FINISHED", "Train's synchronization actor, started"),
    ("RayTrainWorker.__init__", "PENDING_NODE_ASSIGNMENT", "RUNNING", "Train worker: a worker process starts"),
    ("RayTrainWorker.__init__", "RUNNING", "FINISHED", "Train worker: imports (Ray Train)"),
    ("execute._set_distributed_env_vars", "RUNNING", "FINISHED", "Train worker: imports torch (process-group set-up)"),
    ("execute._init_process_group", "RUNNING", "FINISHED", "Train worker: torch process group"),
    ("RayTrainWorker.run_train_fn", "RUNNING", None, "Train worker: the training function starts"),
]


def start_timeline(exclude_job, scheduled_at, first_step_at):
    """[(from s, to s, what)] of a lone trial's start, from Ray's task events, in seconds after Tune scheduled it."""
    from ray.util.state import list_tasks

    time.sleep(3)  # workers report task events every second; let the last ones land
    states = {}  # task name -> {state: first time seen}
    for task in list_tasks(detail=True, limit=10_000, raise_on_missing_output=False):
        if task.job_id == exclude_job:
            continue
        seen = states.setdefault(task.name, {})
        for event in task.events or []:
            at = event["created_ms"] / 1000
            seen[event["state"]] = min(at, seen.get(event["state"], at))
    rows = []
    for name, begin, end, what in START_PHASES:
        if begin in states.get(name, {}):
            start = states[name][begin] - scheduled_at
            stop = states[name][end] - scheduled_at if end in states[name] else None
            rows.append((start, stop, what))
    rows.append((first_step_at - scheduled_at, None, "first training step"))
    return sorted(rows, key=lambda row: row[0])


def study_runs(uri, experiment, output):
    """(the study's MLflow run of output, its trials' runs in the order the trials were scheduled) from its store,
    which may hold other runs of the study (a tracking server)."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags
                  and r.data.tags.get(OUTPUT_TAG) == str(Path(output).resolve()))
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # In the order the trials were scheduled: the first ones start beside Ray's own start-up.
    children.sort(key=lambda r: float(r.data.tags.get("dit_scaling.started_at", "inf")))
    return parent, children


def mlflow_numbers(parent, children):
    """(per-trial startup_s, teardown_s lists, the study's efficiency, its wall time) from its runs."""
    startup = [r.data.metrics["startup_s"] for r in children if "startup_s" in r.data.metrics]
    teardown = [r.data.metrics["teardown_s"] for r in children if "teardown_s" in r.data.metrics]
    return startup, teardown, parent.data.metrics.get("efficiency"), parent.data.metrics.get("wall_time_s")


def _figure(value, spec):
    """value formatted, or n/a where the driver logged none (a store away at the study's end)."""
    return "n/a" if value is None else format(value, spec)


def first_trial_start(children):
    """(when Tune scheduled the first trial, when its first step began), in seconds since the epoch."""
    scheduled = float(children[0].data.tags["dit_scaling.started_at"])
    return scheduled, scheduled + children[0].data.metrics["startup_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=positive_int, default=None, help="of the tiny study (default 4)")
    parser.add_argument("--steps", type=positive_int, default=None, help="of the tiny study's trials (default 20)")
    parser.add_argument("--study", default=None, help="measure this study instead of the tiny one")
    parser.add_argument("--cpu", action="store_true", help="also print the CPU seconds of each kind of process")
    parser.add_argument("--timeline", action="store_true",
                        help="one tiny trial on a Ray instance of this script's: its start-up, phase by phase")
    args = parser.parse_args()
    if args.study and (args.trials or args.steps):
        parser.error("--trials and --steps shape the tiny study: --study runs its own grid")
    args.trials, args.steps = args.trials or 4, args.steps or 20
    if args.timeline and (args.trials != 1 or args.study or args.cpu):
        parser.error("--timeline measures one tiny trial: give it --trials 1, without --study or --cpu")
    try:
        if args.study:
            load_study(args.study)  # refused here, before the machine is measured
    except StudyError as e:
        parser.error(f"--study: {e}")
    print(f"machine: {describe()}")
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        tmp = Path(tmp)
        study = Path(args.study).resolve() if args.study else tiny_study(tmp, args.trials, args.steps)
        # The store the run below logs to: the study's own, else its output's, the one given here as scaling.run's
        # --set gives it (the study file's output would name another run's store).
        run_as = load_study(study, [f"output={tmp / 'out'}"])
        store, experiment = run_as.raw["tracking"]["mlflow_uri"], run_as.raw["tracking"]["experiment"] or run_as.name
        cpu = {} if args.cpu else None
        address = None
        if args.timeline:
            import ray

            from scaling.ray_env import local_ray_options

            ray.init(**local_ray_options())  # as scaling.run starts its own
            address = ray.get_runtime_context().gcs_address
        total, stdout = run_study(study, tmp / "out", cpu, address)
        parent, children = study_runs(store, experiment, tmp / "out")
        startup, teardown, efficiency, wall = mlflow_numbers(parent, children)
        if args.timeline:
            timeline = start_timeline(ray.get_runtime_context().get_job_id(), *first_trial_start(children))
            ray.shutdown()
    print(f"study: {study.name}, {len(startup)} trials, command wall time {total:.1f} s (Ray start-up included), "
          f"study wall time {_figure(wall, '.1f')} s")
    for key, values in (("scheduled → first step", startup), ("last report → free slot", teardown)):
        if values:
            print(f"{key:>26}: median {statistics.median(values):5.1f} s  (min {min(values):.1f}, "
                  f"max {max(values):.1f})")
    print(f"{'start-up, in start order':>26}: {', '.join(f'{s:.1f}' for s in startup)} s")
    print(f"{'study efficiency':>26}: {_figure(efficiency, '.1%')}  (training + evaluation / trial slots × wall time)")
    if args.timeline:
        print("the trial's start-up on a Ray instance already running, from Ray's task events (s after Tune "
              "scheduled it):")
        for start, stop, what in timeline:
            span = f"{start:6.2f} → {stop:6.2f}  ({stop - start:5.2f})" if stop is not None else f"{start:6.2f}"
            print(f"  {span:30} {what}")
    if cpu:
        print(f"CPU seconds of the driver and every process it started ({sum(cpu.values()):.1f} in all):")
        for kind, seconds in sorted(cpu.items(), key=lambda item: -item[1]):
            if seconds >= 0.1:
                print(f"  {seconds:7.1f}  {kind}")


if __name__ == "__main__":
    main()
