"""The study's MLflow tracker on real SQLite stores: refused calls, a server that is away, runs found again."""
import base64
import contextlib
import http.server
import importlib.util
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
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
    # A second run of trial a (a create_run MLflow's HTTP retry sent twice): the newest, as child_run finds it.
    time.sleep(0.01)  # a later start time, to the millisecond
    twice = tracker.client.create_run(tracker.experiment_id, tags={"dit_scaling.trial_id": "a",
                                                                   "mlflow.parentRunId": tracker.parent_run_id})
    del tracker.children["a"]
    assert tracker.child_run("a", {}) == twice.info.run_id == tracker.open_child_runs()["a"]


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


@pytest.fixture
def quick_http(monkeypatch):
    """MLflow's HTTP calls without retries (its default retries a refused connection for minutes); the variables that
    tracking.client sets put back after the test."""
    for key, value in {**tracking.HTTP_DEFAULTS, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}.items():
        monkeypatch.setenv(key, value)


def closed_port():
    """A port on 127.0.0.1 that nothing listens on: a tracking server that is away."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(answer, seen=None, tls=None):
    """A plain HTTP server on 127.0.0.1 answering every request (method, path) with answer(method, path): (status,
    body); seen gets (method, path, Authorization header) of each; tls: (cert, key) files to serve HTTPS."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def handle_one(self):
            if seen is not None:
                seen.append((self.command, self.path, self.headers.get("Authorization")))
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            status, body = answer(self.command, self.path)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = handle_one

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_call_that_fails_for_good_is_dropped_and_holds_back_no_other(tmp_path, uri, caplog):
    # An experiment whose artifacts go to S3, where the driver's machine has no boto3: each sample grid failed with
    # ModuleNotFoundError, was queued as if the server were away, and every later metric, tag and status of every run
    # waited behind it for the rest of the study (the runs left RUNNING, nothing logged).
    if importlib.util.find_spec("boto3") is not None:
        pytest.skip("boto3 is installed here: S3 would fail otherwise (credentials, network)")
    MlflowClient(uri).create_experiment("exp", artifact_location="s3://bucket/artifacts")
    tracker = StudyTracker(uri, "exp", "study", tmp_path / "out")
    run_id = tracker.child_run("a", {})
    with caplog.at_level(logging.WARNING, logger="scaling.tracking"):
        tracker.log_text(run_id, "grid", "samples/step-10.txt")
        tracker.log_metrics(run_id, {"train_loss": 0.5}, 10)
        tracker.log_text(run_id, "grid", "samples/step-20.txt")  # fails alike: not said again
        tracker.set_tags(run_id, {tracking.STATUS_TAG: "ok"})
        tracker.finish(run_id)
    assert tracker.pending == [] and tracker.refused == 2
    assert caplog.messages == [f"MLflow's log_text for run {run_id} failed (ModuleNotFoundError: No module named "
                               "'boto3'), not for want of an answer: dropped, not retried (later log_text calls "
                               "failing alike are not said)"]
    run = tracker.client.get_run(run_id)
    assert (run.data.metrics, run.data.tags[tracking.STATUS_TAG], run.info.status) == ({"train_loss": 0.5}, "ok",
                                                                                        "FINISHED")
    # Queued while the server was away, and failing for good once it answers: the queue goes on past it.
    tracker.pending = [(tracker.client.log_text, (run_id, "grid", "samples/step-30.txt"), {}),
                       (tracker.client.log_batch, (run_id,), {"metrics": [Metric("train_loss", 0.25, 0, 30)]})]
    assert tracker.flush(force=True) is True
    assert tracker.pending == [] and tracker.refused == 3
    assert metric_steps(tracker.client, run_id, "train_loss") == [10, 30]


def server_error_500():
    """As MLflow's HTTP client raises a 500 its retries ran out on (a server whose artifact store denies access)."""
    try:
        raise requests.exceptions.RetryError("Max retries exceeded with url: /api/2.0/mlflow-artifacts/artifacts/x "
                                             "(Caused by ResponseError('too many 500 error responses'))")
    except requests.exceptions.RetryError as e:
        raise tracking.MlflowException(f"API request to http://mlflow:5000 failed with exception {e}")


