"""`python -m scaling.replay_mlflow OUTPUT`: put into MLflow what a study's Parquet holds and MLflow lacks.

For a study whose tracking server was away when the driver ended: Parquet always has every
measurement; this logs the missing steps into the same parent and child runs (found by their tags),
so nothing is duplicated when it is run twice, and closes the runs the driver could not: a finished
trial's run (and, once every trial is finished, the study's) gets the status the driver gives it.
"""
import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from scaling.recorder import EVAL_METRICS, LOG_METRICS
from scaling.results import load_results, read_parquet
from scaling.study import StudyError, load_study
from scaling.tracking import StudyTracker, default_tracking_uri


def replay(output, uri=None):
    """Log every Parquet measurement MLflow does not have yet; returns the number of points logged."""
    output = Path(output).resolve()
    study = yaml.safe_load((output / "study.yaml").read_text())
    uri = uri or study["tracking"]["mlflow_uri"] or default_tracking_uri(output)
    # Runs are not reopened: a replay adds what is missing and closes only what is finished.
    tracker = StudyTracker(uri, study["tracking"]["experiment"] or study["name"], study["name"], output,
                           reopen=False)
    results = load_results(output)
    curves_file = output / "loss_curves.parquet"
    curves = (read_parquet(curves_file).to_pandas() if curves_file.exists()
              else pd.DataFrame(columns=["trial_id", "step"]))
    logged = 0
    for trial_id, rows in results.groupby("trial_id"):
        run_id = tracker.child_run(trial_id, json.loads(rows.config_json.iloc[0]))
        have_log = tracker.last_logged_step(run_id, "train_loss")
        for r in curves[curves.trial_id == trial_id].sort_values("step").to_dict("records"):
            if r["step"] > have_log:
                tracker.log_metrics(run_id, {k: r.get(k) for k in LOG_METRICS}, r["step"])
                logged += 1
        # The driver logs train_compute with every milestone row; val_loss only where there is one
        # (train.val_batch 0 has none), but drivers before train_compute logged it.
        have_eval = max(tracker.last_logged_step(run_id, k) for k in ("train_compute", "val_loss"))
        for r in rows.sort_values("step").to_dict("records"):
            if r["status"] == "ok" and r["step"] > have_eval:
                tracker.log_metrics(run_id, {k: r.get(k) for k in (*EVAL_METRICS, "gflops", "params", "train_compute")},
                                    r["step"])
                logged += 1
        logged += _replay_overhead(tracker, run_id, rows)
    close_finished_runs(tracker, output, results)
    if not tracker.flush(force=True):
        raise ConnectionError(f"MLflow at {uri} still does not answer; nothing was lost, run this again later")
    return logged


def _replay_overhead(tracker, run_id, rows):
    """The trial's start-up and teardown, as the driver logs them, when its run lacks them; the points logged."""
    logged = 0
    for key, latest in (("startup_s", False), ("teardown_s", True)):  # the first start-up, the last teardown
        measured = rows[rows[key].notna()].sort_values("step")
        if len(measured) and tracker.last_logged_step(run_id, key) < 0:
            row = measured.iloc[-1 if latest else 0]
            tracker.log_metrics(run_id, {key: row[key]}, row["step"])
            logged += 1
    return logged


def close_finished_runs(tracker, output, results):
    """Runs still open (RUNNING, SCHEDULED) whose trials are finished get the driver's end status:
    FINISHED for a trial with every milestone ok, else FAILED for a failed or diverged one; the
    study's run once all its trials are."""
    ended, failed = {}, set()  # trial id -> "FINISHED" or "FAILED", for finished trials; the failed ones
    for trial_id, rows in results.groupby("trial_id"):
        milestones = set(json.loads(rows.config_json.iloc[0])["milestones"])
        if milestones <= set(rows[rows.status == "ok"].step):
            # As the driver: a failure after the last milestone (a row older drivers wrote) changes no result.
            ended[trial_id] = "FINISHED"
        elif rows.status.isin(["failed", "diverged"]).any():
            ended[trial_id] = "FAILED"
            if (rows.status == "failed").any():
                failed.add(trial_id)
    for trial_id, status in ended.items():
        _close(tracker, tracker.child_run(trial_id, {}), status)
    try:
        trial_ids = {t.trial_id for t in load_study(output / "study.yaml", check_data=False).trials}
    except StudyError:
        return  # the study file no longer reads (a newer version of the project): leave the study's run open
    if trial_ids <= set(ended):
        # As the driver does: a diverged trial is a result, only a failed one fails the study.
        _close(tracker, tracker.parent_run_id, "FAILED" if failed else "FINISHED")


def _close(tracker, run_id, status):
    if tracker.client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
        tracker.finish(run_id, status)


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
