"""The driver's Recorder fed trial reports directly (no Ray started), and the MLflow replay of what it wrote."""
import dataclasses
import io
import json
import math
import shutil
import sqlite3
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from scaling.held_logs import HELD_LOGS_KEY
from scaling.progress import Progress
from scaling.ray_trial import KIND_CHECKPOINT, KIND_END, KIND_LOG, KIND_MILESTONE, RESUMED_KEY
from scaling.recorder import Recorder
from scaling.replay_mlflow import replay
from scaling.results import RESULTS_SCHEMA, load_curves, load_results, recorded_trials, write_table
from scaling.study import load_study
from scaling.tracking import StudyTracker


# One DiT-P/2 trial with milestones 10 and 20, lr 1e-3, DDIM with 5 sampling steps, no val_loss.
STUDY = textwrap.dedent("""\
    name: tiny
    data: {{dataset: digits}}
    sweep: {{model: [DiT-P], patch: [2], steps: [10, 20]}}
    train: {{batch_size: 32, lr: 1.0e-3, ema_decay: 0.9, log_every: 5, ckpt_every: 10, val_batch: 0}}
    eval: {{fid: true, fid_samples: 100, sampler: ddim, sampling_steps: 5, grid_images_per_class: 1}}
    resources: {{workers_per_trial: 1, cpus_per_worker: 1}}
    output: {out}
    """)


@pytest.fixture
def study(tmp_path, empty_store):
    """The STUDY, loaded, with an MLflow store beside its output."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    path = tmp_path / "tiny.yaml"
    path.write_text(STUDY.format(out=tmp_path / "out"))
    study = load_study(path, check_data=False)
    assert [t.milestones for t in study.trials] == [(10, 20)]
    return study


@pytest.fixture
def clock(monkeypatch):
    """The recorder's clock, which the test sets: [seconds]. Its own module's time only (MLflow's stays the real one)."""
    from scaling import recorder as recorder_module

    now = [1000.0]
    monkeypatch.setattr(recorder_module, "time", SimpleNamespace(time=lambda: now[0]))
    return now


def recorder(study):
    """The driver's recorder of the study, over a real MLflow store beside its output (the runs found again when the
    study runs again, as the driver's are)."""
    store = study.output.parent / "mlflow.db"
    tracker = StudyTracker(f"sqlite:///{store}", "tiny", "tiny", study.output)
    return Recorder(study, tracker, Progress(study.trials, stream=io.StringIO()))


def trial_run(rec, t):
    """The MLflow run of trial t, as the store holds it now (there is one)."""
    [run] = rec.tracker.client.search_runs([rec.tracker.experiment_id], f"tags.`dit_scaling.trial_id` = '{t.trial_id}'")
    return run


def steps_of(rec, t, key):
    """The steps at which trial t's run holds metric key, in order."""
    return [m.step for m in sorted(rec.tracker.client.get_metric_history(trial_run(rec, t).info.run_id, key),
                                   key=lambda m: m.step)]


def tune_trial(t, error=None):
    """What the recorder reads of a Tune trial; error: the text of its last failure in its error file, as Tune writes
    it there (Tune passes on_trial_error no error: the recorder reads the file)."""
    error_file = None
    if error is not None:
        error_file = Path(tempfile.mkdtemp()) / "error.txt"
        error_file.write_text("Failure # 1 (occurred at 2026-12-07_10-00-00)\nan earlier attempt's error\n"
                              f"Failure # 2 (occurred at 2026-12-07_11-00-00)\n{error}\n")
    return SimpleNamespace(config={"trial": {"trial_id": t.trial_id}}, error_file=error_file and str(error_file))


def milestone(step, **metrics):
    return {"kind": KIND_MILESTONE, "step": step, "train_loss": 0.3, "lr": 1e-3, "train_time_s": 10.0 * step,
            "eval_time_s": 2.0, "fid": 100.0 - step, **metrics}


def test_a_row_holds_the_reported_lr_and_the_sampler_with_its_step_count(study):
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10, lr=2.5e-4))  # the schedule's lr, not the base 1e-3
    df = load_results(study.output)
    assert df.lr.tolist() == [2.5e-4]
    assert df.sampler.tolist() == ["ddim-5"]


def test_reports_without_a_step_are_skipped(study):
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    # A checkpoint (or any report) before the first log of a run may carry no step: nothing to place it at.
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_CHECKPOINT})
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_MILESTONE, "fid": 3.0})
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_LOG, "train_loss": 0.5})
    assert rec.rows == {} and rec.curves == {} and rec.progress.step[t.trial_id] == 0
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))  # later reports are recorded as before
    assert list(rec.rows) == [(t.trial_id, 10)]


def test_held_logs_are_recorded_in_order_before_the_report_that_carries_them(study):
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))

    def log(step):
        return {"step": step, "train_loss": 1.0 / step, "lr": 1e-3, "images_per_s": 50.0, "first_step_at": 1.0}

    rec.on_trial_result(0, [], tune_trial(t), {**log(1), "kind": KIND_LOG, HELD_LOGS_KEY: []})
    # A log report carrying the three before it, then a milestone carrying one.
    rec.on_trial_result(0, [], tune_trial(t), {**log(5), "kind": KIND_LOG, HELD_LOGS_KEY: [log(2), log(3), log(4)]})
    rec.on_trial_result(0, [], tune_trial(t), {**milestone(10), HELD_LOGS_KEY: [log(6)]})
    assert sorted(s for _, s in rec.curves) == [1, 2, 3, 4, 5, 6]
    assert rec.curves[(t.trial_id, 3)]["train_loss"] == pytest.approx(1 / 3)
    client, run_id = rec.tracker.client, trial_run(rec, t).info.run_id
    losses = sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]  # every log step once, the held ones included
    assert losses[3].value == pytest.approx(1 / 4)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "fid")] == [(10, 90.0)]
    assert load_results(study.output).step.tolist() == [10]
    assert HELD_LOGS_KEY not in load_results(study.output).columns


