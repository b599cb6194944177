"""`python -m scaling.replay_mlflow OUTPUT`: put into MLflow what a study's Parquet holds and MLflow lacks.

For a study whose tracking server was away when the driver ended: Parquet always has every
measurement; this logs the missing steps into the same parent and child runs (found by their tags),
so nothing is duplicated when it is run twice, and closes the runs the driver could not: a finished
trial's run (and, once every trial is finished, the study's) gets the status the driver gives it.

Exit status: 0 done; 1 the MLflow server still does not answer (run it again later: what was logged
stays, the rest follows); 2 a study file, results or tracking store it cannot use, named on stderr
(then nothing is written: the study file and the results are read before MLflow is touched), or calls
the store refused or failed for good (each named in a warning; the others logged).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import scaling.no_telemetry  # noqa: F401 - first: before MLflow and Ray are imported
import pandas as pd
import requests
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from core.folder_lock import lock_file
from scaling.continuation import continue_recorded_runs
from scaling.mlflow_backfill import log_missing, rows_end
from scaling.results import CURVES_FILE, load_curves, load_results, results_path
from scaling.run import OUTPUT_LOCK, moved_store, sqlite_open_problem
from scaling.study import StudyError, load_study
from scaling.tracking import (RUN_STATUS, STATUS_TAG, StudyTracker, away, default_tracking_uri, error_chain,
                              shown_uri, unsupported_store)

EXIT_OK, EXIT_AWAY, EXIT_BAD_INPUT = 0, 1, 2
# What MLflow raises when its store fails: its own errors (an HTTP server's wrapped), SQLAlchemy's, the network's.
STORE_ERRORS = (MlflowException, SQLAlchemyError, requests.RequestException, OSError)


class ReplayError(Exception):
    """What stops a replay: the message names the file, column or URI; status is the exit status."""

    def __init__(self, message, status=EXIT_BAD_INPUT):
        super().__init__(message)
        self.status = status


def replay(output, uri=None):
    """Log every Parquet measurement MLflow does not have yet; returns the points logged, or raises ReplayError."""
    output = Path(output).resolve()
    lock = _lock(output)
    try:
        return _replay(output, uri)
    finally:
        if lock is not None:
            os.close(lock)


def _lock(output):
    """The output's lock, which the study's driver holds while it runs (its queued MLflow calls would log what the
    replay logs again); None where no driver ever ran there, the storage cannot lock, or output is no folder (named
    later)."""
    path = Path(output) / OUTPUT_LOCK
    if not path.is_file():  # no driver ever ran there (the replay makes no file of its own)
        return None
    try:
        lock = lock_file(path, create=False)
    except OSError as e:  # storage that cannot lock (Lustre mounted noflock): as the driver, on unguarded, saying so
        print(f"warning: cannot lock {output} ({e.strerror or e}); do not replay it while a run of its study runs",
              file=sys.stderr)
        return None
    if lock is None and path.is_file():  # held (a driver that failed to start removes it)
        raise ReplayError(f"{output} is in use by a running scaling.run of its study, which logs to MLflow itself; "
                          "replay it after that run ends")
    return lock


def _replay(output, uri):
    study = read_study(output)
    results, curves = read_results(output)
    continue_recorded_runs(study, output, results)  # the ids the driver ran them under (a continued trial: its first's)
    uri, where = tracking_uri(study, output, uri)
    try:
        # Runs are not reopened: a replay adds what is missing and closes only what is finished. They are the
        # study's runs of the folder it ran in (study.yaml's output), also when that folder was moved since.
        tracker = StudyTracker(uri, study.raw["tracking"]["experiment"] or study.name, study.name, study.output,
                               reopen=False)
        logged = log_missing(tracker, results, curves, configs={t.trial_id: t.to_dict() for t in study.trials})
        close_finished_runs(tracker, study, results)
        answered = tracker.flush(force=True)
    except STORE_ERRORS as e:
        raise _store_error(e, uri, where) from None
    if not answered:
        raise ReplayError(f"MLflow at {shown_uri(uri)} still does not answer; nothing was lost: run this again later",
                          EXIT_AWAY)
    if tracker.refused:  # each named in a warning above: a deleted run, a write the store forbids, an artifact store
        raise ReplayError(f"MLflow at {shown_uri(uri)} refused or failed {tracker.refused} of the replay's calls (the "
                          "warnings above name them): not all that Parquet holds is in MLflow; run this again once "
                          "the store takes them")
    return logged


def read_study(output):
    """The study file the driver left in output, validated (ReplayError with its file:line: field: reason)."""
    try:
        return load_study(output / "study.yaml", check_data=False)
    except StudyError as e:
        raise ReplayError(str(e)) from None


def read_results(output):
    """(results, loss curves) of output, checked for what a replay reads; ReplayError naming the file if not."""
    try:
        path = results_path(output)
        results = load_results(path)
    except (FileNotFoundError, ValueError) as e:  # load_results refuses rows without their trial or step
        raise ReplayError(str(e)) from None
    for r in results.sort_values(["trial_id", "step"]).itertuples():
        problem = _config_problem(r.config_json)
        if problem:
            raise ReplayError(f"{path}: column 'config_json': trial {r.trial_id} at step {int(r.step)}: not a trial's "
                              f"configuration ({problem})")
    return results, read_curves(output / CURVES_FILE)


def _config_problem(text):
    """Why a config_json cell is not a trial's configuration with the milestones its run is closed by; None if it is."""
    if not isinstance(text, str):
        return "null"
    try:
        config = json.loads(text)
    except ValueError:
        return "not JSON"
    if not isinstance(config, dict) or not isinstance(config.get("milestones"), list):
        return "it has no milestones"
    return None