def test_a_call_the_server_fails_every_time_holds_back_no_other_while_it_answers(tmp_path, uri, monkeypatch, caplog):
    # log_artifact through a --serve-artifacts server whose artifact store denies access: a 500 every time, which
    # reads as a server away. It stayed first in the queue, and every later metric, tag and status of the study
    # waited behind it until the driver exited (the runs left RUNNING). A local store gives no 500: the client's
    # method stands for it. The clock is the tracker's.
    now = [1000.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: now[0])
    tracker = StudyTracker(uri, "exp", "study", tmp_path / "out")
    run_id = tracker.child_run("a", {})
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"png")
    stored, failing = tracker.client.log_artifact, [True]

    def log_artifact(*args, **kwargs):  # named as the client's method it stands for
        if failing[0]:
            server_error_500()
        return stored(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_artifact", log_artifact)
    with caplog.at_level(logging.WARNING, logger="scaling.tracking"):
        tracker.log_artifact(run_id, grid, "samples")  # once: it may be a moment's error, so it is queued
        tracker.log_metrics(run_id, {"train_loss": 0.5}, 10)
        assert len(tracker.pending) == 2 and tracker.refused == 0
        now[0] = tracker.retry_at  # tried again: the server answers get_experiment, not it
        tracker.log_metrics(run_id, {"train_loss": 0.25}, 20)
        tracker.set_tags(run_id, {tracking.STATUS_TAG: "ok"})
        tracker.finish(run_id)
    assert tracker.pending == [] and tracker.refused == 1
    queued, dropped = caplog.messages
    assert queued == "MLflow unreachable (MlflowException); queueing, will retry"
    assert dropped.startswith(f"MLflow's log_artifact for run {run_id} failed (MlflowException: API request to "
                              "http://mlflow:5000 failed with exception Max retries exceeded")
    run = tracker.client.get_run(run_id)
    assert metric_steps(tracker.client, run_id, "train_loss") == [10, 20]
    assert (run.data.tags[tracking.STATUS_TAG], run.info.status) == ("ok", "FINISHED")

    # The same answer where the server does not answer the cheap call either: away. Everything waits and is replayed
    # in order once it answers, however many attempts fail meanwhile.
    def away(*args, **kwargs):
        raise ConnectionError("Connection refused")

    real_experiment = tracker.client.get_experiment
    monkeypatch.setattr(tracker.client, "get_experiment", away)
    tracker.log_artifact(run_id, grid, "samples")
    for step in (30, 40, 50):
        now[0] = tracker.retry_at
        tracker.log_metrics(run_id, {"train_loss": 1 / step}, step)
    assert len(tracker.pending) == 4 and tracker.refused == 1
    monkeypatch.setattr(tracker.client, "get_experiment", real_experiment)
    failing[0] = False
    assert tracker.flush(force=True) is True
    assert tracker.pending == [] and tracker.refused == 1
    assert metric_steps(tracker.client, run_id, "train_loss") == [10, 20, 30, 40, 50]
    assert [a.path for a in tracker.client.list_artifacts(run_id, "samples")] == ["samples/grid.png"]


def test_only_a_store_that_does_not_answer_holds_calls_back(tmp_path, uri, quick_http):
    # MLflow's REST client raises an MlflowException of code INTERNAL_ERROR both for a server that is down and for a
    # 4xx answer it cannot parse (a proxy's 413 for a large batch): only the first is worth queueing.
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
    from mlflow.utils.request_utils import augmented_raise_for_status

    tracker = StudyTracker(uri, "exp", "study", tmp_path / "out")
    run_id = tracker.child_run("a", {})
    queued, artifacts = {}, {}  # by the server's answer: (calls queued, calls dropped); whether an artifact's is away
    for status in (None, 503, 429, 413, 401):  # None: nothing listens
        with contextlib.ExitStack() as stack:
            port = closed_port() if status is None else stack.enter_context(http_server(lambda m, p: (status, b"no")))
            tracker.client = MlflowClient(f"http://127.0.0.1:{port}")
            tracker.log_metrics(run_id, {"train_loss": 1.0}, 1)
            queued[status] = (len(tracker.pending), tracker.refused)
            if status:  # an artifact store's answer, as MLflow's HTTP artifact repository raises it
                with pytest.raises(requests.HTTPError) as raised:
                    augmented_raise_for_status(requests.put(f"http://127.0.0.1:{port}/artifact", data=b"x", timeout=5))
                artifacts[status] = raised.value
        tracker.pending, tracker.refused, tracker.retry_at = [], 0, 0.0
    assert queued == {None: (1, 0), 503: (1, 0), 429: (1, 0), 413: (0, 1), 401: (0, 1)}
    assert {status: tracking.away(e) for status, e in artifacts.items()} == {503: True, 429: True, 413: False,
                                                                             401: False}
    # A SQL store's code for a database that is locked or gone (SQLAlchemy's OperationalError); a refusal's.
    assert tracking.away(MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)) is True
    assert tracking.away(MlflowException("must be active", error_code=INVALID_PARAMETER_VALUE)) is False


