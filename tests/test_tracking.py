"""The study's MLflow tracker on real SQLite stores: refused calls, a server that is away, runs found again."""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from scaling import tracking
from scaling.tracking import StudyTracker


@pytest.fixture
def uri(tmp_path, empty_store):
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def metric_steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_call_mlflow_refuses_is_dropped_and_holds_back_no_other(tmp_path, uri, caplog):
    # A run deleted in the UI during a study: logging to it is refused, for good. Queued, it held back every later
    # call of every run until the driver exited (and they were lost with it).
    tracker = StudyTracker(uri, "exp", "study", tmp_path / "out")
    deleted, kept = tracker.child_run("a", {}), tracker.child_run("b", {})
    tracker.client.delete_run(deleted)
    with caplog.at_level(logging.WARNING, logger="scaling.tracking"):
        tracker.log_metrics(deleted, {"train_loss": 1.0}, 1)
        assert tracker.pending == [] and tracker.refused == 1
        tracker.set_tags(deleted, {"later": "x"})  # refused too, and not said again (a run's every log would be)
    [warning] = caplog.messages
    assert warning.startswith(f"MLflow refused log_batch for run {deleted} (The run {deleted} must be in the 'active' "
                              f"state.") and f"python -m scaling.replay_mlflow {tmp_path / 'out'}" in warning
    assert tracker.refused == 2
    for step in (1, 2, 3):
        tracker.log_metrics(kept, {"train_loss": 1.0 / step}, step)
    tracker.finish(kept)
    assert metric_steps(tracker.client, kept, "train_loss") == [1, 2, 3]
    assert tracker.client.get_run(kept).info.status == "FINISHED"

    # Calls queued while the server was away (here: as the driver queues them), one of which MLflow refuses once it
    # answers: the queue goes on past it.
    tracker.pending = [(tracker.client.log_batch, (deleted,), {"metrics": [Metric("train_loss", 1.0, 0, 4)]}),
                       (tracker.client.log_batch, (kept,), {"metrics": [Metric("train_loss", 0.2, 0, 4)]})]
    assert tracker.flush(force=True) is True
    assert tracker.pending == [] and tracker.refused == 3
    assert metric_steps(tracker.client, kept, "train_loss") == [1, 2, 3, 4]


def test_a_server_away_is_tried_less_often_the_longer_it_stays_away(tmp_path, uri, monkeypatch):
    # A server that takes connections and never answers costs a timeout per attempt (20 s with the HTTP defaults):
    # at a fixed 5 s between attempts the driver spent most of its time waiting on it. The clock is the tracker's.
    now = [1000.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: now[0])
    answers = [False]

    def server(run_id):  # a call to a server that is away until answers[0]
        if not answers[0]:
            raise ConnectionError("Connection refused")
        tracker.client.set_tag(run_id, "back", "yes")

    tracker = StudyTracker(uri, "exp", "study", tmp_path / "out")
    run_id = tracker.child_run("a", {})
    tracker._call(server, run_id)
    assert len(tracker.pending) == 1 and tracker.refused == 0 and tracker.retry_at == 1005  # away, not refused
    tracker.set_tags(run_id, {"later": "x"})  # queued behind it, without an attempt before the time
    assert len(tracker.pending) == 2 and tracker.retry_at == 1005
    waits = []
    for _ in range(6):
        now[0] = tracker.retry_at  # the time comes: one attempt, which fails
        tracker.set_tags(run_id, {"meanwhile": "y"})
        waits.append(tracker.retry_at - now[0])
    assert waits == [10, 20, 40, 80, 120, 120] and len(tracker.pending) == 8
    # Back: the queue is replayed in order, and the next absence waits 5 s again.
    answers[0] = True
    assert tracker.flush(force=True) is True
    tags = tracker.client.get_run(run_id).data.tags
    assert (tags["back"], tags["later"], tags["meanwhile"]) == ("yes", "x", "y")
    answers[0] = False
    tracker._call(server, run_id)
    assert tracker.retry_at - now[0] == 5