def read_curves(path):
    """The loss curves at path (none when the file is absent); ReplayError naming the file when unusable."""
    if not path.exists():
        return pd.DataFrame(columns=["trial_id", "step"])
    try:
        return load_curves(path, strict=True)  # as the driver reads them: rows without their trial or step, and
        # columns of another table, are refused
    except ValueError as e:
        raise ReplayError(str(e)) from None


def tracking_uri(study, output, uri=None):
    """(the store to replay into, where it was named): --tracking-uri, the study's own, MLFLOW_TRACKING_URI, or the
    SQLite store in output (not the study file's output, which a moved folder no longer is)."""
    if uri:
        where = "--tracking-uri"
    elif study.given("tracking.mlflow_uri"):
        uri, where = study.raw["tracking"]["mlflow_uri"], f"{study.locate('tracking.mlflow_uri')}: tracking.mlflow_uri"
        moved = moved_store(uri, study.output, output)
        if moved is not None:
            uri, where = f"sqlite:///{moved}", str(moved)
    else:
        where = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else str(output / "mlflow.db")
        uri = default_tracking_uri(output)
    problem = unsupported_store(uri)
    if problem:
        raise ReplayError(f"{where}: {problem}")
    problem = sqlite_open_problem(uri)
    if problem:
        raise ReplayError(f"{where}: MLflow cannot use the store {shown_uri(uri)} ({problem})")
    return uri, where


def _store_error(e, uri, where):
    """The ReplayError for an MLflow store that failed: away (run again later) or unusable (named)."""
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if away(e):  # as the driver tells a store that does not answer now from one it cannot use
        reason = next((c.strerror for c in reversed(error_chain(e)) if isinstance(c, OSError) and c.strerror), reason)
        return ReplayError(f"MLflow at {shown_uri(uri)} still does not answer ({reason}); nothing was lost: run this "
                           f"again later", EXIT_AWAY)
    return ReplayError(f"{where}: MLflow cannot use the store {shown_uri(uri)} ({reason})")


def close_finished_runs(tracker, study, results):
    """Runs still open (RUNNING, SCHEDULED) whose trials are finished get the driver's end status:
    FINISHED for a trial with every milestone ok, else FAILED for a failed or diverged one; the
    study's run once all its trials are."""
    ended = {trial_id: rows_end(rows) for trial_id, rows in results.groupby("trial_id")}
    ended = {trial_id: how for trial_id, how in ended.items() if how is not None}
    for trial_id, how in ended.items():
        # The tag as the driver sets it at a trial's end (a queued one lost with the server): how the trial ended.
        _close(tracker, tracker.child_run(trial_id, {}), RUN_STATUS[how], {STATUS_TAG: how})
    current = {t.trial_id for t in study.trials}
    if current <= set(ended):
        # As the driver does: a diverged trial is a result, only a failed one fails the study; a trial of an earlier
        # version of the study file, left in results.parquet, is none of this run's (the driver counts its own).
        failed = any(ended[t] == "failed" for t in current)
        _close(tracker, tracker.parent_run_id, "FAILED" if failed else "FINISHED")


def _close(tracker, run_id, status, tags=None):
    if tracker.client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
        if tags:
            tracker.set_tags(run_id, tags)
        tracker.finish(run_id, status)


def main(argv=None):
    """The command line: 0 when replayed, 1 when MLflow still does not answer, 2 (one line) for bad input."""
    parser = argparse.ArgumentParser(prog="python -m scaling.replay_mlflow", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the study's output folder (holds results.parquet and study.yaml)")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: the study's, MLFLOW_TRACKING_URI, or the SQLite store in OUTPUT")
    args = parser.parse_args(argv)
    try:
        n = replay(args.output, args.tracking_uri)
    except ReplayError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    print(f"logged {n} missing measurements to MLflow")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