def test_every_logged_metric_lands_in_its_own_loss_curve_column(study):
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    log = {"kind": KIND_LOG, "step": 5, "train_loss": 0.4, "lr": 1e-3, "images_per_s": 50.0,
           "achieved_tflops": 0.0015, "mfu": 0.03, "first_step_at": 1.0}
    rec.on_trial_result(0, [], tune_trial(t), log)
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    [curve] = load_curves(study.output / "loss_curves.parquet").to_dict("records")
    assert {k: curve[k] for k in ("step", "train_loss", "lr", "images_per_s", "achieved_tflops", "mfu")} == {
        "step": 5, "train_loss": 0.4, "lr": 1e-3, "images_per_s": 50.0, "achieved_tflops": 0.0015, "mfu": 0.03}


def test_busy_seconds_count_only_this_runs_work(study):
    t = study.trials[0]
    # An earlier driver run measured milestone 10 after 100 s of training; its eval time did not reach Parquet.
    earlier = recorder(study)
    earlier.on_trial_result(0, [], tune_trial(t), milestone(10, train_time_s=100.0, eval_time_s=None))
    assert math.isnan(load_results(study.output).eval_time_s.iloc[0])
    rec = recorder(study)
    assert rec.busy_seconds([t.trial_id]) == 0.0  # nothing done here yet, and NaN counts as nothing
    # Resumed here from milestone 10's checkpoint (its first report says): 30 s more of training up to milestone 20,
    # then 7 s of evaluation.
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(20, train_time_s=130.0, eval_time_s=7.0, **{RESUMED_KEY: 100.0}))
    assert rec.busy_seconds([t.trial_id]) == pytest.approx(37.0)


def test_busy_seconds_of_a_trial_trained_again_from_step_0(study):
    # Its first report without a resumed time: trained from step 0 (a continuation that starts over, checkpoints
    # lost). It was counted from the earlier run's last row, 100 s: 37 s of 137.
    t = study.trials[0]
    recorder(study).on_trial_result(0, [], tune_trial(t), milestone(10, train_time_s=100.0, eval_time_s=4.0))
    rec = recorder(study)
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(20, train_time_s=130.0, eval_time_s=7.0))
    assert rec.busy_seconds([t.trial_id]) == pytest.approx(137.0)


def test_busy_seconds_count_from_the_checkpoint_a_trial_resumed_at(study):
    # Resumed from a checkpoint past the earlier run's last row (at 115 s of training: checkpoints finer than the
    # milestones), as its first report says: 15 s of training done here, not 30 (the other 15 were the earlier run's;
    # counted here, a study's efficiency could pass 1).
    t = study.trials[0]
    recorder(study).on_trial_result(0, [], tune_trial(t), milestone(10, train_time_s=100.0, eval_time_s=4.0))
    rec = recorder(study)
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_LOG, "step": 15, "train_loss": 0.4, "lr": 1e-3,
                                               "images_per_s": 50.0, RESUMED_KEY: 115.0})
    rec.on_trial_result(0, [], tune_trial(t), {**milestone(20, train_time_s=130.0, eval_time_s=7.0),
                                               RESUMED_KEY: 120.0})  # a later restart's: not where it began
    assert rec.busy_seconds([t.trial_id]) == pytest.approx(22.0)


@pytest.mark.parametrize("how", ["trial actor died", "end report"])
def test_a_failure_after_the_last_milestone_leaves_the_trial_finished_and_ok(study, how):
    # The Tune actor dying reaches on_trial_error; Train workers failing (the usual case) reach the trial's
    # end report, which ray_trial sends for Ray Train's TrainingFailedError, then on_trial_complete.
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    for step in t.milestones:
        rec.on_trial_result(0, [], tune_trial(t), milestone(step))
    if how == "end report":
        rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_END, "status": "failed",
                                                   "error": "TrainingFailedError: teardown broke"})
        rec.on_trial_complete(0, [], tune_trial(t))
    else:
        rec.on_trial_error(0, [], tune_trial(t, error="teardown broke"))
    run = trial_run(rec, t)
    assert run.data.tags["dit_scaling.status"] == "ok" and run.info.status == "FINISHED"
    df = load_results(study.output)
    assert df.step.tolist() == [10, 20] and df.status.tolist() == ["ok", "ok"]
    assert recorded_trials(study) == ({t.trial_id}, set())
    assert rec.failed_count() == 0 and rec.ended == {t.trial_id}
    assert "teardown broke" in run.data.tags["dit_scaling.error_after_last_milestone"]


def test_a_trial_rerun_after_it_diverged_still_ends_diverged(study):
    # Its Tune actor's node died after the divergence: Tune ran it again, and the rerun's failed end report went (a
    # failure after a divergence), but the run ended FINISHED, tagged "ok", as the trial was no longer "failed".
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_END, "status": "diverged", "step": 15, "error": "nan"})
    rec.on_trial_recover(0, [], tune_trial(t))
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_END, "status": "failed", "error": "resumed past 15"})
    rec.on_trial_complete(0, [], tune_trial(t))
    run = trial_run(rec, t)
    assert run.data.tags["dit_scaling.status"] == "diverged" and run.info.status == "FAILED"
    assert rec.progress.state[t.trial_id] == "diverged" and rec.failed_count() == 0


