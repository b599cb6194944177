"""`python -m scaling.replay_mlflow OUTPUT` on what it cannot use: one error line, an exit status, nothing made."""
import json
import os
import shutil
import socket
import textwrap

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from scaling.replay_mlflow import main
from scaling.results import RESULTS_SCHEMA, load_results, write_table
from scaling.study import load_study


@pytest.fixture
def out(tmp_path, monkeypatch):
    """A finished one-trial study's output folder as the driver leaves it, less its MLflow store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)  # the tracker sets them for a server: undone after each test
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: tiny
        data: {{dataset: digits}}
        sweep: {{model: [DiT-P], patch: [2], steps: [10, 20]}}
        train: {{batch_size: 32, val_batch: 0, log_every: 5, ckpt_every: 10}}
        eval: {{fid: true, fid_samples: 100, sampler: ddim, sampling_steps: 5}}
        resources: {{workers_per_trial: 1, cpus_per_worker: 1}}
        output: {tmp_path / "out"}
        """))
    study = load_study(path, check_data=False)
    t, out = study.trials[0], study.output
    out.mkdir()
    (out / "study.yaml").write_text(study.resolved_yaml())
    rows = [dict(study="tiny", trial_id=t.trial_id, model=t.model, patch=t.patch, params=t.params, gflops=t.gflops,
                 batch_size=32, step=step, max_step=20, train_compute=t.gflops * 32 * step * 3, train_loss=0.3,
                 fid=100.0 - step, fid_samples=100, feature_extractor="digits", wall_time_s=1.0 * step,
                 images_per_s=300.0, status="ok", config_json=json.dumps(t.to_dict()))
            for step in t.milestones]
    write_table(rows, out / "results.parquet", RESULTS_SCHEMA)
    return out


