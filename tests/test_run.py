"""scaling.run end to end on a local Ray: MLflow runs, Parquet rows, resume after a killed driver, bad input."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from scaling import run as scaling_run
from scaling.replay_mlflow import main as replay_main
from scaling.results import RESULTS_SCHEMA, load_results, write_table
from scaling.study import StudyError, load_study

REPO = Path(__file__).resolve().parents[1]


def write_study(tmp_path, steps=(10, 20), fid=True, extra="", lrs=None, patches=(2, 4)):
    """A tiny study of DiT-P/2 and /4 (and each lr in lrs, swept, if given)."""
    out = tmp_path / "out"
    study = tmp_path / "tiny.yaml"
    sweep_lr, lr = (f", train.lr: [{', '.join(map(repr, lrs))}]", "") if lrs else ("", "lr: 1.0e-3, ")
    study.write_text(textwrap.dedent(f"""\
        name: tiny
        data: {{dataset: digits}}
        sweep: {{model: [DiT-P], patch: {list(patches)}, steps: {list(steps)}{sweep_lr}}}
        train: {{batch_size: 32, {lr}ema_decay: 0.9, log_every: 5, ckpt_every: 10, val_batch: 64}}
        eval: {{fid: {str(fid).lower()}, fid_samples: 100, sampling_steps: 5, grid_images_per_class: 1}}
        resources: {{workers_per_trial: 1, cpus_per_worker: 1}}
        output: {out}
        """) + extra)
    return study, out


def run(args, timeout=600, **kwargs):
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    return subprocess.run([sys.executable, "-m", "scaling.run", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def wait_until_group_gone(pgid, timeout):
    """Wait for the live processes of a process group to exit; SIGKILL what is left at the timeout."""
    deadline = time.time() + timeout
    while group_alive(pgid) and time.time() < deadline:
        time.sleep(0.2)
    if group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:  # gone meanwhile
            pass


def group_alive(pgid):
    """Whether a process (not a zombie) of process group pgid runs, from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def mlflow_runs(out):
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_end_to_end_and_rerun_skips_finished(tmp_path):
    # Two healthy trials, and two whose lr makes the loss blow up at once: those end as diverged
    # while the others go on.
    study, out = write_study(tmp_path, lrs=(1e-3, 1e30))
    proc = run([study, "--report-dir", tmp_path / "report"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"report: {tmp_path / 'report' / 'index.html'}" in proc.stdout
    assert {"index.html", "report.md", "fits.json"} <= {p.name for p in (tmp_path / "report").iterdir()}
    df = load_results(out)
    healthy, bad = df[df.lr == 1e-3], df[df.lr == 1e30]
    assert sorted(zip(healthy.patch, healthy.step)) == [(2, 10), (2, 20), (4, 10), (4, 20)]
    assert (healthy.status == "ok").all() and healthy.val_loss.notna().all() and healthy.fid.notna().all()
    assert (healthy.fid_samples == 100).all() and (healthy.feature_extractor == "digits-cnn").all()
    # What they were measured against: one basis, the one the driver computes before launch (check_fid_basis).
    from core.evaluate import fid_basis_now
    from scaling.ray_trial import eval_config

    (trial,) = [t for t in load_study(study).trials if t.trial_id == healthy.trial_id.iloc[0]]
    assert set(healthy.fid_basis) == {fid_basis_now(eval_config(trial.to_dict(), out / "fid_cache"), "digits",
                                                    input_size=8)}
    assert healthy.train_compute.tolist() == pytest.approx((healthy.gflops * 32 * healthy.step * 3).tolist())
    assert sorted(bad.patch) == [2, 4] and (bad.status == "diverged").all() and (bad.step == 2).all()
    assert bad.error.str.contains("diverged at step 2").all()
    report = (tmp_path / "report" / "report.md").read_text()
    assert "diverged" in report and "diverged" in (tmp_path / "report" / "index.html").read_text()

    client, parents, children = mlflow_runs(out)
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["dit_scaling.trial_id"] for c in children} == set(df.trial_id)
    assert set(df.mlflow_run_id) == {c.info.run_id for c in children}
    ok_runs = [c for c in children if c.info.run_id in set(healthy.mlflow_run_id)]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        # Created at launch, started when the trial got its slot, ended after it.
        started = float(child.data.tags["dit_scaling.started_at"]) * 1e3
        assert child.info.start_time <= started <= child.info.end_time
        if child not in ok_runs:
            assert child.info.status == "FAILED" and child.data.tags["dit_scaling.status"] == "diverged"
    # The orchestration overhead and the study's efficiency are measured and logged.
    assert 0 < parents[0].data.metrics["efficiency"] < 1 and parents[0].data.metrics["wall_time_s"] > 0
    assert all(0 < c.data.metrics["startup_s"] < 300 and c.data.metrics["teardown_s"] >= 0 for c in ok_runs)
    assert "overhead per trial (median of 2)" in proc.stdout and "study efficiency" in proc.stdout
    # Parquet keeps them too: every row a run measured, with the values MLflow got.
    for child in ok_runs:
        rows = df[df.mlflow_run_id == child.info.run_id]
        assert rows.startup_s.tolist() == pytest.approx([child.data.metrics["startup_s"]] * 2, rel=1e-9)
        assert rows.teardown_s.tolist() == pytest.approx([child.data.metrics["teardown_s"]] * 2, rel=1e-9)
    for child in ok_runs:
        assert {"train_loss", "val_loss", "fid", "gflops", "params", "train_compute"} <= set(child.data.metrics)
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")] == [5, 10, 15, 20]
        assert client.list_artifacts(child.info.run_id, "samples")
    curves = pd.read_parquet(out / "loss_curves.parquet")
    assert len(curves) == 8

    # The driver dies after one trial's final checkpoint reached Ray's storage but before its row was
    # written: the re-run restores that checkpoint, evaluates it again and writes the row; the other
    # trials are finished (the diverged ones too) and skipped, and every row already there is kept as it was.
    # And a row of a trial that an earlier version of the study file defined: kept, and warned about.
    lost = healthy[(healthy.patch == 4) & (healthy.step == 20)]
    earlier = df.iloc[[0]].assign(trial_id="DiT-P-2-0123456789")
    write_table(pd.concat([df.drop(index=lost.index), earlier]), out / "results.parquet",
                RESULTS_SCHEMA)
    kept = df.drop(index=lost.index).set_index(["trial_id", "step"])
    killed_write = out / ".results.parquet.0a1b2c3d.tmp"  # what a write killed outright leaves
    killed_write.write_bytes(b"PAR1")
    again = run([study, "--no-report"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not killed_write.exists()
    assert "3 already finished" in again.stdout
    assert "also holds 1 trial(s) that" in again.stderr and "no longer defines" in again.stderr
    assert (load_results(out).trial_id == "DiT-P-2-0123456789").sum() == 1
    df2 = load_results(out).set_index(["trial_id", "step"])
    assert df2.loc[kept.index].timestamp.equals(kept.timestamp)  # nothing measured twice
    back = df2.loc[(lost.trial_id.iloc[0], 20)]
    assert back.status == "ok" and back.mlflow_run_id == lost.mlflow_run_id.iloc[0]
    # Its timings are the re-run's: it restored its last checkpoint and trained no step (no start-up to a
    # first step), and its slot was freed after it.
    assert pd.isna(back.startup_s) and back.teardown_s >= 0 and back.teardown_s != lost.teardown_s.iloc[0]
    assert df2.loc[kept.index].startup_s.equals(kept.startup_s)
    # The same weights (the checkpoint's EMA) and the same sampling seed: the same measurement.
    assert back.val_loss == pytest.approx(lost.val_loss.iloc[0], rel=1e-6)
    assert back.fid == pytest.approx(lost.fid.iloc[0], rel=1e-3)
    client, parents, children = mlflow_runs(out)
    assert len(children) == 4
    # Each driver run's wall time and efficiency at a step of its own, the first run's kept.
    assert [m.step for m in client.get_metric_history(parents[0].info.run_id, "wall_time_s")] == [0, 1]

    # A driver that ended while its tracking server was away leaves its runs open: the replay
    # closes the finished ones, with the status the driver gives them.
    ended = {r.info.run_id: r.info.status for r in parents + children}
    assert sorted(ended.values()) == ["FAILED", "FAILED", "FINISHED", "FINISHED", "FINISHED"]
    for run_id in ended:
        client.update_run(run_id, "RUNNING")
    assert replay_main([str(out)]) == 0
    assert {run_id: client.get_run(run_id).info.status for run_id in ended} == ended

    # A store that lost everything (a new, empty tracking server): the replay rebuilds the runs from Parquet, the
    # trials' overhead too (the first start-up and the last teardown Parquet holds).
    (out / "mlflow.db").rename(tmp_path / "lost-mlflow.db")
    assert replay_main([str(out)]) == 0
    final = load_results(out).sort_values("step")
    client, parents, children = mlflow_runs(out)
    assert len(children) == 5  # the four trials and the earlier study file's one
    for child in children:
        rows = final[final.trial_id == child.data.tags["dit_scaling.trial_id"]]
        for key, pick in (("startup_s", 0), ("teardown_s", -1)):
            measured = rows[key].dropna()
            assert (child.data.metrics.get(key) == pytest.approx(measured.iloc[pick])) if len(measured) \
                else key not in child.data.metrics
    restored = [c for c in children if c.data.tags["dit_scaling.trial_id"] == lost.trial_id.iloc[0]][0]
    assert restored.data.metrics["teardown_s"] == pytest.approx(back.teardown_s)  # the re-run's, not the first run's

    # The study run again logging to another store (a tracking server now): its finished trials are skipped, and
    # were missing from that store for good. They are brought there from Parquet, and their rows name those runs.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    moved = run([study, "--no-report", "--set", f"tracking.mlflow_uri={other}"])
    assert moved.returncode == 0, moved.stdout[-3000:] + moved.stderr[-3000:]
    assert f"was tracked in MLflow at sqlite:///{out / 'mlflow.db'} when it last ran; this run logs to {other}" \
        in " ".join(moved.stderr.split())
    client = MlflowClient(other)
    children = [r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
                if "mlflow.parentRunId" in r.data.tags]
    assert sorted(c.info.status for c in children) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    ours = load_results(out).query("trial_id != 'DiT-P-2-0123456789'")
    assert set(ours.mlflow_run_id) == {c.info.run_id for c in children}
    for child in children:
        if child.info.status == "FINISHED":
            assert [m.step for m in client.get_metric_history(child.info.run_id, "fid")] == [10, 20]
    # The output folder moved elsewhere, run again on the same store: the study's run is found by the folder it ran
    # in (the MLflow UI shows one study, not two).
    out.rename(tmp_path / "moved")
    again = run([study, "--no-report", "--set", f"tracking.mlflow_uri={other}", "--set", f"output={tmp_path / 'moved'}"])
    assert again.returncode == 0 and "was tracked in MLflow" not in again.stderr, again.stderr[-3000:]
    parents = [r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
               if "mlflow.parentRunId" not in r.data.tags]
    assert [p.data.tags["dit_scaling.output"] for p in parents] == [str(tmp_path / "moved")]
    # Its artifacts are found where they are now, and new ones go there, not into the folder it left.
    assert not (tmp_path / "out").exists()
    for p in parents:
        assert p.info.artifact_uri.startswith((tmp_path / "moved" / "mlartifacts").as_uri() + "/")
        assert "study.yaml" in {a.path for a in client.list_artifacts(p.info.run_id)}


def test_the_store_a_study_logged_to_last_moves_with_its_output(tmp_path):
    from scaling.run import earlier_run, output_moved, same_store

    ran_in, now = tmp_path / "ran", tmp_path / "moved"
    now.mkdir()
    assert earlier_run(now) is None  # never ran here
    (now / "study.yaml").write_text(f"output: {ran_in}\ntracking: {{mlflow_uri: 'sqlite:///{ran_in}/mlflow.db'}}\n")
    assert earlier_run(now) == (f"sqlite:///{now / 'mlflow.db'}", str(ran_in))  # the folder moved, its store with it
    (now / "study.yaml").write_text(f"output: {ran_in}\ntracking: {{mlflow_uri: 'http://mlflow:5000'}}\n")
    assert earlier_run(now) == ("http://mlflow:5000", str(ran_in))
    (now / "study.yaml").write_text("output: [\n")  # not YAML: nothing to compare with
    assert earlier_run(now) is None
    assert same_store(f"sqlite:///{now}/../moved/mlflow.db", f"sqlite:///{now / 'mlflow.db'}")
    # Whether its MLflow runs go with it: a copy that logs to a store outside it leaves them to the original.
    own, server = f"sqlite:///{now / 'mlflow.db'}", "http://mlflow:5000"
    assert not output_moved(now, None, own) and not output_moved(now, str(now), own)  # new, or where it ran
    assert output_moved(now, str(ran_in), server)  # the folder it ran in is gone: moved
    ran_in.mkdir()
    assert not output_moved(now, str(ran_in), server)  # copied: the original keeps its runs
    assert output_moved(now, str(ran_in), own)  # copied with its own store
    assert same_store("http://mlflow:5000/", "http://mlflow:5000")
    # A query is the connection's, not the file's: one store (the checks on its file found none there).
    assert same_store(f"sqlite:///{now / 'mlflow.db'}?timeout=30", f"sqlite:///{now / 'mlflow.db'}")
    assert not same_store("http://mlflow:5000", f"sqlite:///{now / 'mlflow.db'}")


def test_stopped_or_killed_driver_resumes_without_duplicates(tmp_path):
    # One trial at a time, five milestones each: the driver is stopped by Ctrl-C, then killed a little
    # further on; the third run finishes the study. (SIGTERM takes Ctrl-C's path: test_sigterm_...)
    steps = (40, 80, 120, 160, 200)
    study, out = write_study(tmp_path, steps=steps, fid=False,
                             extra="resources: {workers_per_trial: 1, cpus_per_worker: 1, max_concurrent_trials: 1}\n")
    study.write_text(study.read_text().replace("resources: {workers_per_trial: 1, cpus_per_worker: 1}\n", "", 1))
    report = tmp_path / "report"

    def start_until_more_rows(than, log):
        """A driver in its own process group (as a terminal runs it), once a new milestone is on disk."""
        proc = subprocess.Popen([sys.executable, "-m", "scaling.run", str(study), "--report-dir", str(report)],
                                cwd=REPO, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if (out / "results.parquet").exists() and len(load_results(out)) > than:
                return proc
            time.sleep(0.5)
        proc.kill()
        pytest.fail(f"no new milestone within 300 s:\n{log.name}")

    def statuses():
        _, parents, children = mlflow_runs(out)
        return parents[0].info.status, sorted(c.info.status for c in children)

    # Ctrl-C reaches the driver's whole process group: Tune ends the trial, the driver records what
    # was measured, closes the runs as KILLED and exits 130, with no report of an unfinished study.
    log_path = tmp_path / "driver-stopped.log"
    with open(log_path, "w") as log:
        proc = start_until_more_rows(0, log)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log_path.read_text()[-3000:]
    wait_until_group_gone(proc.pid, timeout=10)
    text = log_path.read_text()
    assert "Run the same command again to resume them" in text and "Traceback" not in text, text[-3000:]
    assert "Tuner.restore" not in text  # Tune's own advice does not apply to a study
    assert not report.exists()
    rows = load_results(out)
    assert (rows.status == "ok").all()
    seen = len(rows)
    assert 1 <= seen < 2 * len(steps) - 1
    parent, children = statuses()
    assert parent == "KILLED" and "RUNNING" not in children
    if seen < len(steps):  # one trial at a time: the first was running, the second never started
        assert children == ["KILLED", "SCHEDULED"]

    # SIGKILL: nothing runs after it; its runs stay as they were.
    with open(tmp_path / "driver-killed.log", "w") as log:
        proc = start_until_more_rows(seen, log)
    proc.kill()  # the driver alone: Ray's reaper in its process group then stops the Ray it started
    proc.wait()
    # The trial's processes are gone within seconds; Ray's dashboard and runtime-env agents take a
    # minute to notice, and are killed after 10 s (they write nothing the re-run reads).
    wait_until_group_gone(proc.pid, timeout=10)
    partial = load_results(out)
    assert seen < len(partial) < 2 * len(steps)
    # Every trial's run exists from the start.
    assert statuses()[0] == "RUNNING" and len(statuses()[1]) == 2

    # The third run finishes the study and is sent SIGTERM while it builds the report (outside Tune's
    # loop, where ray.init's own handler would exit 15): exit 143, the advice to run again, no report.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scaling.run", str(study), "--report-dir", str(report)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("finished in "):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, "".join(lines[-40:])
    text = "".join(lines)
    assert "run the same command again" in text and "Traceback" not in text, text[-3000:]
    assert not report.exists()
    df = load_results(out)
    assert sorted(zip(df.patch, df.step)) == [(p, s) for p in (2, 4) for s in steps]
    # What was measured before each stop is kept, not measured again: same timestamps, same MLflow runs.
    before = partial.set_index(["trial_id", "step"])
    after = df.set_index(["trial_id", "step"]).loc[before.index]
    assert after.timestamp.equals(before.timestamp) and after.mlflow_run_id.equals(before.mlflow_run_id)
    _, parents, children = mlflow_runs(out)
    assert len(parents) == 1 and len(children) == 2
    assert statuses() == ("FINISHED", ["FINISHED", "FINISHED"])
    # Metrics continue across the restarts, every logged step once, in MLflow and in Parquet alike: a trial
    # resumed from a checkpoint past its last milestone (ckpt_every 10 < 40) hands on again the logs that the
    # killed driver had received but not yet written.
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    curves = pd.read_parquet(out / "loss_curves.parquet")
    every_log = list(range(5, steps[-1] + 1, 5))
    for child in children:
        history = client.get_metric_history(child.info.run_id, "train_loss")
        assert [m.step for m in history] == every_log
        trial_curve = curves[curves.trial_id == child.data.tags["dit_scaling.trial_id"]].sort_values("step")
        assert list(trial_curve.step) == every_log and list(trial_curve.train_loss) == [m.value for m in history]


def test_steps_added_to_a_study_train_on_from_its_finished_trial(tmp_path, capsys):
    # sweep.steps 10, 20 grown to 10, 20, 30 under the constant lr: the trial goes on from its checkpoint at 20
    # under its id, with its rows and MLflow run, and measures at 30 what a straight run to 30 measures.
    study, out = write_study(tmp_path, fid=False, patches=(2,))
    first = run([study, "--no-report"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = load_results(out)
    (trial_id,) = set(before.trial_id)
    grids = out / "trials" / trial_id / "samples"
    drawn = {p.name: p.stat().st_mtime_ns for p in grids.iterdir()}
    assert sorted(drawn) == ["step-000000010.png", "step-000000020.png"]
    study.write_text(study.read_text().replace("steps: [10, 20]", "steps: [10, 20, 30]"))
    grown = run([study, "--report-dir", tmp_path / "report"])
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    assert f"DiT-P/2: continues recorded trial {trial_id} (steps 10, 20 measured, checkpoint at step 20)" \
           in grown.stdout and "no longer defines" not in grown.stderr
    df = load_results(out).set_index("step")
    assert set(df.trial_id) == {trial_id} and list(df.index) == [10, 20, 30] and (df.status == "ok").all()
    assert df.loc[[10, 20]].timestamp.equals(before.set_index("step").timestamp)  # kept, not measured again
    # Resumed at 20, not retrained from 0 (which would draw the grids of 10 and 20 again).
    assert {p.name: p.stat().st_mtime_ns for p in grids.iterdir() if p.name in drawn} == drawn
    assert (grids / "step-000000030.png").exists()
    assert (df.max_step == 30).all() and all(json.loads(c)["milestones"] == [10, 20, 30] for c in df.config_json)
    assert "| 30 / 30 |" in (tmp_path / "report" / "report.md").read_text()
    client, _, children = mlflow_runs(out)
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert children[0].data.params["train.max_steps"] == "20" and children[0].data.tags["dit_scaling.max_steps"] == "30"
    history = client.get_metric_history(children[0].info.run_id, "train_loss")
    curves = pd.read_parquet(out / "loss_curves.parquet").sort_values("step")
    assert [m.step for m in history] == list(curves.step) == [5, 10, 15, 20, 25, 30]
    # A replay knows the trial under the id it continued: it closes the runs the driver left open (a server away at
    # the end) as the driver would, the study's too, and makes no second run.
    _, parents, _ = mlflow_runs(out)
    for run_id in (parents[0].info.run_id, children[0].info.run_id):
        client.update_run(run_id, "RUNNING")
    assert replay_main([str(out)]) == 0
    _, parents, children = mlflow_runs(out)
    assert [r.info.status for r in parents + children] == ["FINISHED", "FINISHED"]

    # The same trial trained straight to 30 in one process: the same losses at 30, bit for bit.
    from core.train import train
    from scaling.ray_trial import train_config

    (trial,) = (t for t in load_study(study).trials if t.train["max_steps"] == 30)
    metrics = train(train_config(trial.to_dict()), tmp_path / "straight", trial.milestones)
    assert (metrics["val_loss"], metrics["train_loss"]) == (df.loc[30].val_loss, df.loc[30].train_loss)

    # Run again: the continued trial is finished.
    capsys.readouterr()
    assert scaling_run.main([str(study), "--dry-run"]) == 0  # in this process: a second would mostly import
    again = capsys.readouterr()
    assert "All 1 trials already finished" in again.out, again.out + again.err

    # A milestone without a row before the checkpoint the trial resumes from (its row removed by hand) can no
    # longer be measured: the trial fails once, saying so, rather than resuming past it at every run of the study.
    study.write_text(study.read_text().replace("steps: [10, 20, 30]", "steps: [10, 20]"))
    write_table(load_results(out).query("step != 10"), out / "results.parquet", RESULTS_SCHEMA)
    passed = (f"trial {trial_id}'s checkpoint at step 30 is past milestone(s) 10 without a result, which it can no "
              f"longer measure: drop those steps from sweep.steps, or delete {out / 'ray' / ('train-' + trial_id)} "
              f"to train it again from step 0")
    assert scaling_run.main([str(study), "--dry-run"]) == 0  # the plan says so too: it planned the resume as any other
    planned = capsys.readouterr().err
    resumes = "it fails if it resumes from that checkpoint (Ray's latest registered one)"
    assert f"warning: {passed}; {resumes}" in planned, planned
    lost = run([study, "--no-report"])
    assert lost.returncode == 1, lost.stdout[-3000:] + lost.stderr[-3000:]
    assert f"warning: {passed}; {resumes}" in lost.stderr
    failed = load_results(out).query("status == 'failed'")
    assert len(failed) == 1 and failed.error.iloc[0].startswith(f"resumed: {passed}")


def test_sigterm_stops_the_study_as_ctrl_c_does():
    # While Tune runs, its SIGINT handler ends the trials cleanly; SIGTERM must reach that handler. Tune installs
    # it inside fit() and leaves it installed when no signal came: the block puts back the one before.
    tune_handler = []
    outside = signal.getsignal(signal.SIGTERM)  # Python's default, or ray.init's if this process called it
    before = signal.getsignal(signal.SIGINT)
    with scaling_run.sigterm_stops_the_study() as stopped_by:
        signal.signal(signal.SIGINT, lambda signum, frame: tune_handler.append(signum))  # as Tune's fit() does
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not tune_handler and time.time() < deadline:
            time.sleep(0.01)  # Python runs signal handlers between bytecodes of the main thread
    assert stopped_by == [signal.SIGTERM] and tune_handler == [signal.SIGINT]
    assert scaling_run.EXIT_INTERRUPTED[stopped_by[0]] == 143
    assert signal.getsignal(signal.SIGTERM) == outside  # outside Tune, SIGTERM ends the driver as before
    assert signal.getsignal(signal.SIGINT) == before  # and Ctrl-C during the report interrupts the driver
    # SIGTERM in the block before Tune's handler is in place (its set-up): the driver unwinds, exit 143.
    with pytest.raises(scaling_run.Terminated), scaling_run.sigterm_stops_the_study():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGINT) == before


def test_sigterm_outside_tune_unwinds_as_ctrl_c_does():
    # After ray.init (whose handler exits 15) SIGTERM raises Terminated, a KeyboardInterrupt, and the
    # driver exits 143; inside Tune's loop it still goes to Tune. Both handlers are undone on leaving.
    def wait_for_signal(handled=lambda: False):
        deadline = time.time() + 5
        while not handled() and time.time() < deadline:
            time.sleep(0.01)  # Python runs signal handlers between bytecodes of the main thread

    outside = signal.getsignal(signal.SIGTERM)
    tune_handler = []
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(scaling_run.Terminated), scaling_run.sigterm_interrupts():
        with scaling_run.sigterm_stops_the_study() as stopped_by:
            signal.signal(signal.SIGINT, lambda signum, frame: tune_handler.append(signum))  # as Tune's fit()
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for_signal(lambda: tune_handler)
        assert stopped_by == [signal.SIGTERM] and tune_handler == [signal.SIGINT]
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for_signal()
    assert signal.getsignal(signal.SIGINT) == before
    assert issubclass(scaling_run.Terminated, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) == outside


def test_workers_import_the_trainer_without_mlflow():
    # DeepSpeed imports MLflow when it can (seconds of every trial's start-up); workers never log to it.
    code = ("import sys; from scaling.ray_trial import _import_core_train; _import_core_train(); "
            "print(sorted(m for m in ('deepspeed', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['deepspeed']"


def test_bad_study_exits_2_and_writes_nothing(tmp_path):
    study, out = write_study(tmp_path)
    study.write_text(study.read_text().replace("lr: 1.0e-3", "lr: fast"))
    proc = run([study])
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "tiny.yaml:4" in proc.stderr
    assert not out.exists()


def test_dry_run_launches_nothing(tmp_path):
    study, out = write_study(tmp_path)
    proc = run([study, "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "DiT-P/2" in proc.stdout and "DiT-P/4" in proc.stdout and "total: 2 trials" in proc.stdout
    assert not out.exists()


def test_unreachable_address_exits_2(tmp_path):
    study, out = write_study(tmp_path)
    proc = run([study, "--address", "127.0.0.1:1"], timeout=60)
    assert proc.returncode == 2 and "--address 127.0.0.1:1: cannot reach a Ray cluster" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("scheme", ["", "http://"])
def test_an_address_where_an_http_server_answers_exits_2_at_once(tmp_path, scheme, capsys):
    # The dashboard's port (8265), which `ray job submit` takes: ray.init waited minutes on it, or (http://) raised
    # a ValueError, exit 1 with a traceback. Refused before Ray starts: run in this process.
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    study, out = write_study(tmp_path)
    address = f"{scheme}127.0.0.1:{server.server_address[1]}"
    try:
        assert scaling_run.main([str(study), "--address", address]) == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    expected = "an HTTP address" if scheme else "a server answers there that is not a Ray cluster's GCS"
    assert err.splitlines()[-1].startswith(f"error: --address {address}: {expected}"), err[-3000:]
    assert not out.exists()


def test_address_auto_with_no_cluster_running_exits_2(tmp_path, capsys, monkeypatch):
    # ray.init's ConnectionError went up as a traceback, exit 1 (the code for failed trials). "auto" takes any Ray
    # running on the machine (its GCS processes), another test's too: those are hidden, as on a machine where none runs
    # (this test's Ray temp folder records no `ray start` either). It waited for a moment with no other test's Ray.
    import ray._private.services as services

    def no_gcs_here():
        return []

    no_gcs_here.cache_clear = lambda: None  # as Ray's own, which ray.init clears
    monkeypatch.setattr(services, "find_gcs_addresses", no_gcs_here)
    study, out = write_study(tmp_path)
    assert scaling_run.main([str(study), "--address", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: --address auto: Could not find any running Ray instance"), err
    assert not out.exists()


def test_an_empty_address_is_refused_not_read_as_none(tmp_path):
    # `--address "$HEAD"` with HEAD unset ran the study on a local Ray (of the login node, say).
    study, out = write_study(tmp_path)
    proc = run([study, "--address", ""], timeout=120)
    assert proc.returncode == 2 and proc.stderr == ("error: --address is empty; give the head node's HOST:PORT or "
                                                    "auto, or leave the flag out for a local Ray of the study's own\n")
    assert not out.exists()


def test_an_address_from_ray_address_is_named_as_such():
    with pytest.raises(StudyError, match=r"^RAY_ADDRESS ray-head: expected HOST:PORT"):
        scaling_run.check_reachable("ray-head", "RAY_ADDRESS")


@pytest.mark.parametrize("address", ["ray-head", "ray-head:", "bogus:port"])
def test_an_address_without_a_port_is_named(address):
    # Read as a port, the host name gave Python's "invalid literal for int() with base 10: 'ray-head'".
    with pytest.raises(StudyError, match=rf"^--address {re.escape(address)}: expected HOST:PORT \(the head node's, "
                                         r"6379 unless its `ray start --head --port` says otherwise\) or auto$"):
        scaling_run.check_reachable(address)


@pytest.mark.parametrize("port", ["0", "65536", "999999999999999999999"])
def test_an_address_with_a_port_out_of_range_is_named(port):
    # The longest gave getaddrinfo's OverflowError as a traceback.
    with pytest.raises(StudyError, match=f"^--address ray-head:{port}: port {port} is out of range \\(1-65535\\)$"):
        scaling_run.check_reachable(f"ray-head:{port}")


def test_the_printed_mlflow_ui_command_runs(tmp_path, monkeypatch):
    import shlex

    uri = f"sqlite:///{tmp_path}/a study/mlflow.db"
    monkeypatch.chdir(REPO)
    argv = shlex.split(scaling_run.mlflow_ui_command(uri))
    assert argv[1:] == ["ui", "--backend-store-uri", uri]
    # The venv's own mlflow, named so that it runs without activating the venv (`make run` does not).
    assert (REPO / argv[0]).resolve() == (Path(sys.executable).parent / "mlflow").resolve()
    assert subprocess.run([REPO / argv[0], "--version"], capture_output=True, timeout=120).returncode == 0


def test_sigterm_while_ray_starts_unwinds_as_ctrl_c_does():
    # ray.init sets its own SIGTERM handler as it starts, seconds before it returns, which exits with status 15 (no
    # shell or batch scheduler reads that as terminated): the driver's start of Ray takes it as a stop (143).
    code = textwrap.dedent("""\
        import os, signal, sys, threading, time
        import ray
        from scaling.sigterm import Terminated, ray_exit_as_terminated
        try:
            with ray_exit_as_terminated():
                threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
                ray.init(num_cpus=1, include_dashboard=False)
                time.sleep(60)  # a machine quicker than the timer: ray.init's handler is still in place here
        except Terminated:
            print("terminated", signal.getsignal(signal.SIGTERM).__module__)
            sys.exit(143)
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143 and proc.stdout == "terminated ray._private.worker\n", proc.stdout + proc.stderr[-2000:]


def test_a_stop_while_the_trials_runs_are_made_ends_the_studys_run(tmp_path, empty_store, monkeypatch):
    # The tracker marks the study's run RUNNING as it opens it; a Ctrl-C or SIGTERM in the MLflow calls made for every
    # trial before the sweep (their runs, a killed driver's runs caught up) left it RUNNING until the next run.
    from scaling.recorder import Recorder

    path, out = write_study(tmp_path)
    out.mkdir()
    shutil.copyfile(empty_store, out / "mlflow.db")
    study = load_study(path)

    def interrupted(self, *args):
        raise scaling_run.Terminated()

    monkeypatch.setattr(Recorder, "catch_up_runs", interrupted)
    with pytest.raises(scaling_run.Terminated):
        capacity = scaling_run.Capacity({"CPU": 2.0}, [{"CPU": 2.0}], [1])
        scaling_run._run_trials(study, False, None, time.time(), capacity)
    client, parents, children = mlflow_runs(out)
    assert [p.info.status for p in parents] == ["KILLED"] and len(children) == 2
    assert {c.info.status for c in children} == {"SCHEDULED"}  # made, never started


def test_a_driver_that_fails_shuts_its_ray_down_before_it_frees_the_output(tmp_path, monkeypatch):
    # A second Ctrl-C or a driver's error left Ray up (its trials' workers saving checkpoints) until the interpreter's
    # exit, with the output's lock already free: a driver started meanwhile met them.
    import ray

    path, out = write_study(tmp_path)
    order = []

    def fails(*args):
        raise RuntimeError("the driver failed")

    shutdown = ray.shutdown
    monkeypatch.setattr(scaling_run, "_run_trials", fails)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: order.append(("shutdown", free(out))) or shutdown(*a, **k))

    def free(out):
        held = scaling_run.lock_output(out)
        if held is not None:
            os.close(held)
        return held is not None

    with pytest.raises(RuntimeError, match="the driver failed"):
        scaling_run.run_study(load_study(path), None, build_report=False)
    assert order[:1] == [("shutdown", False)] and not ray.is_initialized() and free(out)


def test_the_study_logged_to_mlflow_shows_no_password(tmp_path, monkeypatch):
    # MLFLOW_TRACKING_URI's password went into the resolved study, which every reader of the store could open.
    study, out = write_study(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://bob:s3cret@db:5432/mlflow")
    loaded = load_study(study, check_data=False)
    assert "bob:s3cret@db" in loaded.resolved_yaml()  # <output>/study.yaml: the replay logs with it
    shown = scaling_run.shown_study(loaded)
    assert "s3cret" not in shown and "postgresql://bob:***@db:5432/mlflow" in shown
    assert shown == loaded.resolved_yaml().replace("bob:s3cret@", "bob:***@")
    # In a query: the rest of the study, on the lines after it, stays (it was cut off there).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://db/mlflow?user=bob&password=s3cret")
    loaded = load_study(study, check_data=False)
    assert scaling_run.shown_study(loaded) == loaded.resolved_yaml().replace("password=s3cret", "password=***")


def test_a_study_started_afresh_in_a_deleted_output_gets_runs_of_its_own(tmp_path, empty_store, monkeypatch):
    # A store outside the output kept the deleted output's runs, found again by its path: the fresh trials' first
    # loss points (up to the old runs' last step) never reached MLflow, and each milestone got a second value.
    from scaling.recorder import Recorder

    shutil.copyfile(empty_store, tmp_path / "store.db")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    path, out = write_study(tmp_path, extra=f"tracking: {{mlflow_uri: '{uri}'}}\n")
    study = load_study(path)

    def interrupted(self, *args):
        raise scaling_run.Terminated()

    monkeypatch.setattr(Recorder, "catch_up_runs", interrupted)
    capacity = scaling_run.Capacity({"CPU": 2.0}, [{"CPU": 2.0}], [1])
    client = MlflowClient(uri)

    def study_runs():
        runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                  order_by=["attributes.start_time ASC"])
        return [r for r in runs if r.data.tags.get("dit_scaling.role") == "study"], runs

    for attempt in range(3):
        out.mkdir(exist_ok=True)
        with pytest.raises(scaling_run.Terminated):
            scaling_run._run_trials(study, False, None, time.time(), capacity)
        if attempt == 0:
            shutil.rmtree(out)  # deleted: the next run starts the study afresh
    parents, runs = study_runs()
    assert len(parents) == 2 and len(runs) == 2 + 2 * 2  # the deleted output's runs, and the fresh one's, found again
    assert {p.data.tags["dit_scaling.output"] for p in parents} == {str(out)}
    newest = parents[-1].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == newest]
    assert len(children) == 2


def finished_study(tmp_path, empty_store):
    """(study, output) of the tiny study without FID whose every milestone has its row, and an MLflow store."""
    from test_results import row

    path, out = write_study(tmp_path, fid=False)
    study = load_study(path)
    out.mkdir()
    shutil.copyfile(empty_store, out / "mlflow.db")
    write_table([row(study="tiny", trial_id=t.trial_id, model=t.model, patch=t.patch, step=step)
                 for t in study.trials for step in t.milestones], out / "results.parquet", RESULTS_SCHEMA)
    return study, out


def test_a_finished_study_run_again_starts_no_ray(tmp_path, empty_store, monkeypatch, capsys):
    # Every trial finished: the run catches MLflow up and builds the report; a Ray started for it (seconds here, a
    # cluster reached on a real one) did nothing.
    import ray

    study, out = finished_study(tmp_path, empty_store)

    def refused(*args, **kwargs):
        raise AssertionError("Ray started for a finished study")

    monkeypatch.setattr(ray, "init", refused)
    assert scaling_run.run_study(study, None, build_report=False) == scaling_run.EXIT_OK
    assert "study tiny: 2 trials, 2 already finished" in capsys.readouterr().out
    assert [p.info.status for p in mlflow_runs(out)[1]] == ["FINISHED"]  # the study's run of this driver
    # A cluster named is still reached: an address where none answers is refused, finished study or not.
    def no_cluster(*args, **kwargs):
        raise ConnectionError("no cluster")

    monkeypatch.setattr(ray, "init", no_cluster)
    assert scaling_run.run_study(study, "auto", build_report=False) == scaling_run.EXIT_BAD_INPUT
    assert "error: --address auto: no cluster" in capsys.readouterr().err


@pytest.mark.parametrize("address", ["ray://ray-head:10001", "RAY://127.0.0.1:1"])
def test_a_ray_client_address_is_refused(tmp_path, address, capsys):
    # ray.init connects to any SCHEME://... through Ray Client, under which Tune runs on the cluster and the driver's
    # recorder never sees a trial; the scheme was dropped and the rest checked as a GCS's HOST:PORT.
    scheme = address.split("://")[0]
    message = (f"--address {address}: Ray Client ({scheme}://) is not supported: under it Tune runs on the cluster, "
               "and the driver's recorder (Parquet, MLflow) would see none of the trials; give the head node's GCS "
               "address HOST:PORT (6379 unless its `ray start --head --port` says otherwise), or submit the driver "
               "with `ray job submit`")
    with pytest.raises(StudyError) as refused:
        scaling_run.check_reachable(address)
    assert str(refused.value) == message
    study, out = write_study(tmp_path)
    assert scaling_run.main([str(study), "--address", address]) == scaling_run.EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {message}"
    assert not out.exists()


def test_a_stop_before_launch_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    # A Ctrl-C while the study file loaded, the checks ran or a dry run planned went up as a traceback.
    import scaling.dry_run

    study, out = write_study(tmp_path)
    advice = "interrupted; run the same command again to resume the study\n"

    def stopped(error):
        def stop(*args, **kwargs):
            raise error
        return stop

    def main(argv):
        try:
            return scaling_run.main(argv)
        except KeyboardInterrupt as e:  # not to pytest, which would take it for the user's and stop the session
            pytest.fail(f"{type(e).__name__} went up through main")

    for where, error, status in (("load_study", KeyboardInterrupt(), 130),
                                 ("load_study", scaling_run.Terminated(), 143),
                                 ("check_output", KeyboardInterrupt(), 130)):
        with monkeypatch.context() as m:
            m.setattr(scaling_run, where, stopped(error))
            assert main([str(study)]) == status
        assert capsys.readouterr().err == advice
    monkeypatch.setattr(scaling.dry_run, "format_plan", stopped(KeyboardInterrupt()))
    assert main([str(study), "--dry-run"]) == 130
    assert capsys.readouterr().err == "interrupted\n"  # a dry run launches nothing: nothing to resume
    assert not out.exists()


def test_sigterm_while_the_study_file_loads_exits_143(tmp_path):
    # Python's default SIGTERM ended the driver at once (a shell reads -15), with no word.
    study, out = write_study(tmp_path)
    code = textwrap.dedent(f"""\
        import os, signal, sys, time
        from scaling import run
        def load_study(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        run.load_study = load_study
        sys.exit(run.main([{str(study)!r}]))
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (143, "interrupted; run the same command again to resume the study\n")


def test_a_second_driver_of_a_running_study_is_refused_before_its_checks(tmp_path, monkeypatch, capsys):
    # The lock was taken only after every check before launch: a second driver first hashed FID's reference folder,
    # read checkpoints and could warn of what the running driver was doing, then exited 2.
    study, out = write_study(tmp_path)
    out.mkdir()
    held = scaling_run.lock_output(out)
    try:
        for check in ("check_results", "check_output", "check_fid_basis", "passed_milestones", "run_study"):
            monkeypatch.setattr(scaling_run, check, lambda *a, **k: pytest.fail("checked an output in use"))
        assert scaling_run.main([str(study)]) == scaling_run.EXIT_BAD_INPUT
        assert capsys.readouterr().err == (f"error: {study}:7: output: {out} is in use by another scaling.run of this "
                                           "study (its driver still runs) or a scaling.replay_mlflow of it; wait for "
                                           "it to end or stop it first\n")
    finally:
        os.close(held)
    assert sorted(p.name for p in out.iterdir()) == [scaling_run.OUTPUT_LOCK]
    # Free (its driver gone), the lock file stays free: the probe is let go at once.
    monkeypatch.setattr(scaling_run, "run_study", lambda *a, **k: "ran")
    monkeypatch.setattr(scaling_run, "check_results", lambda *a, **k: None)
    for check in ("check_output", "passed_milestones", "check_fid_basis"):
        monkeypatch.setattr(scaling_run, check, lambda *a, **k: [])
    assert scaling_run.main([str(study), "--no-report"]) == "ran"
    free = scaling_run.lock_output(out)
    assert free is not None
    os.close(free)


@pytest.mark.parametrize("flag", [True, False])
def test_address_local_is_a_local_ray_of_the_studys_own(tmp_path, monkeypatch, flag):
    # Ray's "local" was taken for a cluster's address: no local Ray options (the CPUs of the affinity, the dashboard
    # on 127.0.0.1), the cluster's checks, and a finished study started Ray.
    study, out = write_study(tmp_path)
    given = []
    monkeypatch.setattr(scaling_run, "run_study", lambda study, address, **kwargs: given.append(address) or 0)
    if flag:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", "local")
    assert scaling_run.main([str(study), "--no-report"] + (["--address", "local"] if flag else [])) == 0
    assert given == [None]


def test_a_finished_study_on_a_cluster_is_not_checked_for_room(tmp_path, empty_store, monkeypatch, capsys):
    # Nothing trains: a cluster shrunk since (or whose nodes no longer see the output) refused the run, exit 2.
    import ray

    study, out = finished_study(tmp_path, empty_store)
    reached = []
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: reached.append(kwargs.get("address")))
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(reached))
    monkeypatch.setattr(ray, "shutdown", lambda: None)

    def refused(*args, **kwargs):
        raise StudyError("the cluster holds no trial")

    monkeypatch.setattr(scaling_run, "check_capacity", refused)
    monkeypatch.setattr(scaling_run, "check_shared_storage", refused)
    assert scaling_run.run_study(study, "ray-head:6379", build_report=False) == scaling_run.EXIT_OK, capsys.readouterr()
    assert reached == ["ray-head:6379"]  # reached all the same: an address that answers none is refused
    assert "study tiny: 2 trials, 2 already finished" in capsys.readouterr().out


def test_sigterm_as_ray_shuts_down_exits_143(tmp_path, monkeypatch, capsys):
    # ray.init's own SIGTERM handler (sys.exit(15)) outlived it: a SIGTERM as the driver shut Ray down at the study's
    # end exited 15.
    import ray

    study, out = write_study(tmp_path)
    outside = signal.getsignal(signal.SIGTERM)
    up = []

    def init(*args, **kwargs):  # as ray.init: its handler set as it starts
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        up.append(True)

    def shutdown():
        up.clear()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # Python runs the handler between bytecodes of the main thread

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(up))
    monkeypatch.setattr(ray, "shutdown", shutdown)
    monkeypatch.setattr(scaling_run, "check_capacity", lambda *a, **k: None)
    monkeypatch.setattr(scaling_run, "_run_trials", lambda *a, **k: scaling_run.EXIT_OK)
    try:
        assert scaling_run.main([str(study), "--no-report"]) == 143
    finally:
        signal.signal(signal.SIGTERM, outside)
    assert capsys.readouterr().err.endswith("interrupted; run the same command again to resume the study\n")


def test_a_report_that_crashes_is_one_line_and_a_failure_of_the_study(tmp_path, monkeypatch, capsys):
    # Only ValueError and OSError were caught: any other error of the report's went up as a traceback, without the
    # command that builds it later.
    import scaling.report

    out = tmp_path / "out"

    def crashes(*args, **kwargs):
        raise RuntimeError("a figure failed")

    monkeypatch.setattr(scaling.report, "build_report", crashes)
    assert scaling_run.report_after_study(out, tmp_path / "r") is False
    assert capsys.readouterr().err == (f"error: no report: RuntimeError: a figure failed; the results are in "
                                       f"{out / 'results.parquet'}: build it with python -m scaling.report {out} "
                                       "--out DIR\n")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt()

    monkeypatch.setattr(scaling.report, "build_report", stopped)
    with pytest.raises(KeyboardInterrupt):
        scaling_run.report_after_study(out, tmp_path / "r")


def test_the_default_report_folder_keeps_another_outputs_report(tmp_path, monkeypatch, capsys):
    # `--set output=B` on the same study file has the same default folder, reports/<name>: B's report replaced A's.
    study, out = write_study(tmp_path)
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "reports" / "tiny"
    report.mkdir(parents=True)
    (report / "index.html").write_text("<html></html>")
    earlier = {"study": "tiny", "fits": {}, "results": str(tmp_path / "a" / "results.parquet")}
    (report / "fits.json").write_text(json.dumps(earlier))
    loaded = load_study(study, check_data=False)
    with pytest.raises(StudyError) as refused:
        scaling_run.check_report_dir(loaded, None)
    assert str(refused.value) == (f"the report folder reports/tiny: holds the report of the output {tmp_path / 'a'}; "
                                  f"this one is of the output {out}: give --report-dir DIR for it, or delete "
                                  "reports/tiny to replace that report")
    assert scaling_run.main([str(study)]) == scaling_run.EXIT_BAD_INPUT
    assert capsys.readouterr().err == f"error: {refused.value}\n"
    assert scaling_run.check_report_dir(loaded, "reports/tiny") == Path("reports/tiny")  # named: replaced
    # Its own output's report, and one that does not say (written before fits.json recorded it), are replaced.
    (report / "fits.json").write_text(json.dumps({**earlier, "results": str(out / "results.parquet")}))
    assert scaling_run.check_report_dir(loaded, None) == Path("reports/tiny")
    (report / "fits.json").write_text(json.dumps({"study": "tiny", "fits": {}}))
    assert scaling_run.check_report_dir(loaded, None) == Path("reports/tiny")
    assert not out.exists()