def test_a_trials_own_failure_report_is_kept_when_tune_then_reports_its_error(study):
    # The trial's end report named why (a milestone it passed); Tune's error for the same attempt then replaced it by
    # the error file's path.
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_END, "status": "failed", "step": 12,
                                               "error": "resumed past milestone 20 without a result"})
    rec.on_trial_error(0, [], tune_trial(t, error="RayActorError: The actor died unexpectedly"))
    df = load_results(study.output)
    assert df.step.tolist() == [10, 12] and df.error.tolist()[1] == "resumed past milestone 20 without a result"
    run = trial_run(rec, t)
    assert run.info.status == "FAILED" and rec.failed_count() == 1 and rec.progress.state[t.trial_id] == "failed"


def test_a_trial_that_completes_without_every_milestone_counts_as_failed(study):
    # Tune completed the trial (its function returned) before its last milestone's row, with no end report: its run
    # ended FAILED, but failed_count() read only end reports, and the study exited 0 with its run FINISHED.
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    rec.on_trial_complete(0, [], tune_trial(t))
    assert rec.progress.state[t.trial_id] == "failed" and trial_run(rec, t).info.status == "FAILED"
    assert rec.failed_count() == 1


def test_a_store_that_does_not_answer_at_a_trials_start_does_not_log_its_curve_twice(study, monkeypatch):
    # Its logged steps read as none: a resumed trial re-sends every log it made, and each went to MLflow again.
    first, t = recorder(study), study.trials[0]
    first.on_trial_start(0, [], tune_trial(t))
    for step in (5, 10):
        first.on_trial_result(0, [], tune_trial(t), {"kind": KIND_LOG, "step": step, "train_loss": 0.4, "lr": 1e-3})
    first.on_trial_result(0, [], tune_trial(t), milestone(10))  # the curve to here in Parquet too
    first.tracker.flush()
    rec = recorder(study)
    read = rec.tracker.logged_steps

    def fails_once(run_id, key, strict=False):
        monkeypatch.setattr(rec.tracker, "logged_steps", read)
        raise ConnectionError("the store does not answer")
    monkeypatch.setattr(rec.tracker, "logged_steps", fails_once)
    rec.on_trial_start(0, [], tune_trial(t))
    for step in (5, 10, 15):  # resumed: its earlier logs again, then a new one
        rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_LOG, "step": step, "train_loss": 0.4, "lr": 1e-3})
    rec.tracker.flush()
    assert steps_of(rec, t, "train_loss") == [5, 10, 15]


def test_a_failure_after_a_divergence_leaves_the_divergence_as_the_result(study, capsys):
    # The failed end replaced the diverged row: the study exited 1, and its next run trained the trial again, to
    # diverge again.
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_END, "status": "diverged", "step": 15,
                                               "error": "loss became nan at step 15"})
    rec.on_trial_error(0, [], tune_trial(t, error="shutdown broke"))
    rec.on_trial_complete(0, [], tune_trial(t))
    df = load_results(study.output)
    assert df.step.tolist() == [10, 15] and df.status.tolist() == ["ok", "diverged"]
    assert recorded_trials(study) == ({t.trial_id}, set()) and rec.failed_count() == 0
    run = trial_run(rec, t)
    assert run.data.tags["dit_scaling.status"] == "diverged" and "shutdown broke" in \
        run.data.tags["dit_scaling.error_after_divergence"]
    assert f"warning: trial {t.trial_id} failed after it diverged at step 15; that result stands" in \
        capsys.readouterr().err


def test_a_failure_between_milestones_is_a_failed_row_after_the_last_measurement(study):
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    rec.on_trial_error(0, [], tune_trial(t, error="node lost"))
    df = load_results(study.output)
    assert df.step.tolist() == [10, 11] and df.status.tolist() == ["ok", "failed"]
    assert df.error.iloc[1] == "node lost" and df.lr.iloc[1] == 1e-3  # no lr reported: the base lr
    # The error column held the error file's path: Tune passes on_trial_error no error of its own.
    assert recorded_trials(study) == (set(), set())
    run = trial_run(rec, t)
    assert rec.failed_count() == 1 and run.info.status == "FAILED" and run.data.tags["dit_scaling.status"] == "failed"


def test_a_study_that_logs_to_another_store_now_brings_its_finished_trials_there(study, empty_store):
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_LOG, "step": 5, "train_loss": 0.5, "lr": 1e-3})
    for step in t.milestones:
        rec.on_trial_result(0, [], tune_trial(t), milestone(step))
    rec.on_trial_complete(0, [], tune_trial(t))
    first = trial_run(rec, t).info.run_id
    # The study run again, logging to another store (MLFLOW_TRACKING_URI set this time): the trial is skipped.
    other = study.output.parent / "other.db"
    shutil.copyfile(empty_store, other)
    moved = Recorder(study, StudyTracker(f"sqlite:///{other}", "tiny", "tiny", study.output),
                     Progress(study.trials, stream=io.StringIO()))
    moved.catch_up_runs({t.trial_id}, new_store=True)
    run = trial_run(moved, t)
    assert run.info.status == "FINISHED" and run.data.tags["dit_scaling.status"] == "ok"
    assert steps_of(moved, t, "fid") == [10, 20] and steps_of(moved, t, "train_loss") == [5]
    assert set(load_results(study.output).mlflow_run_id) == {run.info.run_id} != {first}
    assert trial_run(rec, t).info.run_id == first  # the first store's run is left as it was