def snapshot(folder):
    """Every file under folder with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(out, capsys, argv, status=2):
    """Run the replay expecting it to stop: its one error line, the folder checked unchanged."""
    before = snapshot(out.parent)
    assert main([str(out), *argv]) == status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert snapshot(out.parent) == before
    return err.removeprefix("error: ").strip()


def test_a_replay_logs_into_the_studys_store(out, capsys):
    assert main([str(out)]) == 0
    assert "logged 2 missing measurements to MLflow" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    # The trial's run says how it ended, as the driver's would: the replay's had no status tag.
    (trial_run,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert trial_run.data.tags["dit_scaling.status"] == "ok"


def test_a_failed_trial_of_an_earlier_study_file_does_not_fail_the_studys_run(out, capsys):
    # results.parquet keeps the trials of an earlier version of the study file; the driver closes the study's run by
    # this run's trials, and the replay closed it FAILED for an earlier one's failure.
    rows = load_results(out / "results.parquet")
    earlier = rows.iloc[[0]].assign(trial_id="t-of-an-earlier-study-file", status="failed", error="worker died")
    write_table(pd.concat([rows, earlier], ignore_index=True), out / "results.parquet", RESULTS_SCHEMA)
    assert main([str(out)]) == 0
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    (study_run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert study_run.info.status == "FINISHED"


def test_a_trials_curve_before_its_first_milestone_is_replayed_too(out, capsys):
    # Only trials with a row were replayed: a trial stopped before its first milestone kept its logged losses in
    # loss_curves.parquet and never in MLflow.
    from scaling.results import LOSS_CURVES_SCHEMA

    text = (out.parent / "tiny.yaml").read_text().replace("patch: [2]", "patch: [2, 4]")
    (out.parent / "tiny.yaml").write_text(text)
    study = load_study(out.parent / "tiny.yaml", check_data=False)
    (out / "study.yaml").write_text(study.resolved_yaml())
    rowless = next(t for t in study.trials if t.patch == 4)
    assert rowless.trial_id not in set(load_results(out / "results.parquet").trial_id)
    write_table([dict(study="tiny", trial_id=rowless.trial_id, model=rowless.model, step=step, train_loss=1.0 / step,
                      lr=1e-4) for step in (3, 6)], out / "loss_curves.parquet", LOSS_CURVES_SCHEMA)
    assert main([str(out)]) == 0
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
              if r.data.tags.get("dit_scaling.trial_id") == rowless.trial_id]
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(3, 1 / 3), (6, 1 / 6)]
    assert run.data.params["patch"] == "4" and run.info.status == "RUNNING"  # unfinished: left open
    assert main([str(out)]) == 0  # again: nothing twice
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2


def test_a_study_whose_driver_still_runs_is_not_replayed(out, capsys):
    # The driver's queued MLflow calls (a server that was away) would log again what the replay logs.
    from scaling.run import lock_output

    lock = lock_output(out)  # as scaling.run holds it while it runs
    try:
        assert refused(out, capsys, []) == (f"{out} is in use by a running scaling.run of its study, which logs to "
                                            "MLflow itself; replay it after that run ends")
    finally:
        os.close(lock)
    assert main([str(out)]) == 0


def test_a_replay_where_the_storage_cannot_lock_goes_on_saying_so(out, capsys, monkeypatch):
    # Lustre mounted without flock: the driver warns and runs unguarded; the replay went on without a word.
    import errno

    from scaling import replay_mlflow
    from scaling.run import lock_output

    def no_locks(*args, **kwargs):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    os.close(lock_output(out))  # the file a driver leaves
    monkeypatch.setattr(replay_mlflow, "lock_file", no_locks)
    assert main([str(out)]) == 0
    assert (f"warning: cannot lock {out} (No locks available); do not replay it while a run of its study runs"
            in capsys.readouterr().err)


def test_a_run_whose_metrics_cannot_be_read_is_not_logged_again(out, capsys, monkeypatch):
    # A history read that failed once was taken for an empty run: every point it held was logged a second time.
    import requests
    from mlflow.exceptions import MlflowException

    assert main([str(out)]) == 0
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (trial_run,) = [r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
                    if "mlflow.parentRunId" in r.data.tags]
    held = [m.step for m in client.get_metric_history(trial_run.info.run_id, "train_compute")]
    read = MlflowClient.get_metric_history

    def fails_once(self, *args, **kwargs):
        monkeypatch.setattr(MlflowClient, "get_metric_history", read)
        raise MlflowException("read timed out") from requests.Timeout("read timed out")
    monkeypatch.setattr(MlflowClient, "get_metric_history", fails_once)
    assert main([str(out)]) == 1  # a time-out: the store did not answer, run again later
    assert "still does not answer" in capsys.readouterr().err
    assert [m.step for m in client.get_metric_history(trial_run.info.run_id, "train_compute")] == held == [10, 20]
    assert main([str(out)]) == 0  # read again: nothing is missing
    assert "logged 0 missing measurements" in capsys.readouterr().out
    assert [m.step for m in client.get_metric_history(trial_run.info.run_id, "train_compute")] == held


@pytest.mark.parametrize("text, message", [
    ("name: [\n", ":2: not a YAML file: while parsing a flow node, expected the node content, but found "
                   "'<stream end>'"),
    ("- a\n", ":1: the study must be a mapping of sections"),
    ("name: tiny\n", ": sweep: missing (required)"),
    (None, ": no such study file"),
])
def test_a_study_file_that_does_not_read_stops_the_replay_before_mlflow(out, capsys, text, message):
    study = out / "study.yaml"
    if text is None:
        study.unlink()
    else:
        study.write_text(text)
    assert refused(out, capsys, []).startswith(f"{study}{message}")
    assert not (out / "mlflow.db").exists()


def test_a_study_file_without_tracking_replays_into_the_outputs_own_store(out, monkeypatch, tmp_path):
    # The store is the study's own (tracking.mlflow_uri, MLFLOW_TRACKING_URI), else the SQLite one in OUTPUT, wherever
    # the study file says its output was and whatever the current folder.
    study = out / "study.yaml"
    lines = study.read_text().split("\ntracking:")[0]
    study.write_text(lines + "\n")
    monkeypatch.chdir(tmp_path)
    assert main([str(out)]) == 0
    assert (out / "mlflow.db").is_file() and not (tmp_path / "outputs").exists()


def test_no_results_make_no_mlflow_store(out, capsys):
    (out / "results.parquet").unlink()
    assert refused(out, capsys, []) == f"{out / 'results.parquet'}: no such file"
    assert not (out / "mlflow.db").exists()


def test_results_without_a_trials_configuration_are_refused_before_mlflow(out, capsys):
    df = load_results(out)
    df.loc[1, "config_json"] = None
    write_table(df, out / "results.parquet", RESULTS_SCHEMA)
    message = refused(out, capsys, [])
    assert message == (f"{out / 'results.parquet'}: column 'config_json': trial {df.trial_id[0]} at step 20: not a "
                       f"trial's configuration (null)"), message
    df["config_json"] = json.dumps({"model": "DiT-P/2"})
    write_table(df, out / "results.parquet", RESULTS_SCHEMA)
    assert refused(out, capsys, []).endswith("at step 10: not a trial's configuration (it has no milestones)")
    assert not (out / "mlflow.db").exists()


def test_unreadable_loss_curves_are_refused_before_mlflow(out, capsys):
    (out / "loss_curves.parquet").write_bytes(b"PAR1 cut short")
    message = refused(out, capsys, [])
    assert message.startswith(f"{out / 'loss_curves.parquet'}: not a readable Parquet file"), message
    assert not (out / "mlflow.db").exists()


def test_a_store_that_is_not_mlflows_is_named_and_left_alone(out, capsys):
    (out / "mlflow.db").write_bytes(b"garbage!")
    message = refused(out, capsys, [])
    assert message.startswith(f"{out / 'study.yaml'}:"), message
    assert (f"tracking.mlflow_uri: MLflow cannot use the store sqlite:///{out / 'mlflow.db'} "
            f"((sqlite3.DatabaseError) file is not a database)") in message


def test_a_tracking_uri_mlflow_has_no_store_for_is_refused(out, capsys):
    assert refused(out, capsys, ["--tracking-uri", "ftp://example/x"]) == (
        "--tracking-uri: MLflow has no tracking store for 'ftp://example/x'; use http(s)://host:port, sqlite:///path or a "
        "database URI (sqlite, postgresql, mysql, mssql)")


def test_a_sqlite_store_that_cannot_be_made_is_refused_at_once(out, capsys, tmp_path):
    # MLflow retried it for 106 s, printing three dozen warnings, before it gave up.
    uri = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    (tmp_path / "a-file").write_text("a file, not a folder")
    assert refused(out, capsys, ["--tracking-uri", uri]) == (
        f"--tracking-uri: MLflow cannot use the store {uri} ({tmp_path / 'a-file'} is not a folder)")
    (tmp_path / "a-file").unlink()
    (tmp_path / "a-file").mkdir()
    (tmp_path / "a-file" / "mlflow.db").mkdir()  # a folder where the store's file goes
    assert refused(out, capsys, ["--tracking-uri", uri]) == (
        f"--tracking-uri: MLflow cannot use the store {uri} (unable to open database file)")
    assert not (out / "mlflow.db").exists()


def test_a_server_still_away_says_to_run_again_later(out, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    message = refused(out, capsys, ["--tracking-uri", uri], status=1)
    assert message == (f"MLflow at {uri} still does not answer (Connection refused); nothing was lost: "
                       f"run this again later")


def study_runs(store):
    """(run name, status) of every run in a SQLite store's 'tiny' experiment."""
    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    return sorted((r.info.run_name, r.info.status) for r in runs)