def test_the_study_runs_next_point_is_numbered_only_by_what_the_store_holds(tmp_path, uri, quick_http, caplog):
    # The study run gets a wall_time_s point per driver run, at the step after the last: read leniently, a store that
    # did not answer gave step 0, and the point went in as the first run's (queued, then replayed) or beside it.
    tracker = StudyTracker(uri, "exp", "study", tmp_path / "out")
    parent = tracker.parent_run_id
    assert tracker.next_step(parent, "wall_time_s") == 0
    tracker.log_metrics(parent, {"wall_time_s": 12.5}, 0)
    assert tracker.next_step(parent, "wall_time_s") == 1
    tracker.client = MlflowClient(f"http://127.0.0.1:{closed_port()}")  # the store away
    with caplog.at_level(logging.WARNING, logger="scaling.tracking"):
        assert tracker.next_step(parent, "wall_time_s") is None
    assert caplog.messages == [f"MLflow did not give the wall_time_s of run {parent} (MlflowException); its point of "
                               "this run is not logged"]


def test_a_run_whose_overhead_cannot_be_read_is_not_given_it_again(tmp_path, uri, quick_http, monkeypatch):
    # The start-up and teardown of a trial were read leniently: a store that stopped answering between the reads of
    # a run's curves and of its start-up was taken to hold none, and the backfill logged them a second time.
    import pandas as pd

    from scaling.mlflow_backfill import log_missing

    tracker = StudyTracker(uri, "exp", "study", tmp_path / "out")
    run_id = tracker.child_run("a", {})
    tracker.log_metrics(run_id, {"startup_s": 7.5}, 10)
    tracker.log_metrics(run_id, {"teardown_s": 1.5}, 20)
    results = pd.DataFrame({"trial_id": ["a", "a"], "config_json": ["{}", "{}"], "step": [10, 20],
                            "status": ["ok", "ok"], "startup_s": [7.5, None], "teardown_s": [None, 1.5]})
    curves = pd.DataFrame({"trial_id": ["a"], "step": [5], "train_loss": [0.5]})
    here, away = tracker.client.get_metric_history, MlflowClient(f"http://127.0.0.1:{closed_port()}")

    def history(run, key):  # the server gone between the reads of the run's curves and of its overhead
        return away.get_metric_history(run, key) if key in ("startup_s", "teardown_s") else here(run, key)

    monkeypatch.setattr(tracker.client, "get_metric_history", history)
    assert log_missing(tracker, results, curves, skip_unreadable=True) == 0  # the driver's: left to a replay
    with pytest.raises(Exception, match="Connection refused"):  # the replay's: it says so
        log_missing(tracker, results, curves)
    monkeypatch.undo()
    assert metric_steps(tracker.client, run_id, "startup_s") == [10]
    assert metric_steps(tracker.client, run_id, "teardown_s") == [20]
    assert log_missing(tracker, results, curves) == 3  # the store answers: the curve and both milestone rows
    assert metric_steps(tracker.client, run_id, "startup_s") == [10]
    assert metric_steps(tracker.client, run_id, "train_loss") == [5]


def test_the_backfill_logs_a_curve_point_without_a_train_loss_and_a_queued_point_once(tmp_path, uri):
    # A step counted as logged only where MLflow held its train_loss: a diverged step's (NaN, never logged) had its lr
    # logged again by every backfill. Points the tracker still had queued were read as missing and logged twice.
    import pandas as pd

    from scaling.mlflow_backfill import log_missing

    tracker = StudyTracker(uri, "exp", "study", tmp_path / "out")
    run_id = tracker.child_run("a", {})
    results = pd.DataFrame({"trial_id": ["a"], "config_json": ["{}"], "step": [20], "status": ["ok"],
                            "val_loss": [0.4], "startup_s": [None], "teardown_s": [None]})
    curves = pd.DataFrame({"trial_id": ["a"] * 4, "step": [5, 10, 15, 25], "train_loss": [0.5, float("nan"), 0.3, 0.2],
                           "lr": [1e-4] * 4})
    down = [False]

    def log_batch(run, metrics):  # the store, away while down[0]
        if down[0]:
            raise ConnectionError("Connection refused")
        tracker.client.log_batch(run, metrics=metrics)

    def queued(step, loss):  # as log_metrics queues a curve point while the store is away
        return log_batch, (run_id,), {"metrics": [Metric("train_loss", loss, 0, step), Metric("lr", 1e-4, 0, step)]}

    tracker.pending = [queued(15, 0.3)]  # the store answers again: replayed first, not logged a second time
    assert log_missing(tracker, results, curves) == 4  # steps 5, 10 and 25, and the milestone row
    assert tracker.pending == [] and log_missing(tracker, results, curves) == 0
    assert metric_steps(tracker.client, run_id, "lr") == [5, 10, 15, 25]
    assert metric_steps(tracker.client, run_id, "train_loss") == [5, 15, 25]
    assert metric_steps(tracker.client, run_id, "val_loss") == [20]

    curves = pd.concat([curves, pd.DataFrame({"trial_id": ["a"], "step": [30], "train_loss": [0.1], "lr": [1e-4]})])
    down[0] = True
    tracker.pending = [queued(30, 0.1)]  # the store still away for it: what stays queued counts as held
    assert log_missing(tracker, results, curves) == 0 and len(tracker.pending) == 1
    down[0] = False
    assert tracker.flush(force=True) is True
    assert metric_steps(tracker.client, run_id, "lr") == [5, 10, 15, 25, 30]