@pytest.mark.parametrize("folder", ["it's out", 'say "out"', """it's "out\""""])
def test_an_output_folder_with_quote_marks_finds_its_runs_again(tmp_path, uri, folder):
    # MLflow's filter has no escape for a quote: a backslash-escaped one matched nothing, and every re-run of the study
    # made a new study run and new trial runs.
    first = StudyTracker(uri, "exp", "study", tmp_path / folder)
    child = first.child_run("a", {"x": 1})
    again = StudyTracker(uri, "exp", "study", tmp_path / folder)
    assert again.parent_run_id == first.parent_run_id and again.child_run("a", {"x": 1}) == child
    other = StudyTracker(uri, "exp", "study", tmp_path / "other")  # another output: its own
    assert other.parent_run_id != first.parent_run_id
    assert len(MlflowClient(uri).search_runs([first.experiment_id])) == 3


def test_open_child_runs_are_those_running_or_scheduled(tmp_path, uri):
    tracker = StudyTracker(uri, "exp", "study", tmp_path / "out")
    running, scheduled, finished = (tracker.child_run(t, {}, status) for t, status in
                                    (("a", "RUNNING"), ("b", "SCHEDULED"), ("c", "RUNNING")))
    tracker.finish(finished)
    elsewhere = StudyTracker(uri, "exp", "study", tmp_path / "elsewhere").child_run("d", {})  # another study's
    assert tracker.open_child_runs() == {"a": running, "b": scheduled}
    assert elsewhere not in tracker.open_child_runs().values()


def test_a_moved_output_finds_its_study_run_by_the_folder_it_ran_in(tmp_path, uri):
    first = StudyTracker(uri, "exp", "study", tmp_path / "out")
    child = first.child_run("a", {})
    moved = StudyTracker(uri, "exp", "study", tmp_path / "moved", moved_from=tmp_path / "out")
    assert moved.parent_run_id == first.parent_run_id and moved.child_run("a", {}) == child  # not a second study
    tags = MlflowClient(uri).get_run(first.parent_run_id).data.tags
    assert tags["dit_scaling.output"] == str(tmp_path / "moved")  # found by where it is now from then on
    assert StudyTracker(uri, "exp", "study", tmp_path / "moved").parent_run_id == first.parent_run_id


def test_the_artifacts_of_a_moved_output_are_located_where_they_are_now(tmp_path, uri):
    from scaling.tracking import move_artifact_locations

    store = tmp_path / "mlflow.db"
    study = StudyTracker(uri, "exp", "study", tmp_path / "out")
    study.log_text(study.child_run("a", {}), "grid", "samples/step-10.txt")
    beside = StudyTracker(uri, "other", "study", tmp_path / "out-2")  # another study's, its name sharing a prefix
    beside.log_text(beside.parent_run_id, "kept", "study.yaml")
    (tmp_path / "out").rename(tmp_path / "moved")
    assert move_artifact_locations(store, tmp_path / "out", tmp_path / "moved") == 3  # the experiment and two runs
    client = MlflowClient(uri)
    got = client.download_artifacts(study.child_run("a", {}), "samples/step-10.txt", str(tmp_path / "got"))
    assert Path(got).read_text() == "grid"  # read from where the folder is now
    assert client.get_experiment(study.experiment_id).artifact_location == (tmp_path / "moved" / "mlartifacts").as_uri()
    assert client.get_run(beside.parent_run_id).info.artifact_uri.startswith(
        (tmp_path / "out-2" / "mlartifacts").as_uri() + "/")
    assert move_artifact_locations(store, tmp_path / "out", tmp_path / "moved") == 0  # done: nothing left to move


def test_a_trial_run_found_without_its_params_gets_them(tmp_path, uri, monkeypatch):
    tracker = StudyTracker(uri, "exp", "study", tmp_path / "out")
    params = {"train": {"lr": 1e-3, "batch_size": 32}, "model": "DiT-P/2"}
    # The driver stopped (or MLflow failed) between the run's creation and its params.
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracker.client, "log_batch", stopped)
    with pytest.raises(KeyboardInterrupt):
        tracker.child_run("a", params)
    monkeypatch.undo()
    again = StudyTracker(uri, "exp", "study", tmp_path / "out")  # the study run again
    run_id = again.child_run("a", params)
    assert MlflowClient(uri).get_run(run_id).data.params == {"train.lr": "0.001", "train.batch_size": "32",
                                                             "model": "DiT-P/2"}
    assert StudyTracker(uri, "exp", "study", tmp_path / "out").child_run("a", params) == run_id  # and once only