def test_a_copied_or_moved_output_replays_into_its_own_store(out, capsys):
    # The driver's study.yaml names the store by the folder the study ran in; a replay of a copy filled that
    # folder's store instead (and, not finding the study's runs under the copy's path, made a second set there),
    # and a replay of a moved folder made a new store where the folder had been.
    assert main([str(out)]) == 0
    runs = study_runs(out / "mlflow.db")
    assert len(runs) == 2
    copy = out.parent / "copy"
    shutil.copytree(out, copy)
    capsys.readouterr()
    assert main([str(copy)]) == 0
    assert "logged 0 missing measurements" in capsys.readouterr().out
    assert study_runs(out / "mlflow.db") == study_runs(copy / "mlflow.db") == runs
    moved = out.parent / "moved"
    out.rename(moved)
    assert main([str(moved)]) == 0
    assert not out.exists() and study_runs(moved / "mlflow.db") == runs


def test_a_replay_whose_calls_the_store_refuses_says_so_and_exits_2(out, capsys, monkeypatch):
    # Dropped (not queued) since a call failing for good holds back no other, they made no error: the replay said it
    # logged everything, exit 0. A store that refuses every write (read-only credentials, say) answers so.
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient as Client

    log_batch = Client.log_batch

    def read_only(self, run_id, *args, metrics=(), **kwargs):
        if metrics:
            raise MlflowException("Permission denied: READ only", error_code="PERMISSION_DENIED")
        return log_batch(self, run_id, *args, **kwargs)

    monkeypatch.setattr(Client, "log_batch", read_only)
    assert main([str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: MLflow at sqlite:///{out / 'mlflow.db'} refused or failed ") and \
        err.endswith(" of the replay's calls (the warnings above name them): not all that Parquet holds is in MLflow; "
                     "run this again once the store takes them"), err
    monkeypatch.setattr(Client, "log_batch", log_batch)
    assert main([str(out)]) == 0  # written now
    assert "logged 2 missing measurements" in capsys.readouterr().out
