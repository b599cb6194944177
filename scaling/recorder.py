"""The driver's Tune callback: every report of every trial into Parquet, MLflow and the progress view.

Parquet is rewritten atomically after every milestone (and every end of a trial), so a crash never
loses a finished measurement. Reports that a restarted worker group repeats (the steps since its
last checkpoint) add no rows nor MLflow points: a loss-curve point is replaced, a milestone row keeps its first
measurement.
"""
import json
import math
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import ray
from ray.tune import Callback

from core.flops import training_compute
from scaling.held_logs import HELD_LOGS_KEY
from scaling.mlflow_backfill import EVAL_METRICS, LOG_METRICS, log_missing, rows_end
from scaling.ray_trial import KIND_END, KIND_LOG, KIND_MILESTONE, RESUMED_KEY, shortened
from scaling.results import (CURVES_FILE, LOSS_CURVES_SCHEMA, RESULTS_FILE, RESULTS_SCHEMA, load_curves, load_results,
                             row_config, trial_end, write_table)
from scaling.tracking import RUN_STATUS, STATUS_TAG

# MLflow takes 8000 characters of a run tag's value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH) since its tags
# table was widened in September 2024; kept to 5000, which a tracking server of an MLflow before that still takes.
MAX_TAG_LENGTH = 5000
MAX_STEPS_TAG = "dit_scaling.max_steps"  # the steps the trial trains to now (scaling.continuation may add some)
DATA_PATH_TAG = "dit_scaling.data_path"  # where its data is now (scaling.continuation: the same latents, moved)