@pytest.mark.parametrize("measured, end", [((10,), ("KILLED", "killed")), ((10, 20), ("FINISHED", "ok"))])
def test_an_open_run_of_a_trial_the_edited_study_no_longer_defines_is_ended(study, tmp_path, measured, end):
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    for step in measured:
        rec.on_trial_result(0, [], tune_trial(t), milestone(step))
    # The driver is killed, leaving the run open, and the study file is edited (another lr: another trial).
    assert trial_run(rec, t).info.status == "RUNNING"
    edited_path = tmp_path / "edited.yaml"
    edited_path.write_text(STUDY.format(out=study.output).replace("lr: 1.0e-3", "lr: 2.0e-3"))
    edited = load_study(edited_path, check_data=False)
    assert t.trial_id not in {e.trial_id for e in edited.trials}
    again = recorder(edited)
    again.open_runs(e.trial_id for e in edited.trials)
    again.catch_up_runs(set())
    run = trial_run(rec, t)
    assert (run.info.status, run.data.tags["dit_scaling.status"]) == end  # no run of this study would end it
    assert steps_of(rec, t, "fid") == list(measured)


def test_a_retry_that_succeeds_is_ok_everywhere_and_only_its_ok_rows_get_a_teardown(study):
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_LOG, "step": 4, "train_loss": 0.5, "lr": 1e-3})
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_END, "status": "failed", "error": "node lost", "step": 4})
    rec.on_trial_complete(0, [], tune_trial(t))
    assert load_results(study.output).teardown_s.isna().all()  # a failed row has no teardown
    first = trial_run(rec, t)
    assert "teardown_s" not in first.data.metrics  # nor its run: a replay from Parquet rebuilds the run as it was
    assert first.data.tags["dit_scaling.status"] == "failed" and first.info.status == "FAILED"
    rec = recorder(study)  # the study run again: its runs are found again, not made twice
    rec.on_trial_start(0, [], tune_trial(t))
    again = trial_run(rec, t)
    assert again.info.run_id == first.info.run_id and again.data.tags["dit_scaling.status"] == "running"
    for step in t.milestones:
        rec.on_trial_result(0, [], tune_trial(t), milestone(step))
    rec.on_trial_complete(0, [], tune_trial(t))
    df = load_results(study.output)
    assert df.status.tolist() == ["ok", "ok"] and df.teardown_s.notna().all()
    run = trial_run(rec, t)
    assert run.data.tags["dit_scaling.status"] == "ok" and run.info.status == "FINISHED"
    assert steps_of(rec, t, "train_loss") == [4] and steps_of(rec, t, "fid") == [10, 20]  # nothing logged twice


def test_a_trial_rerun_in_the_same_driver_after_its_failure_was_reported_ends_ok(study):
    # Its Tune actor's node died after the trial function reported its failure and before Tune collected it: Tune ran
    # the trial again, which measured every milestone, and it still ended FAILED (counted so: exit 1).
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_END, "status": "failed", "error": "node lost", "step": 4})
    rec.on_trial_start(0, [], tune_trial(t))  # the rerun, by this driver
    for step in t.milestones:
        rec.on_trial_result(0, [], tune_trial(t), milestone(step))
    rec.on_trial_complete(0, [], tune_trial(t))
    assert load_results(study.output).status.tolist() == ["ok", "ok"] and rec.failed_count() == 0
    run = trial_run(rec, t)
    assert run.data.tags["dit_scaling.status"] == "ok" and run.info.status == "FINISHED"


def test_a_diverged_trials_teardown_counts_from_its_end_report(study, clock):
    # Counted from its last log or milestone report: the training up to the divergence was taken for teardown.
    now = clock
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    now[0] = 1010.0  # trained on to the divergence
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_END, "status": "diverged", "step": 15,
                                               "error": "loss became nan"})
    now[0] = 1010.2
    rec.on_trial_complete(0, [], tune_trial(t))
    assert rec.overhead[t.trial_id]["teardown_s"] == pytest.approx(0.2)  # not 10.2
    df = load_results(study.output)
    assert df.status.tolist() == ["ok", "diverged"] and df.teardown_s.tolist()[0] == pytest.approx(0.2)


def test_a_failure_after_consecutive_milestones_measured_before_keeps_both_rows(study):
    # The collision guard moved a failure row one step on once: onto the next milestone's ok row, replaced.
    path = study.path.with_name("consecutive.yaml")
    path.write_text(study.path.read_text().replace("[10, 20]", "[10, 11, 20]"))
    study = load_study(path, check_data=False)
    rec, t = recorder(study), study.trials[0]
    assert t.milestones == (10, 11, 20)
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    rec.on_trial_result(0, [], tune_trial(t), milestone(11))  # a row at the next step (an earlier attempt's)
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_END, "status": "failed", "error": "node lost",
                                               "step": 10})
    df = load_results(study.output)
    assert df.step.tolist() == [10, 11, 12] and df.status.tolist() == ["ok", "ok", "failed"]


