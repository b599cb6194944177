"""Orchestration overhead of scaling.run: per-trial start-up and teardown, and the study's efficiency.

    python -m benchmarks.trial_overhead [--trials 4] [--steps 20] [--study studies/gflops_sweep.yaml]

Without --study it runs a study of `--trials` tiny trials (DiT-P/4 on digits, FID off), so that
nearly all of a trial's time is overhead: scheduled → first training step (Tune trial actor, Ray
Train controller and worker group, imports, process group, DeepSpeed engine, data) and last report →
free slot. With --study it runs that study (e.g. the default) in a fresh output folder and reports
its efficiency: training + evaluation time as a share of the trial slots' wall time. The numbers
come from what scaling.run itself logs to MLflow (startup_s, teardown_s, efficiency).
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from benchmarks.machine import describe

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


def run_study(study, output):
    """Run scaling.run on a study with its output redirected; returns (wall seconds, stdout)."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "scaling.run", str(study), "--no-report", "--set", f"output={output}"],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"scaling.run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.time() - start, proc.stdout


def mlflow_numbers(output, experiment):
    """(per-trial startup_s, teardown_s lists, the study's efficiency) from the study's MLflow store."""
    client = MlflowClient(f"sqlite:///{Path(output).resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    startup = [r.data.metrics["startup_s"] for r in children if "startup_s" in r.data.metrics]
    teardown = [r.data.metrics["teardown_s"] for r in children if "teardown_s" in r.data.metrics]
    return startup, teardown, parent.data.metrics.get("efficiency"), parent.data.metrics.get("wall_time_s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--study", default=None, help="measure this study instead of the tiny one")
    args = parser.parse_args()
    print(f"machine: {describe()}")
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        tmp = Path(tmp)
        study = Path(args.study).resolve() if args.study else tiny_study(tmp, args.trials, args.steps)
        name = "overhead" if not args.study else __import__("yaml").safe_load(study.read_text())["name"]
        total, stdout = run_study(study, tmp / "out")
        startup, teardown, efficiency, wall = mlflow_numbers(tmp / "out", name)
    print(f"study: {study.name}, {len(startup)} trials, command wall time {total:.1f} s (Ray start-up included), "
          f"study wall time {wall:.1f} s")
    for key, values in (("scheduled → first step", startup), ("last report → free slot", teardown)):
        if values:
            print(f"{key:>26}: median {statistics.median(values):5.1f} s  (min {min(values):.1f}, "
                  f"max {max(values):.1f})")
    print(f"{'study efficiency':>26}: {efficiency:.1%}  (training + evaluation / trial slots × wall time)")


if __name__ == "__main__":
    main()