def test_a_file_store_is_refused_unless_mlflow_is_let_use_one(monkeypatch):
    problem = tracking.unsupported_store("file:///tmp/mlruns")
    assert problem.startswith("MLflow no longer logs to a file store (file:///tmp/mlruns) unless "
                              "MLFLOW_ALLOW_FILE_STORE=true")
    assert tracking.unsupported_store("/tmp/mlruns").startswith("MLflow no longer logs to a file store")
    # MLflow's bare "databricks" (the default profile's workspace) is no file store.
    assert tracking.unsupported_store("databricks") is None and tracking.unsupported_store("databricks://dev") is None
    assert tracking.store_scheme("databricks") == "databricks"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert tracking.unsupported_store("file:///tmp/mlruns") is None


def test_a_printed_tracking_uri_shows_no_password():
    shown = {uri: tracking.shown_uri(uri) for uri in (
        "postgresql://bob:s3cret@db:5432/mlflow", "https://bob:s3cret@mlflow.example:443",
        "mysql+pymysql://db/mlflow?user=bob&password=s3cret&charset=utf8", "http://mlflow:5000", "sqlite:////a/b.db")}
    assert shown == {
        "postgresql://bob:s3cret@db:5432/mlflow": "postgresql://bob:***@db:5432/mlflow",
        "https://bob:s3cret@mlflow.example:443": "https://bob:***@mlflow.example:443",
        "mysql+pymysql://db/mlflow?user=bob&password=s3cret&charset=utf8":
            "mysql+pymysql://db/mlflow?user=bob&password=***&charset=utf8",
        "http://mlflow:5000": "http://mlflow:5000", "sqlite:////a/b.db": "sqlite:////a/b.db"}


def test_a_database_store_keeps_a_new_experiments_artifacts_in_the_output(tmp_path):
    # Only SQLite's did: a PostgreSQL or MySQL store opened by the driver put them in ./mlruns of whatever directory
    # it ran in (a temporary one under `ray job submit`); a server keeps its own.
    mlartifacts = (tmp_path / "out" / "mlartifacts").as_uri()
    for uri in (f"sqlite:///{tmp_path / 'mlflow.db'}", "postgresql://bob@db:5432/mlflow",
                "mysql+pymysql://db/mlflow", "mssql://db/mlflow"):
        assert tracking.experiment_artifacts(uri, tmp_path / "out") == mlartifacts, uri
    for uri in ("http://mlflow:5000", "https://mlflow.example", "databricks"):
        assert tracking.experiment_artifacts(uri, tmp_path / "out") is None, uri


def test_mlflow_and_ray_send_no_usage_reports_unless_turned_on():
    # MLflow's telemetry thread, started at import, fetched its config and posted events from every driver; a local
    # Ray's head posted usage stats: calls out of machines that often have no internet, of the study owner's runs.
    quiet = {k: v for k, v in os.environ.items()  # as a shell outside pytest and CI has it
             if k not in {"MLFLOW_DISABLE_TELEMETRY", "RAY_USAGE_STATS_ENABLED", "DO_NOT_TRACK", "PYTEST_CURRENT_TEST",
                          "CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "JENKINS_URL", "TRAVIS", "CIRCLECI"}}
    repo = Path(__file__).resolve().parents[1]
    cases = [(module, quiet, "True 0") for module in ("scaling.run", "scaling.replay_mlflow", "scaling.encode_latents",
                                                      "benchmarks.trial_overhead")]
    cases.append(("scaling.run", {**quiet, "MLFLOW_DISABLE_TELEMETRY": "false", "RAY_USAGE_STATS_ENABLED": "1"},
                  "False 1"))
    for module, env, said in cases:  # each in a process of its own: the first import decides
        code = (f"import os, {module}; from mlflow.telemetry import get_telemetry_client; "
                "print(get_telemetry_client() is None, os.environ['RAY_USAGE_STATS_ENABLED'])")
        done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.stdout.split() == said.split(), module + done.stdout + done.stderr[-2000:]