@pytest.mark.parametrize("val_loss", [None, 0.25])
def test_replaying_twice_logs_nothing_the_second_time(study, val_loss):
    t, out = study.trials[0], study.output
    out.mkdir()
    (out / "study.yaml").write_text(study.resolved_yaml())
    rows = [dict(study="tiny", trial_id=t.trial_id, model=t.model, patch=t.patch, params=t.params, gflops=t.gflops,
                 batch_size=32, step=step, max_step=20, train_compute=t.gflops * 32 * step * 3, train_loss=0.3,
                 val_loss=val_loss, val_mse=0.125, fid=100.0 - step, fid_samples=100, feature_extractor="digits",
                 wall_time_s=1.0 * step, images_per_s=300.0, sample_images_per_s=40.0, status="ok",
                 mlflow_run_id=None,
                 config_json=json.dumps(t.to_dict()))
            for step in t.milestones]
    write_table(rows, out / "results.parquet", RESULTS_SCHEMA)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    assert replay(out, uri) == 2
    assert replay(out, uri) == 0
    client = MlflowClient(uri)
    child = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                               f"tags.`dit_scaling.trial_id` = '{t.trial_id}'")[0]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "fid")] == [10, 20]
    # The evaluation's measurements beyond FID, from their own columns.
    for key, value in (("val_mse", 0.125), ("sample_images_per_s", 40.0)):
        assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, key)] == [(10, value),
                                                                                                   (20, value)]


def test_a_replay_fills_the_gaps_of_a_run_not_only_what_follows_its_last_step(study):
    # Calls lost below a run's last step (queued by a driver interrupted while MLflow was away, or refused): the
    # replay logged only steps above the highest the run had, so the gaps stayed.
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    for step in (5, 10, 15, 20):
        rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_LOG, "step": step, "train_loss": 1.0 / step,
                                                   "lr": 1e-3, "images_per_s": 50.0})
        if step in t.milestones:
            rec.on_trial_result(0, [], tune_trial(t), milestone(step))
    run_id = trial_run(rec, t).info.run_id
    store = study.output.parent / "mlflow.db"
    with sqlite3.connect(store) as db:  # the points the lost calls held (MLflow deletes no single point)
        for key, step in (("train_loss", 5), ("train_loss", 15), ("fid", 10), ("train_compute", 10)):
            db.execute("DELETE FROM metrics WHERE run_uuid = ? AND key = ? AND step = ?", (run_id, key, step))
    db.close()
    assert steps_of(rec, t, "train_loss") == [10, 20] and steps_of(rec, t, "fid") == [20]
    (study.output / "study.yaml").write_text(study.resolved_yaml())
    uri = f"sqlite:///{store}"
    assert replay(study.output, uri) == 3  # two curve points, one milestone
    assert steps_of(rec, t, "train_loss") == [5, 10, 15, 20]
    assert steps_of(rec, t, "fid") == steps_of(rec, t, "train_compute") == [10, 20]
    assert replay(study.output, uri) == 0


def test_a_finished_trials_run_left_open_is_caught_up_and_ended_when_the_study_runs_again(study):
    # A driver killed after a trial's last row was in Parquet, before its metrics reached MLflow and before it ended
    # the trial's run: the run stayed RUNNING for good (a re-run opens only the runs of trials still to train), and
    # lacked the milestone (which the trial does not measure again).
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    for step in t.milestones:
        rec.on_trial_result(0, [], tune_trial(t), milestone(step))
    run_id = trial_run(rec, t).info.run_id
    with sqlite3.connect(study.output.parent / "mlflow.db") as db:  # the last milestone's metrics, never logged
        db.execute("DELETE FROM metrics WHERE run_uuid = ? AND step = 20", (run_id,))
    db.close()
    assert trial_run(rec, t).info.status == "RUNNING" and steps_of(rec, t, "fid") == [10]
    again = recorder(study)
    again.catch_up_runs(recorded_trials(study)[0])
    run = trial_run(again, t)
    assert run.info.status == "FINISHED" and run.data.tags["dit_scaling.status"] == "ok"
    assert steps_of(again, t, "fid") == steps_of(again, t, "train_compute") == [10, 20]
    assert run.data.metrics["fid"] == 80.0  # milestone(20)'s


def test_a_driver_that_stops_outside_tunes_loop_ends_its_runs(study):
    # A second Ctrl-C (Tune lets it through) or an error of the driver's own left the study's run and its trials'
    # RUNNING for good.
    from scaling.run import end_runs

    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    end_runs(rec, rec.tracker, [t.trial_id], "FAILED", retry=False)
    assert trial_run(rec, t).info.status == "KILLED"
    assert rec.tracker.client.get_run(rec.tracker.parent_run_id).info.status == "FAILED"
    # With the server away (a call queued), a second Ctrl-C waits on no attempt: what is left is queued.
    attempts = []

    def away():
        attempts.append(1)
        raise ConnectionError("timed out")

    rec.tracker.pending = [(away, (), {})]
    rec.tracker.retry_at = 0  # its time has come: an unforced flush would try it
    end_runs(rec, rec.tracker, [t.trial_id], "KILLED", retry=False)
    assert attempts == [] and len(rec.tracker.pending) == 4  # the tag and status of the trial, the study's end


def test_replay_closes_a_trial_whose_failure_came_after_its_last_milestone_as_finished(study):
    # Written before the recorder stopped recording such failures: a failed row after every milestone was ok.
    t, out = study.trials[0], study.output
    out.mkdir()
    (out / "study.yaml").write_text(study.resolved_yaml())
    base = dict(study="tiny", trial_id=t.trial_id, model=t.model, patch=t.patch, params=t.params, gflops=t.gflops,
                batch_size=32, max_step=20, train_loss=0.3, fid=80.0, fid_samples=100, feature_extractor="digits",
                images_per_s=300.0, config_json=json.dumps(t.to_dict()))
    rows = [{**base, "step": 10, "train_compute": t.gflops * 32 * 30, "status": "ok"},
            {**base, "step": 20, "train_compute": t.gflops * 32 * 60, "status": "ok"},
            {**base, "step": 21, "train_compute": t.gflops * 32 * 63, "status": "failed", "error": "teardown"}]
    write_table(rows, out / "results.parquet", RESULTS_SCHEMA)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    replay(out, uri)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]  # the trial's run and the study's


