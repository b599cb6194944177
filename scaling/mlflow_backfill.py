"""What results.parquet and loss_curves.parquet hold and a trial's MLflow run lacks, logged to it: by the replay
(scaling.replay_mlflow), and by the driver at launch for the runs a killed driver left open."""

from scaling.results import row_config, trial_end
from scaling.tracking import is_number

LOG_METRICS = ("train_loss", "lr", "images_per_s", "achieved_tflops", "mfu")
EVAL_METRICS = ("val_loss", "val_mse", "val_loss_ema", "fid", "fid_floor", "kid", "precision", "recall",
                "inception_score", "eval_time_s", "sample_images_per_s")
OVERHEAD_METRICS = ("startup_s", "teardown_s")  # one point each at most: a run holding one is given none


def rows_end(rows):
    """results.trial_end of a trial's rows (a DataFrame of one trial), its milestones from their configuration; None
    where that names none (a row written by hand)."""
    milestones = (row_config(rows.config_json.iloc[0]) or {}).get("milestones")
    if not isinstance(milestones, list):
        return None
    return trial_end(milestones, dict(zip(rows.step, rows.status)))


def log_missing(tracker, results, curves, skip_unreadable=False, configs=None):
    """Log each trial's loss curve and milestone rows at the steps its run lacks (gaps too: calls an interrupted
    driver still had queued, or MLflow refused; the tracker's own queue is replayed first, and what stays queued
    counts as held); returns the points logged. A run whose metrics cannot be read is not taken to hold none (every
    point would be logged again): the store's error is raised, or with skip_unreadable (the driver's catch-up at
    launch, which the replay can finish later) the run is left as it is. A trial with a curve and no row yet (stopped
    before its first milestone) has its curve logged too, its run's params from configs ({trial id: configuration})
    where its run is made here."""
    if tracker.pending:  # replayed first: read before, their points would be taken for missing and logged twice
        tracker.flush(force=True)
    logged = 0
    rowless = sorted(set(curves.trial_id) - set(results.trial_id))
    trials = [*results.groupby("trial_id"), *((t, results.iloc[:0]) for t in rowless)]
    for trial_id, rows in trials:
        points = curves[curves.trial_id == trial_id].sort_values("step").to_dict("records")
        try:
            # A row written by hand may have no config (rows_end tolerates it): the run's params are then none.
            config = row_config(rows.config_json.iloc[0]) if len(rows) else (configs or {}).get(trial_id)
            run_id = tracker.child_run(trial_id, config or {})
            have_log = {key: tracker.logged_steps(run_id, key, strict=True)
                        for key in {_checked_by(r) for r in points} - {None}}
            # The driver logs train_compute with every milestone row; val_loss only where there is one
            # (train.val_batch 0 has none), but drivers before train_compute logged it.
            have_eval = (tracker.logged_steps(run_id, "train_compute", strict=True)
                         | tracker.logged_steps(run_id, "val_loss", strict=True))
            have_overhead = {key: tracker.logged_steps(run_id, key, strict=True) for key in OVERHEAD_METRICS}
        except Exception:
            if skip_unreadable:
                continue
            raise
        for r in points:
            key = _checked_by(r)
            if key is not None and r["step"] not in have_log[key]:
                tracker.log_metrics(run_id, {k: r.get(k) for k in LOG_METRICS}, r["step"])
                logged += 1
        for r in rows.sort_values("step").to_dict("records"):
            if r["status"] == "ok" and r["step"] not in have_eval:
                tracker.log_metrics(run_id, {k: r.get(k) for k in (*EVAL_METRICS, "gflops", "params", "train_compute")},
                                    r["step"])
                logged += 1
        logged += _log_overhead(tracker, run_id, rows, have_overhead)
    return logged


def _checked_by(point):
    """The metric whose step in the run says a loss-curve point is logged (its metrics go in one batch): its
    train_loss, or where that is no number (a diverged step's NaN, never logged) the first of the others that is;
    None for a point with nothing to log."""
    return next((key for key in LOG_METRICS if is_number(point.get(key))), None)


def _log_overhead(tracker, run_id, rows, have):
    """The trial's start-up and teardown, as the driver logs them, when its run lacks them (have: the steps of each
    in the run); the points logged."""
    logged = 0
    for key, latest in zip(OVERHEAD_METRICS, (False, True)):  # the first start-up, the last teardown
        measured = rows[rows[key].notna()].sort_values("step")
        if len(measured) and not have[key]:
            row = measured.iloc[-1 if latest else 0]
            tracker.log_metrics(run_id, {key: row[key]}, row["step"])
            logged += 1
    return logged
