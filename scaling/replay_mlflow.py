"""`python -m scaling.replay_mlflow OUTPUT`: put into MLflow what a study's Parquet holds and MLflow lacks.

For a study whose tracking server was away when the driver ended: Parquet always has every
measurement; this logs the missing steps into the same parent and child runs (found by their tags),
so nothing is duplicated when it is run twice.
"""
import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from scaling.recorder import EVAL_METRICS, LOG_METRICS
from scaling.results import load_results
from scaling.tracking import StudyTracker, default_tracking_uri


def replay(output, uri=None):
    """Log every Parquet measurement MLflow does not have yet; returns the number of points logged."""
    output = Path(output).resolve()
    study = yaml.safe_load((output / "study.yaml").read_text())
    uri = uri or study["tracking"]["mlflow_uri"] or default_tracking_uri(output)
    # Runs keep their status: a replay only adds what is missing.
    tracker = StudyTracker(uri, study["tracking"]["experiment"] or study["name"], study["name"], output,
                           reopen=False)
    results = load_results(output)
    curves_file = output / "loss_curves.parquet"
    curves = pd.read_parquet(curves_file) if curves_file.exists() else pd.DataFrame(columns=["trial_id", "step"])
    logged = 0
    for trial_id, rows in results.groupby("trial_id"):
        run_id = tracker.child_run(trial_id, json.loads(rows.config_json.iloc[0]))
        have_log = tracker.last_logged_step(run_id, "train_loss")
        for r in curves[curves.trial_id == trial_id].sort_values("step").to_dict("records"):
            if r["step"] > have_log:
                tracker.log_metrics(run_id, {k: r.get(k) for k in LOG_METRICS}, r["step"])
                logged += 1
        have_eval = tracker.last_logged_step(run_id, "val_loss")
        for r in rows.sort_values("step").to_dict("records"):
            if r["status"] == "ok" and r["step"] > have_eval:
                tracker.log_metrics(run_id, {k: r.get(k) for k in (*EVAL_METRICS, "gflops", "params", "train_compute")},
                                    r["step"])
                logged += 1
    if not tracker.flush(force=True):
        raise ConnectionError(f"MLflow at {uri} still does not answer; nothing was lost, run this again later")
    return logged


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m scaling.replay_mlflow", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the study's output folder (holds results.parquet and study.yaml)")
    parser.add_argument("--tracking-uri", default=None, help="default: the study's, MLFLOW_TRACKING_URI, or SQLite")
    args = parser.parse_args(argv)
    try:
        n = replay(args.output, args.tracking_uri)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"logged {n} missing measurements to MLflow")
    return 0


if __name__ == "__main__":
    sys.exit(main())