def test_the_launch_check_reaches_a_tracking_server_as_mlflow_does(tmp_path, quick_http, monkeypatch):
    # It went through urllib: a URI's user:password@ was taken for part of the host name ("Name or service not known")
    # and MLflow's TLS settings were not read, so a server MLflow reaches was refused before launch.
    from scaling import run as scaling_run
    from scaling.study import StudyError
    from test_study import BASE, load

    def answer(method, path):  # /health, and no experiment of the study's name
        return (200, b"OK") if path == "/health" else (404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}')

    def check(uri):
        study = load(tmp_path, BASE + f"output: {tmp_path / 'out'}\ntracking:\n  mlflow_uri: {uri}\n")
        scaling_run.check_tracking_server(study)

    seen = []
    with http_server(answer, seen) as port:
        check(f"http://bob:s3cret@127.0.0.1:{port}")
    assert seen[0] == ("GET", "/health", "Basic " + base64.b64encode(b"bob:s3cret").decode())
    port = closed_port()
    with pytest.raises(StudyError) as refused:
        check(f"http://bob:s3cret@127.0.0.1:{port}")
    assert str(refused.value).endswith(f"tracking.mlflow_uri: no MLflow tracking server answers at "
                                       f"http://bob:***@127.0.0.1:{port} ([Errno 111] Connection refused)")
    if shutil.which("openssl") is None:
        pytest.skip("no openssl here to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    with http_server(answer, tls=(cert, key)) as port:
        with pytest.raises(StudyError, match="certificate verify failed"):  # self-signed: not trusted by default
            check(f"https://127.0.0.1:{port}")
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
        check(f"https://127.0.0.1:{port}")
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
        check(f"https://127.0.0.1:{port}")
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")
        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
        check(f"https://127.0.0.1:{port}")


def test_a_rate_limited_call_or_a_forced_retry_at_once_is_not_dropped(tmp_path, uri, monkeypatch):
    # A hosted server limits writes apart from reads: a log_batch answered 429 while get_experiment answers is as good
    # as the next call, and waits. And a 500 tried again at once (a forced replay) is one attempt, not two.
    now = [1000.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: now[0])
    tracker = StudyTracker(uri, "exp", "study", tmp_path / "out")
    run_id = tracker.child_run("a", {})
    stored, answer = tracker.client.log_batch, ["429"]

    def log_batch(*args, **kwargs):  # named as the client's method it stands for
        if answer[0]:
            try:
                raise requests.exceptions.RetryError(f"Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch "
                                                     f"(Caused by ResponseError('too many {answer[0]} error "
                                                     f"responses'))")
            except requests.exceptions.RetryError as e:
                raise tracking.MlflowException(f"API request to http://mlflow:5000 failed with exception {e}")
        return stored(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", log_batch)
    tracker.log_metrics(run_id, {"train_loss": 0.5}, 10)
    for _ in range(4):
        now[0] = tracker.retry_at
        assert tracker.flush() is False
    assert len(tracker.pending) == 1 and tracker.refused == 0  # rate-limited: queued, however often
    answer[0] = "500"
    now[0] = tracker.retry_at
    assert tracker.flush() is False and tracker.answered_failures == 1
    assert tracker.flush(force=True) is False and tracker.answered_failures == 1  # at once: not a second attempt
    assert len(tracker.pending) == 1 and tracker.refused == 0
    now[0] += tracking.RETRY_INTERVAL_S
    assert tracker.flush(force=True) is True and tracker.refused == 1  # a retry interval on: its own failure
    answer[0] = ""
    tracker.log_metrics(run_id, {"train_loss": 0.25}, 20)
    assert metric_steps(tracker.client, run_id, "train_loss") == [20]