def test_every_reported_metric_lands_in_its_own_column(study):
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    # Distinct values for every key a milestone report carries: a value written into another key's column shows.
    report = {"kind": KIND_MILESTONE, "step": 10, "train_loss": 0.31, "val_loss": 0.27, "val_mse": 0.19,
              "val_loss_ema": 0.23, "fid": 41.5, "fid_floor": 3.25, "kid": 0.0125, "precision": 0.61,
              "recall": 0.47, "inception_score": 7.75, "fid_samples": 100, "feature_extractor": "digits-cnn",
              "lr": 2.5e-4, "train_time_s": 12.5, "eval_time_s": 4.5, "images_per_s": 345.0,
              "sample_images_per_s": 55.0, "achieved_tflops": 0.002, "mfu": 0.0625}
    rec.on_trial_result(0, [], tune_trial(t), report)
    row = load_results(study.output).iloc[0].to_dict()
    expected = {"train_loss": 0.31, "val_loss": 0.27, "val_mse": 0.19, "val_loss_ema": 0.23, "fid": 41.5,
                "fid_floor": 3.25, "kid": 0.0125, "precision": 0.61, "recall": 0.47, "inception_score": 7.75,
                "fid_samples": 100, "feature_extractor": "digits-cnn", "lr": 2.5e-4, "wall_time_s": 12.5,
                "eval_time_s": 4.5, "images_per_s": 345.0, "sample_images_per_s": 55.0, "achieved_tflops": 0.002,
                "mfu": 0.0625}
    assert {k: row[k] for k in expected} == expected
    # The trial's own fields, and the training compute so far: Gflops × batch × step × 3.
    assert (row["study"], row["trial_id"], row["model"], row["size"], row["patch"]) == (
        "tiny", t.trial_id, "DiT-P/2", "P", 2)
    assert (row["params"], row["gflops"], row["batch_size"], row["step"], row["max_step"]) == (
        t.params, t.gflops, 32, 10, 20)
    assert row["train_compute"] == pytest.approx(t.gflops * 32 * 10 * 3, rel=1e-12)
    assert (row["sampler"], row["cfg_scale"], row["dataset"], row["status"]) == ("ddim-5", 1.0, "digits", "ok")
    # MLflow gets every evaluation metric under its own name, at the milestone's step.
    client, run_id = rec.tracker.client, trial_run(rec, t).info.run_id
    logged = {}
    for key in ("val_loss", "val_mse", "val_loss_ema", "fid", "fid_floor", "kid", "precision", "recall",
                "inception_score", "eval_time_s", "sample_images_per_s"):
        [metric] = client.get_metric_history(run_id, key)
        assert metric.step == 10, key
        logged[key] = metric.value
    assert logged == {
        "val_loss": 0.27, "val_mse": 0.19, "val_loss_ema": 0.23, "fid": 41.5, "fid_floor": 3.25, "kid": 0.0125,
        "precision": 0.61, "recall": 0.47, "inception_score": 7.75, "eval_time_s": 4.5, "sample_images_per_s": 55.0}


def test_a_stopped_study_marks_the_runs_of_started_trials_killed(study):
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    rec.interrupted([t.trial_id, "never-started"])
    run = trial_run(rec, t)
    assert run.info.status == "KILLED" and run.data.tags["dit_scaling.status"] == "killed"


@pytest.mark.parametrize("ending", ["every milestone", "diverged"])
def test_a_study_stopped_in_a_finished_trials_teardown_ends_its_run_as_finished(study, ending):
    # Its run was KILLED for good: a re-run counts the trial finished (its rows are complete) and never reopens it.
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    if ending == "diverged":
        rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_END, "status": "diverged", "step": 15,
                                                   "error": "loss became nan at step 15"})
    else:
        rec.on_trial_result(0, [], tune_trial(t), milestone(20))
    rec.interrupted([t.trial_id])  # Ctrl-C before Tune's on_trial_complete
    run = trial_run(rec, t)
    expected = ("FINISHED", "ok") if ending == "every milestone" else ("FAILED", "diverged")
    assert (run.info.status, run.data.tags["dit_scaling.status"]) == expected
    assert recorded_trials(study)[0] == {t.trial_id}


def test_rows_written_under_an_earlier_name_of_the_trial_take_its_name(study):
    # The same trial id under another name: a fixed architecture override, which named no model before 2026-12-05.
    # Left as it was, a resumed trial's rows would show in the report as two models.
    import pandas as pd

    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    log = {"step": 5, "train_loss": 0.4, "lr": 1e-3, "images_per_s": 50.0, "first_step_at": 1.0}
    rec.on_trial_result(0, [], tune_trial(t), {**log, "kind": KIND_LOG, HELD_LOGS_KEY: []})
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    rec.write()
    for name in ("results.parquet", "loss_curves.parquet"):
        table = pd.read_parquet(study.output / name)
        assert set(table.model) == {t.model}
        table.assign(model="DiT-P/2 as it was named").to_parquet(study.output / name)
    recorder(study).write()  # the study run again
    for name in ("results.parquet", "loss_curves.parquet"):
        assert set(pd.read_parquet(study.output / name).model) == {t.model}