class Recorder(Callback):
    """Collects trial reports on the driver and writes them where they belong."""

    def __init__(self, study, tracker, progress):
        self.study, self.tracker, self.progress = study, tracker, progress
        self.results_path = study.output / RESULTS_FILE
        self.curves_path = study.output / CURVES_FILE
        self.rows = _load_rows(self.results_path, ("trial_id", "step"))
        self.curves = _load_rows(self.curves_path, ("trial_id", "step"))
        self.trials = {t.trial_id: t for t in study.trials}
        # A trial's id hashes what it computes, its name is derived from its settings: rows written under a name the
        # study now derives otherwise (a fixed architecture override, named since 2026-12-05) take the trial's name,
        # so that the report does not show one trial as two models. Rows of a trial that goes on from a recorded run
        # with more steps or its data moved (scaling.continuation) take its final step and configuration, so that the
        # report does not show the run as finished at its old last step and the rows name where the data is; written
        # at once, so that a study stopped before the trial's next row continues it again, and a replay knows which
        # milestones it still lacks.
        last_ok = {}
        for (trial_id, step), row in self.rows.items():
            if row["status"] == "ok":
                last_ok[trial_id] = max(step, last_ok.get(trial_id, step))
        for rows in (self.rows, self.curves):
            for (trial_id, _), row in rows.items():
                if trial_id in self.trials:
                    row["model"] = self.trials[trial_id].model
        continued, moved_runs = False, {}  # MLflow run -> where its latents are now
        for (trial_id, _), row in self.rows.items():
            t = self.trials.get(trial_id)
            if t is None:
                continue
            config = row_config(row["config_json"]) or {}
            steps = ((config.get("train") or {}).get("max_steps"), config.get("milestones"))
            moved = (config.get("data") or {}).get("path", t.data["path"]) != t.data["path"]
            if moved or steps != (t.train["max_steps"], list(t.milestones)):
                # Fewer steps than measured: the run went further, and its last measurement stays its last.
                row["max_step"] = max(t.train["max_steps"], last_ok.get(trial_id, 0))
                # The encode each row was measured on stays its own (scaling.results.measured_on_other_data).
                row["config_json"] = json.dumps({**t.to_dict(), "data_encode": config.get("data_encode")},
                                                sort_keys=True)
                continued = True
                if moved and isinstance(row.get("mlflow_run_id"), str):  # a null reads back as NaN
                    moved_runs[row["mlflow_run_id"]] = t.data["path"]
        if continued:
            self.write()
        for run_id, path in moved_runs.items():  # a finished trial does not start again to say so
            self.tracker.set_tags(run_id, {DATA_PATH_TAG: path})
        self.run_ids, self.mlflow_step = {}, {}
        self.ended = set()  # trials Tune saw end (finished, diverged or failed) in this run
        self.end_status = {}
        # Orchestration overhead per trial: start-up from its slot coming free, on the driver's clock (the sweep's
        # start, or the end of the trial before it there), to its first training step, on its worker's clock (another
        # node's on a cluster: their skew is in it); teardown from its last report until the slot is free again. Tune's
        # on_trial_start comes only once the trial's actor is up (a fresh process's start and imports, about 2 s on
        # the AVX2 box, for a study's first trials), so it is not where the clock starts.
        self.started_at, self.last_result_at, self.overhead = {}, {}, {}
        self.resumed_at = {}  # trial -> the training time of the checkpoint it began this driver run at (None: none)
        self.free_slots, self.scheduled_at = [], {}  # when each free slot came free (oldest first); each trial's slot's
        self.recovered_at = {}  # trial -> when Tune took it back to run again (its node lost)
        self.recorded_here = set()  # (trial id, step) of the rows this driver measured, which its timings describe
        self.relay = None  # the study's RelayMailboxes actor, told of every milestone row (tell_relay)

    def tell_relay(self, relay):
        """Give the study's RelayMailboxes actor every ok row now, and each milestone row once written: a trial
        resumed from a milestone checkpoint whose row exists does not evaluate it again, and one resumed past a
        milestone without a row fails (scaling.ray_trial)."""
        self.relay = relay
        # Not caught: a relay that cannot take the rows now (it died as it started) would carry no trial's reports.
        ray.get(relay.add_milestone_rows.remote([k for k, r in self.rows.items() if r["status"] == "ok"]))

    def _share_rows(self, keys):
        if self.relay is None:  # no trial launched (tests feed the recorder alone)
            return
        try:  # waited for: a worker asking next must find them there
            ray.get(self.relay.add_milestone_rows.remote(keys))
        except ray.exceptions.RayError:  # the relay is gone, and with it every trial's reports: Tune ends them
            pass

    def open_slots(self, count):
        """The sweep starts: count trial slots are free now."""
        self.free_slots = sorted(self.free_slots + [time.time()] * count)

    def open_runs(self, trial_ids):
        """Find or create the trials' MLflow child runs, SCHEDULED until their trials start."""
        for trial_id in trial_ids:
            self._run_id(trial_id, status="SCHEDULED")

    def catch_up_runs(self, finished, new_store=False):
        """The runs a killed driver left open: what Parquet holds and they lack is logged to them (a milestone's row
        is written before its metrics go to MLflow, and the trial does not measure it again), and those of finished
        trials are ended as the driver ends them: FINISHED, or FAILED for a diverged trial.

        new_store: the study logged to another MLflow store before; its finished trials get their runs here too.
        """
        if new_store:
            for trial_id in finished:
                self._run_id(trial_id)  # found or made, open: caught up and ended below
            # The rows name the study's runs in the store it logs to now (those of trials it no longer defines stay).
            for row in self.rows.values():
                row["mlflow_run_id"] = self.run_ids.get(row["trial_id"], row["mlflow_run_id"])
            self.write()
        open_runs = self.tracker.open_child_runs()
        rows = [r for r in self.rows.values() if r["trial_id"] in open_runs]
        curves = [r for r in self.curves.values() if r["trial_id"] in open_runs]  # also of trials with no row yet
        if rows or curves:
            log_missing(self.tracker, pd.DataFrame(rows, columns=RESULTS_SCHEMA.names),
                        pd.DataFrame(curves, columns=["trial_id", "step", *LOG_METRICS]), skip_unreadable=True)
            caught_up = {r["trial_id"] for r in rows + curves}
            for trial_id in caught_up & self.mlflow_step.keys():  # runs opened before: past these now
                self.mlflow_step[trial_id] = self._logged_through(trial_id, self.run_ids[trial_id])
        for trial_id in finished & open_runs.keys():
            self._end_run(open_runs[trial_id], self._trial_end(trial_id))
        for trial_id in open_runs.keys() - self.trials.keys():
            # A trial the edited study file no longer defines: no run of the study will end its run.
            rows = pd.DataFrame([r for r in self.rows.values() if r["trial_id"] == trial_id])
            self._end_run(open_runs[trial_id], (rows_end(rows) if len(rows) else None) or "killed")

    # Tune callback hooks ---------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        trial_id = trial.config["trial"]["trial_id"]
        # A retried failure: its old "failed" row, and the end it reported, give way to what this attempt measures
        # (a trial rerun after its Tune actor's node died, its failure reported but not collected, would end FAILED).
        self.rows = {k: r for k, r in self.rows.items() if not (k[0] == trial_id and r["status"] == "failed")}
        self.end_status.pop(trial_id, None)
        self.started_at[trial_id] = time.time()
        if trial_id in self.recovered_at:  # a rerun: from when Tune took it back
            self.scheduled_at[trial_id] = self.recovered_at.pop(trial_id)
        else:
            self.scheduled_at[trial_id] = self.free_slots.pop(0) if self.free_slots else self.started_at[trial_id]
        run_id = self._run_id(trial_id)
        self.tracker.set_status(run_id, "RUNNING")
        # The run itself was created when the study launched: this is when the trial got its slot. A retry's
        # status tag no longer says how an earlier attempt ended. The steps it trains to and where its data is: its
        # params keep those it was created with (MLflow's are fixed), and a trial given more steps, or whose latents
        # moved, goes on in the same run.
        t = self.trials[trial_id]
        data_path = {} if t.data["path"] is None else {DATA_PATH_TAG: t.data["path"]}
        self.tracker.set_tags(run_id, {"dit_scaling.started_at": f"{self.started_at[trial_id]:.3f}",
                                       STATUS_TAG: "running", MAX_STEPS_TAG: t.train["max_steps"], **data_path})
        self.progress.started(trial_id)
        self.overhead.pop(trial_id, None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        t = self.trials[trial.config["trial"]["trial_id"]]
        if t.trial_id not in self.last_result_at:  # its first report in this driver run: where its training began
            self.resumed_at[t.trial_id] = result.get(RESUMED_KEY)  # (a later restart's does not count)
            if result.get(RESUMED_KEY) is not None and result.get("step") is not None:
                self.progress.resumed(t.trial_id, int(result["step"]))
        for log in result.get(HELD_LOGS_KEY, ()):  # the log reports the trial held since its last report
            self._record(t, {**log, "kind": KIND_LOG})
        self._record(t, result)

    def _record(self, t, result):
        """One report of trial t."""
        kind = result.get("kind")
        if kind == KIND_END:
            self.last_result_at[t.trial_id] = time.time()  # its teardown counts from here, not from its last log
            self._end(t, result)
            return
        step = None if result.get("step") is None else int(result["step"])
        self._time(t.trial_id, step, result)
        if step is None:
            return  # e.g. a checkpoint reported before the run's first log: no step to place it at
        self.progress.update(t.trial_id, step, result.get("train_loss"), result.get("images_per_s"))
        run_id = self._run_id(t.trial_id)
        if kind == KIND_LOG:
            self.curves[(t.trial_id, step)] = {
                "study": self.study.name, "trial_id": t.trial_id, "model": t.model, "step": step,
                **{k: result.get(k) for k in LOG_METRICS}}
            if step > self.mlflow_step.get(t.trial_id, -1):  # a restarted worker group repeats steps
                self.tracker.log_metrics(run_id, {k: result.get(k) for k in LOG_METRICS}, step)
                self.mlflow_step[t.trial_id] = step
        elif kind == KIND_MILESTONE and step in t.milestones:
            kept = self.rows.get((t.trial_id, step))
            if kept is not None and kept["status"] == "ok":
                return  # a restarted trial measured this milestone again: keep the first measurement
            row = self._row(t, result, "ok", None, run_id)
            self.rows[(t.trial_id, step)] = row
            self.recorded_here.add((t.trial_id, step))
            # Parquet first, the record: a driver killed in between measures nothing again, and a replay logs the
            # rest to MLflow.
            self.write()
            self._share_rows([(t.trial_id, step)])
            self.tracker.log_metrics(run_id, {**{k: result.get(k) for k in EVAL_METRICS},
                                              **{k: row[k] for k in ("gflops", "params", "train_compute")}}, step)
            if result.get("grid_path") and Path(result["grid_path"]).exists():
                self.tracker.log_artifact(run_id, result["grid_path"], "samples")

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Tune starts the trial again, in a slot as any other: its start-up counts from here (a slot of the queue could
        # have come free long before, and stood idle).
        self.recovered_at[trial.config["trial"]["trial_id"]] = time.time()

    def _slot_freed(self):
        """A trial's slot came free: the start-up of the next trial to start counts from here, where one of this run's
        has yet to start (Tune makes the next trial only after this callback: none is PENDING yet). A slot freed with
        none left stays idle: a trial rerun much later, its node lost, took it and counted the idle time."""
        if any(state == "pending" for state in self.progress.state.values()):
            self.free_slots.append(time.time())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._slot_freed()
        trial_id = trial.config["trial"]["trial_id"]
        # How it ended by its rows (a retried trial's earlier divergence stands: its rerun's end is no result).
        how = self._trial_end(trial_id) or "failed"
        if how == "failed" and self.end_status.get(trial_id) != "failed":
            # It returned without every milestone's row, nor an end report: a failure all the same, in Parquet too
            # (the record a report reads; it showed the trial unfinished).
            t = self.trials[trial_id]
            missing = [m for m in t.milestones if (trial_id, m) not in self.rows]
            self._end(t, {"status": "failed", "error": "the trial ended without a result at milestone(s) "
                                                       f"{', '.join(map(str, missing))}"})
        if trial_id in self.last_result_at:
            teardown = time.time() - self.last_result_at[trial_id]
            self.overhead.setdefault(trial_id, {})["teardown_s"] = teardown
            measured = [k for k in self.recorded_here
                        if k[0] == trial_id and k in self.rows and self.rows[k]["status"] == "ok"]
            for key in measured:
                self.rows[key]["teardown_s"] = teardown
            if measured:  # MLflow's teardown is Parquet's (a failed or diverged row has none): a replay rebuilds it
                self.write()
                self.tracker.log_metrics(self._run_id(trial_id), {"teardown_s": teardown},
                                         max(self.mlflow_step.get(trial_id, 0), 0))
        self._end_run(self._run_id(trial_id), how)
        self.ended.add(trial_id)
        self.progress.finished(trial_id, how)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._slot_freed()
        t = self.trials[trial.config["trial"]["trial_id"]]
        error = tune_error(trial) or "the trial's Tune actor failed; Tune recorded no error"
        if self.end_status.get(t.trial_id) != "failed":  # its own end report said why (MilestonePassed, say): kept
            self._end(t, {"status": "failed", "error": error})
        how = self._trial_end(t.trial_id) or "failed"
        self.tracker.finish(self._run_id(t.trial_id), RUN_STATUS[how])
        self.ended.add(t.trial_id)
        self.progress.finished(t.trial_id, how)

    def _trial_end(self, trial_id):
        """results.trial_end of a trial of the study, from the rows recorded so far."""
        statuses = {s: r["status"] for (i, s), r in self.rows.items() if i == trial_id}
        return trial_end(self.trials[trial_id].milestones, statuses)

    def _end_run(self, run_id, how):
        """End a run as its trial ended (ok, diverged, failed or killed): its status tag and MLflow status."""
        self.tracker.set_tags(run_id, {STATUS_TAG: how})
        self.tracker.finish(run_id, RUN_STATUS[how])

    def _measured_every_milestone(self, t):
        """Whether every milestone of trial t has an ok row."""
        return self._trial_end(t.trial_id) == "ok"

    def _failed_after_last_milestone(self, t, error):
        """A failure after the trial's last measurement (in teardown, say): no result changes, so the trial stays
        finished and ok, as results.recorded_trials counts it. The error goes to MLflow only."""
        print(f"warning: trial {t.trial_id} failed after its last milestone; its results stand: {error}",
              file=sys.stderr)
        self.tracker.set_tags(self._run_id(t.trial_id), {"dit_scaling.error_after_last_milestone":
                                                         str(error)[:MAX_TAG_LENGTH], STATUS_TAG: "ok"})

    def _diverged_at(self, trial_id):
        """The step of the trial's diverged row, or None."""
        return next((s for (i, s), r in self.rows.items() if i == trial_id and r["status"] == "diverged"), None)

    def interrupted(self, trial_ids):
        """The study was stopped: runs of trials that had started are KILLED (MLflow's status for an
        interrupted run); those of trials that never started stay SCHEDULED. A re-run reopens both. A trial stopped
        in its teardown, its result complete (every milestone measured, or its divergence recorded), ends as it would
        have: a re-run counts it finished and never reopens its run."""
        for trial_id in trial_ids:
            if trial_id not in self.started_at:
                continue
            self._end_run(self._run_id(trial_id), self._trial_end(trial_id) or "killed")

    def on_step_end(self, iteration, trials, **info):
        self.tracker.flush()
        self.progress.maybe_print()

    def _time(self, trial_id, step, result):
        self.last_result_at[trial_id] = time.time()  # any report, placed or not, is one the trial got through
        timing = self.overhead.setdefault(trial_id, {})
        if (step is not None and result.get("first_step_at") and "startup_s" not in timing
                and trial_id in self.scheduled_at):
            timing["startup_s"] = result["first_step_at"] - self.scheduled_at[trial_id]
            self.tracker.log_metrics(self._run_id(trial_id), {"startup_s": timing["startup_s"]}, step)

    def overhead_summary(self):
        """One line: the median start-up and teardown of this run's trials whose start-up was measured, or None
        before any (a trial that ended before its first report, e.g. diverged at once, has a teardown only)."""
        measured = [v for v in self.overhead.values() if "startup_s" in v]
        if not measured:
            return None
        startup = statistics.median(v["startup_s"] for v in measured)
        teardowns = [v["teardown_s"] for v in measured if "teardown_s" in v]
        teardown = statistics.median(teardowns) if teardowns else None
        return (f"overhead per trial (median of {len(measured)}): {startup:.1f} s from scheduled to first step"
                + (f", {teardown:.1f} s from last report to a free slot" if teardown is not None else ""))

    def busy_seconds(self, trial_ids):
        """Training plus evaluation time of trials in this driver run, from their rows: the useful part of its time."""
        busy = 0.0
        for trial_id in trial_ids:
            here = [r for k, r in self.rows.items() if k[0] == trial_id and k in self.recorded_here]
            earlier = [r for k, r in self.rows.items() if k[0] == trial_id and k not in self.recorded_here]
            # wall_time_s is the trial's training time over all its runs: count from the checkpoint it resumed at here
            # (its first report says), else from where earlier driver runs measured it last; a checkpoint past that row
            # holds training an earlier run did.
            if trial_id in self.resumed_at:  # its first report says: the checkpoint's time, or none (from step 0)
                resumed_at = self.resumed_at[trial_id] or 0.0
            else:  # no report in this run
                resumed_at = max((_seconds(r["wall_time_s"]) for r in earlier), default=0.0)
            trained_to = max((_seconds(r["wall_time_s"]) for r in here), default=resumed_at)
            busy += max(trained_to - resumed_at, 0.0) + sum(_seconds(r["eval_time_s"]) for r in here)
        return busy

    def failed_count(self):
        """Trials that failed after their retries (a diverged trial is a result, not a failure)."""
        return sum(s == "failed" for s in self.end_status.values())

    # Writing -----------------------------------------------------------------------

    def write(self):
        """Rewrite results.parquet and loss_curves.parquet atomically."""
        write_table(_sorted(self.rows), self.results_path, RESULTS_SCHEMA)
        write_table(_sorted(self.curves), self.curves_path, LOSS_CURVES_SCHEMA)

    def _end(self, t, result):
        """A diverged or failed trial: one marked row at the step it reached (a failure after the last milestone
        changes no result: the trial's Tune actor dying then, or its Train workers, which come here)."""
        status = result["status"]
        if status == "failed" and self._measured_every_milestone(t):
            self._failed_after_last_milestone(t, result.get("error"))
            return
        diverged = self._diverged_at(t.trial_id)
        if status == "failed" and diverged is not None:  # its teardown failed after it diverged: that is its result
            print(f"warning: trial {t.trial_id} failed after it diverged at step {diverged}; that result stands: "
                  f"{result.get('error')}", file=sys.stderr)
            self.tracker.set_tags(self._run_id(t.trial_id), {"dit_scaling.error_after_divergence":
                                                             str(result.get("error"))[:MAX_TAG_LENGTH]})
            return
        step = int(result.get("step") or max([self.progress.step.get(t.trial_id, 0),
                                              *(s for (i, s) in self.rows if i == t.trial_id)]))
        while self.rows.get((t.trial_id, step), {}).get("status") == "ok":
            # It failed after measuring this step, on the way to the next: keep the measurement (the next too, of
            # consecutive milestones measured by an earlier attempt).
            step += 1
        self.rows[(t.trial_id, step)] = self._row(t, {**result, "step": step}, status, result.get("error"),
                                                  self._run_id(t.trial_id))
        self.recorded_here.add((t.trial_id, step))
        self.end_status[t.trial_id] = status
        self.tracker.set_tags(self._run_id(t.trial_id), {STATUS_TAG: status})
        self.write()

    def _row(self, t, r, status, error, run_id):
        step = int(r.get("step") or 0)
        return {
            "study": self.study.name, "trial_id": t.trial_id, "model": t.model, "size": t.size, "patch": t.patch,
            "params": t.params, "gflops": t.gflops, "batch_size": t.train["batch_size"], "step": step,
            "max_step": t.train["max_steps"], "train_compute": training_compute(t.gflops, t.train["batch_size"], step),
            "train_loss": r.get("train_loss"), "val_loss": r.get("val_loss"), "val_mse": r.get("val_mse"),
            "val_loss_ema": r.get("val_loss_ema"), "fid": r.get("fid"),
            "fid_floor": r.get("fid_floor"), "kid": r.get("kid"), "precision": r.get("precision"),
            "recall": r.get("recall"), "inception_score": r.get("inception_score"),
            "fid_samples": r.get("fid_samples"), "feature_extractor": r.get("feature_extractor"),
            "fid_basis": r.get("fid_basis"),
            "sampler": f"{t.eval['sampler']}-{t.eval['sampling_steps']}", "cfg_scale": t.eval["cfg_scale"],
            # The scheduled lr the step reported; a row without a report of it (a failure) has the base lr.
            "lr": r["lr"] if r.get("lr") is not None else t.train["lr"],
            "dataset": t.data["dataset"], "wall_time_s": r.get("train_time_s"), "eval_time_s": r.get("eval_time_s"),
            "images_per_s": r.get("images_per_s"), "achieved_tflops": r.get("achieved_tflops"), "mfu": r.get("mfu"),
            "sample_images_per_s": r.get("sample_images_per_s"),
            "startup_s": self.overhead.get(t.trial_id, {}).get("startup_s"),
            "teardown_s": None, "status": status, "error": error, "mlflow_run_id": run_id,
            "timestamp": datetime.now(timezone.utc), "config_json": _config_json(t),
        }

    def _run_id(self, trial_id, status="RUNNING"):
        if trial_id not in self.run_ids:
            run_id = self.tracker.child_run(trial_id, self.trials[trial_id].to_dict(), status)
            self.run_ids[trial_id] = run_id
            self.mlflow_step[trial_id] = self._logged_through(trial_id, run_id)
        return self.run_ids[trial_id]

    def _logged_through(self, trial_id, run_id):
        """The last step of the trial's loss curve in its MLflow run, past which its logs go there; where the store
        does not answer (or holds calls queued), the last one Parquet holds: a resumed trial re-sends every log it
        made, and taken as none, the whole curve was logged twice."""
        in_parquet = max((s for (i, s) in self.curves if i == trial_id), default=-1)
        try:
            logged = max(self.tracker.logged_steps(run_id, "train_loss", strict=True), default=-1)
        except Exception:
            return in_parquet
        # Calls still queued (the store was away) log more than it holds yet: Parquet's steps are among them.
        return max(logged, in_parquet) if self.tracker.pending else logged


def _config_json(t):
    return json.dumps(t.to_dict(), sort_keys=True)


def _load_rows(path, key):
    """Existing rows of a Parquet file keyed by key columns (empty when there is none yet)."""
    if not Path(path).exists():
        return {}
    # Strict: the recorder writes these files back whole, and would drop columns it does not know.
    df = (load_results if Path(path).name == RESULTS_FILE else load_curves)(path, strict=True)
    return {tuple(r[k] for k in key): r for r in df.to_dict("records")}


def _seconds(value):
    """A duration from a row: None, and NaN (a null read back from Parquet), count as no time."""
    return 0.0 if value is None or math.isnan(value) else float(value)


def _sorted(rows):
    return [rows[k] for k in sorted(rows)]


def tune_error(trial):
    """The last error Tune recorded of a trial: the last "Failure # N (occurred at ...)" entry of its error file,
    shortened; None where it has none. Tune calls on_trial_error with no error of its own (its callbacks' **info is
    for later versions): the file's path stood in the results' error column."""
    path = trial.error_file
    try:
        text = Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return None
    entry = text.rsplit("Failure # ", 1)[-1].partition("\n")[2].strip() if "Failure # " in text else text.strip()
    return shortened(entry) if entry else None