def test_rows_of_a_trial_given_more_steps_take_its_steps_at_once(study, tmp_path):
    # A trial that goes on from a recorded run (scaling.continuation): its rows take its final step and configuration
    # when the study starts, before any new row, so that a study stopped then continues it again and a replay knows it
    # unfinished; a failed row past its last measurement does not count as its end.
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_END, "status": "failed", "step": 15, "error": "boom"})
    grown = tmp_path / "grown.yaml"
    grown.write_text(STUDY.format(out=study.output).replace("steps: [10, 20]", "steps: [10, 20, 40]"))
    longer = load_study(grown, check_data=False)
    longer.trials[0] = dataclasses.replace(longer.trials[0], trial_id=t.trial_id)  # as scaling.continuation gives it
    measured = load_results(study.output)  # on an encode of latents, which each row keeps naming
    measured["config_json"] = [json.dumps({**json.loads(c), "data_encode": "0123456789abcdef"})
                               for c in measured.config_json]
    write_table(measured, study.output / "results.parquet", RESULTS_SCHEMA)
    recorder(longer)
    df = load_results(study.output)
    assert sorted(zip(df.step, df.status, df.max_step)) == [(10, "ok", 40), (15, "failed", 40)]
    assert all(json.loads(c)["milestones"] == [10, 20, 40] for c in df.config_json)
    assert all(json.loads(c)["data_encode"] == "0123456789abcdef" for c in df.config_json)
    # Fewer steps than measured: the run's last measurement stays its end (the report then leaves the failure out).
    shorter = tmp_path / "shorter.yaml"
    shorter.write_text(STUDY.format(out=study.output).replace("steps: [10, 20]", "steps: [5]"))
    short = load_study(shorter, check_data=False)
    short.trials[0] = dataclasses.replace(short.trials[0], trial_id=t.trial_id)
    recorder(short)
    assert load_results(study.output).max_step.tolist() == [10, 10]


def test_rows_of_a_trial_whose_latents_moved_name_where_they_are_now(tmp_path):
    # A trial that goes on from a recorded run on the same latents moved elsewhere (scaling.continuation): its rows
    # take the path it trains from, keeping the encode they were measured on; its MLflow run (whose params are fixed)
    # says where the data is in a tag.
    def latents_study(folder):
        path = tmp_path / f"{folder}.yaml"
        text = STUDY.format(out=tmp_path / "out").replace("fid: true", "fid: false")  # no VAE to decode with
        path.write_text(text.replace("{dataset: digits}", f"{{dataset: latents, path: {tmp_path / folder}}}").replace(
            "grid_images_per_class: 1", "grid_images_per_class: 0"))
        return load_study(path, check_data=False)  # no folder there: these tests feed the recorder directly

    ran = latents_study("here")
    t = ran.trials[0]
    rec = recorder(ran)
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    measured = load_results(ran.output)
    measured["config_json"] = [json.dumps({**json.loads(c), "data_encode": "0123456789abcdef"})
                               for c in measured.config_json]
    write_table(measured, ran.output / "results.parquet", RESULTS_SCHEMA)
    moved = latents_study("there")
    assert moved.trials[0].trial_id != t.trial_id
    moved.trials[0] = dataclasses.replace(moved.trials[0], trial_id=t.trial_id)  # as scaling.continuation gives it
    rec = recorder(moved)
    (config,) = [json.loads(c) for c in load_results(ran.output).config_json]
    assert config["data"]["path"] == str(tmp_path / "there") and config["data_encode"] == "0123456789abcdef"
    # At the study's start, before the trial starts (a finished one never does), and again when it starts.
    assert trial_run(rec, t).data.tags["dit_scaling.data_path"] == str(tmp_path / "there")
    rec.on_trial_start(0, [], tune_trial(moved.trials[0]))
    assert trial_run(rec, t).data.tags["dit_scaling.data_path"] == str(tmp_path / "there")


def test_start_up_counts_from_the_slot_coming_free_not_from_tunes_trial_start(study, clock):
    # Tune's on_trial_start comes once the trial's actor is up: a study's first trials each spent about 2 s (the AVX2
    # box) starting theirs before the clock began, and "scheduled -> first step" left that out.
    now = clock
    rec, t = recorder(study), study.trials[0]
    second = dataclasses.replace(t, trial_id="second")
    rec.trials["second"] = second
    rec.open_slots(1)  # the sweep starts at 1000 with one slot
    now[0] = 1002.0  # the trial's actor is up
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_LOG, "step": 5, "train_loss": 0.4, "lr": 1e-3,
                                               "images_per_s": 50.0, "first_step_at": 1007.5})
    assert rec.overhead[t.trial_id]["startup_s"] == 7.5
    now[0] = 1100.0
    rec.progress.state["second"] = "pending"  # one of this run's trials, yet to start (Tune makes it after this call)
    rec.on_trial_complete(0, [], tune_trial(t))  # its slot is free again at 1100
    now[0] = 1100.2  # a reused actor: Tune starts the next trial in it at once
    rec.on_trial_start(0, [], tune_trial(second))
    rec.on_trial_result(0, [], tune_trial(second), {"kind": KIND_LOG, "step": 5, "train_loss": 0.4, "lr": 1e-3,
                                                    "images_per_s": 50.0, "first_step_at": 1103.0})
    assert rec.overhead["second"]["startup_s"] == pytest.approx(3.0)


def test_a_trial_rerun_after_its_node_died_counts_its_start_up_from_then_not_from_an_idle_slot(study, clock):
    # A slot freed with no trial pending stayed in the queue: a trial Tune reran much later (its node lost) took it,
    # and its start-up counted the idle time (415 s for 15).
    now = clock
    rec, t = recorder(study), study.trials[0]
    other = dataclasses.replace(t, trial_id="other")
    rec.trials["other"] = other
    rec.open_slots(2)  # at 1000
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_start(0, [], tune_trial(other))
    now[0] = 1100.0
    rec.on_trial_complete(0, [], tune_trial(other))  # none of this run's trials left to start
    now[0] = 1500.0
    rec.on_trial_recover(0, [], tune_trial(t))  # its node died
    now[0] = 1510.0
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_LOG, "step": 5, "train_loss": 0.4, "lr": 1e-3,
                                               "images_per_s": 50.0, "first_step_at": 1515.0})
    assert rec.overhead[t.trial_id]["startup_s"] == pytest.approx(15.0) and rec.free_slots == []


def test_the_overhead_summary_counts_the_trials_whose_start_up_was_measured(study, clock):
    # A trial that diverged before its first report has a teardown (from its end report) but no start-up: it was
    # counted in "median of N" with nothing of it in the start-up median, and its teardown in the other.
    now = clock
    rec, t = recorder(study), study.trials[0]
    diverged = dataclasses.replace(t, trial_id="diverged")
    rec.trials["diverged"] = diverged
    rec.open_slots(2)
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_start(0, [], tune_trial(diverged))
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_LOG, "step": 5, "train_loss": 0.4, "lr": 1e-3,
                                               "images_per_s": 50.0, "first_step_at": 1004.0})
    now[0] = 1005.0
    rec.on_trial_result(0, [], tune_trial(diverged), {"kind": KIND_END, "status": "diverged", "step": 2,
                                                      "error": "loss became nan"})
    now[0] = 1050.0  # a slow teardown, of the trial with no start-up
    rec.on_trial_complete(0, [], tune_trial(diverged))
    now[0] = 1100.0
    rec.on_trial_complete(0, [], tune_trial(t))
    assert rec.overhead["diverged"] == {"teardown_s": 45.0}
    assert rec.overhead_summary() == ("overhead per trial (median of 1): 4.0 s from scheduled to first step, "
                                      "100.0 s from last report to a free slot")


def test_a_resumed_trials_progress_counts_from_its_first_report(study):
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    before = rec.progress.done_compute()
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_LOG, "step": 15, "train_loss": 0.4, "lr": 1e-3,
                                               RESUMED_KEY: 150.0})
    assert rec.progress.done_compute() - rec.progress.start_compute == before == 0  # earlier runs' training
    rec.on_trial_result(0, [], tune_trial(t), {"kind": KIND_LOG, "step": 16, "train_loss": 0.4, "lr": 1e-3})
    assert rec.progress.done_compute() - rec.progress.start_compute == pytest.approx(t.gflops * 32 * 3)  # one step


def test_the_launch_catch_up_passes_a_row_without_its_config(study):
    # config_json is nullable (a row written by hand): the catch-up's json.loads(None) ended the driver's launch.
    import pandas as pd

    from scaling.mlflow_backfill import log_missing

    rec, t = recorder(study), study.trials[0]
    rows = pd.DataFrame([{"trial_id": t.trial_id, "step": 10, "status": "ok", "config_json": None, "train_loss": 0.3,
                          "train_compute": 1.0, "fid": 90.0, "startup_s": None, "teardown_s": None}])
    curves = pd.DataFrame([{"trial_id": t.trial_id, "step": 5, "train_loss": 0.4}])
    assert log_missing(rec.tracker, rows, curves, skip_unreadable=True) == 2
    rec.tracker.flush()
    assert steps_of(rec, t, "train_loss") == [5] and steps_of(rec, t, "fid") == [10]


def test_a_curve_caught_up_at_launch_is_not_logged_again_when_its_trial_sends_it_again(study):
    # A trial killed before its first milestone: its curve is in Parquet, the calls that held it were lost with the
    # driver. The launch catch-up skipped trials with no row; caught up, the trial's resent logs were logged again.
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    log = {"kind": KIND_LOG, "step": 5, "train_loss": 0.5, "lr": 1e-3}
    rec.on_trial_result(0, [], tune_trial(t), log)
    rec.write()
    with sqlite3.connect(study.output.parent / "mlflow.db") as db:
        db.execute("DELETE FROM metrics WHERE run_uuid = ?", (trial_run(rec, t).info.run_id,))
    db.close()
    again = recorder(study)
    again.open_runs([t.trial_id])  # as the driver does before it catches up
    again.catch_up_runs(set())
    assert steps_of(again, t, "train_loss") == [5]
    again.on_trial_start(0, [], tune_trial(t))
    again.on_trial_result(0, [], tune_trial(t), log)  # resent from its checkpoint's logs
    assert steps_of(again, t, "train_loss") == [5]


def test_a_tune_error_without_an_error_file_says_so(study):
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_error(0, [], tune_trial(t))
    assert load_results(study.output).error.tolist() == ["the trial's Tune actor failed; Tune recorded no error"]


def test_a_trial_that_ends_without_its_milestones_nor_an_end_report_is_a_failed_row(study):
    # Failed in MLflow, the exit code and the progress, but no row: Parquet, the record a report reads, showed the
    # trial unfinished, with no error.
    rec, t = recorder(study), study.trials[0]
    rec.on_trial_start(0, [], tune_trial(t))
    rec.on_trial_result(0, [], tune_trial(t), milestone(10))
    rec.on_trial_complete(0, [], tune_trial(t))
    df = load_results(study.output)
    assert df.step.tolist() == [10, 11] and df.status.tolist() == ["ok", "failed"]
    assert df.error.iloc[1] == "the trial ended without a result at milestone(s) 20"
    run = trial_run(rec, t)
    assert rec.failed_count() == 1 and run.info.status == "FAILED" and run.data.tags["dit_scaling.status"] == "failed"
