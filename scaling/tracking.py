"""MLflow tracking of a study: one experiment, one parent run per study, one child run per trial.

Only the driver talks to MLflow (workers report to Ray), so a SQLite store never sees concurrent
writers, and an unreachable tracking server stalls nothing: the calls of a study's measurements (metrics, tags,
statuses, artifacts) that fail are queued and replayed in order once it answers again. Those that find or make the
runs (the tracker's creation, child_run: create_run, update_run, search_runs, log_batch of the params) go to the
store directly and raise while it is away: the driver makes them at launch, every trial's run once, after checking
that MLflow answers, and the replay says the store's error. A tracking server gets short HTTP retries (MLflow's own
default keeps one call retrying for about four minutes), and a queue that fails to replay is tried again after
RETRY_INTERVAL_S, twice as long after each failure up to MAX_RETRY_INTERVAL_S, so a dead server (or one that accepts
connections and never answers) costs the driver moments, not minutes.
Only a store that does not answer now (the network, a timeout, a server or database that says it is busy or
down) queues a call: any other failure, a call MLflow refuses (a run deleted in the UI meanwhile) or one that fails
for good (an artifact store it cannot write to), is dropped with a warning instead: queued, it would hold back every
call after it. So is a call the server answers with a 5xx (MLflow's retries of it ran out) while it answers a cheap
call (get_experiment) made at once after: the failure is that call's own (log_artifact through a server whose
artifact store denies it answers 500 every time): it is dropped, and the queue goes on past it, once it has failed
so on ANSWERED_FAILURES attempts at least RETRY_INTERVAL_S apart (a moment's 503 passes; a forced replay's attempt
sooner does not count). Where that cheap call fails too, the server is away: the call stays queued, and everything
after it, replayed in order once it answers; so does a call the server rate-limits (429), however often.
"""
import contextlib
import json
import logging
import os
import re
import sqlite3
import sys
import time
from pathlib import Path

import scaling.no_telemetry  # noqa: F401 - first: before MLflow and Ray are imported
import requests
import urllib3
from mlflow.entities import Metric, Param, RunStatus
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

logger = logging.getLogger("scaling.tracking")

ROLE_TAG, OUTPUT_TAG, TRIAL_TAG, PARENT_TAG = "dit_scaling.role", "dit_scaling.output", "dit_scaling.trial_id", \
    "mlflow.parentRunId"
STATUS_TAG = "dit_scaling.status"  # running, then how the trial ended: ok, diverged, failed or killed
RUN_STATUS = {"ok": "FINISHED", "diverged": "FAILED", "failed": "FAILED", "killed": "KILLED"}  # a run's, by how
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
RETRY_INTERVAL_S = 5.0  # before the first attempt to replay the queue while the server is away
MAX_RETRY_INTERVAL_S = 120.0  # the longest wait between attempts (each may cost HTTP timeouts: 20 s)
# MLflow's error codes for a call that no retry changes: the run or experiment is deleted, a value is refused. Not
# BAD_REQUEST: its SQL stores give that to a full connection pool or a dropped connection too, which pass.
REFUSALS = {"INVALID_PARAMETER_VALUE", "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS"}
# MLflow's error codes for a store that cannot answer now: a database gone or busy (its SQL stores' code for
# SQLAlchemy's OperationalError), a deadline, a rate limit.
AWAY_CODES = {"TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"}
AWAY_STATUSES = {408, 429, 500, 502, 503, 504}  # HTTP answers MLflow's REST client retries: a server busy or down
# Attempts of one call that the server answered with one of those while it answered a cheap call made after it: at
# the last, the failure is taken for the call's own and it is dropped.
ANSWERED_FAILURES = 2
# Errors of a connection that failed or timed out, as the HTTP clients under MLflow's stores raise them. requests'
# SSLError is one: a handshake cut short is too, and a certificate that no longer verifies fails every call alike
# (queued, they are logged once it is renewed). RetryError: MLflow's retries of a 429 or 5xx answer ran out.
AWAY_ERRORS = (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout,
               requests.exceptions.RetryError, requests.exceptions.ChunkedEncodingError,
               urllib3.exceptions.MaxRetryError, urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError,
               urllib3.exceptions.ProxyError)
# The same of libraries an artifact or database store may use, by module: looked up in sys.modules, as a library
# not imported raised none. SQLAlchemy's TimeoutError: a full connection pool (MLflow calls that a BAD_REQUEST).
AWAY_ERRORS_OF = {"sqlalchemy.exc": ("OperationalError", "DisconnectionError", "TimeoutError"),
                  "botocore.exceptions": ("ConnectionError", "HTTPClientError")}
# MLflow reads these per request; the driver is the only MLflow user in its process. Set in the
# environment, they win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def shown_uri(uri):
    """A tracking URI (or a message holding one) as printed: a password in it (a database's, a server's basic auth, a
    `password=` query parameter) shown as ***; the rest as written (urllib's round trip would turn sqlite://// into
    sqlite://)."""
    uri = re.sub(r"\b([a-z][a-z0-9+.-]*://[^/@:\s]*:)[^/@\s]*@", r"\1***@", uri, flags=re.I)
    return re.sub(r"([?&][^=&\s]*password[^=&\s]*=)[^&\s]*", r"\1***", uri, flags=re.I)


def artifacts_folder(output_dir):
    """Where a study's SQLite store keeps its artifacts: beside it in the output, not in ./mlruns of some directory."""
    return Path(output_dir).resolve() / "mlartifacts"


def experiment_artifacts(uri, output_dir):
    """Where a new experiment in the store at uri keeps its artifacts: the output's mlartifacts for a database the
    driver opens itself (MLflow's default is ./mlruns of whatever directory the process runs in: a temporary one
    under `ray job submit`); None for a tracking server, which has its own artifact store."""
    return artifacts_folder(output_dir).as_uri() if store_scheme(uri) in DATABASE_SCHEMES else None


def move_artifact_locations(store, ran_in, output_dir):
    """Point the experiments and runs of a SQLite store (its file) that keep their artifacts in the folder the study's
    output was moved or copied from (ran_in) at the artifacts folder of the output where it is now (output_dir); the
    number of locations changed. Left, MLflow would write new artifacts into the old place, making that folder again,
    and its UI would look for the old ones there. MLflow has no call that changes an artifact location, so its two
    tables are updated directly (these columns have kept their names since MLflow 1.0)."""
    old, new = artifacts_folder(ran_in).as_uri(), artifacts_folder(output_dir).as_uri()
    if old == new:
        return 0
    changed = 0
    with contextlib.closing(sqlite3.connect(store)) as db, db:  # one transaction: all of them or none
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
            changed += db.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                  f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                                  (new, len(old) + 1, old, len(old) + 1, old + "/")).rowcount
    return changed


def default_tracking_uri(output_dir):
    """MLFLOW_TRACKING_URI, else a SQLite store in the output folder (absolute: Ray workers change directory)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def flatten(d, prefix=""):
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class StudyTracker:
    """The MLflow runs of one study, created or found again by their tags, never duplicated."""

    def __init__(self, uri, experiment, study_name, output_dir, reopen=True, moved_from=None, find=True):
        """reopen: mark the runs found again RUNNING (a study going on), not so for a mere replay. moved_from: the
        folder the study's output was in when it last ran, where it was moved since (its parent run is found by it,
        and tagged with output_dir from then on). find=False: a new study run, whatever runs name output_dir (those
        of an output deleted since: this study starts afresh there)."""
        self.uri, self.reopen = uri, reopen
        self.client = client(uri)
        self.pending = []  # calls that failed while the server was away, replayed in order
        self.retry_at = 0.0  # time.monotonic() before which the queue is not replayed
        self.retry_interval = RETRY_INTERVAL_S  # the wait after the next failed attempt
        self.refused = 0  # calls MLflow refused or that failed for good, dropped
        self.refused_runs = set()  # the runs of refused calls, each warned of once
        self.failures = set()  # (call, error) of the other dropped calls, each warned of once
        self.answered_failures = 0  # attempts of the queue's first call that failed while the server answered
        self.answered_at = 0.0  # when the last of them was counted (time.monotonic)
        output_dir = str(Path(output_dir).resolve())
        self.output_dir = output_dir
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(experiment,
                                                               artifact_location=experiment_artifacts(uri, output_dir))
        else:
            self.experiment_id = exp.experiment_id
        runs = self._search({ROLE_TAG: "study", OUTPUT_TAG: output_dir}) if find else []
        if not runs and moved_from is not None:
            runs = self._search({ROLE_TAG: "study", OUTPUT_TAG: str(Path(moved_from).resolve())})
            for run in runs:
                self.client.set_tag(run.info.run_id, OUTPUT_TAG, output_dir)
        if runs:
            self.parent_run_id = runs[0].info.run_id
            if reopen:
                self.client.update_run(self.parent_run_id, status="RUNNING")
        else:
            self.parent_run_id = self.client.create_run(
                self.experiment_id, run_name=study_name, tags={ROLE_TAG: "study", OUTPUT_TAG: output_dir}
            ).info.run_id
        self.children = {}

    def child_run(self, trial_id, params, status="RUNNING"):
        """The child run of a trial: found by its trial-id tag, else created with its params.

        status: what a run found again becomes (when reopening) and a new run starts as.
        """
        if trial_id in self.children:
            return self.children[trial_id]
        runs = self._search({TRIAL_TAG: trial_id, PARENT_TAG: self.parent_run_id})
        if runs:
            run_id = runs[0].info.run_id
            if self.reopen:
                self.client.update_run(run_id, status=status)
            missing = {k: v for k, v in flatten(params).items() if k not in runs[0].data.params}
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=trial_id,
                                            tags={TRIAL_TAG: trial_id, PARENT_TAG: self.parent_run_id}).info.run_id
            missing = flatten(params)
            if status != "RUNNING":  # create_run starts a run RUNNING
                self.client.update_run(run_id, status=status)
        # Those of a found run too: a driver stopped (or MLflow failing) between create_run and log_batch left none.
        flat = [Param(k, _param_value(v)) for k, v in missing.items()]
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=flat[i:i + 100])
        self.children[trial_id] = run_id
        return run_id

    def _search(self, tags):
        """The experiment's runs with these tag values. MLflow's filter has no escape for a quote mark: a value
        holding both kinds is compared here instead."""
        clauses, here = [], {}
        for key, value in tags.items():
            quote = next((q for q in ("'", '"') if q not in value), None)
            if quote is None:
                here[key] = value
            else:
                clauses.append(f"tags.`{key}` = {quote}{value}{quote}")
        runs = self.client.search_runs([self.experiment_id], " and ".join(clauses),
                                       max_results=1000 if not here else 50000,  # 50000: SQL stores' page limit
                                       order_by=["attributes.start_time DESC"])  # the newest first: the one in use
        return [r for r in runs if all(r.data.tags.get(k) == v for k, v in here.items())]

    def open_child_runs(self):
        """{trial id: run id} of the study's trial runs still RUNNING or SCHEDULED (one search; none while away)."""
        try:
            # MLflow's filter compares a status with one value only (IN is for run ids)
            runs = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                                           max_results=50000,  # SQL stores' page limit
                                           order_by=["attributes.start_time DESC"])
        except Exception:  # a server that is away: its runs are closed by the next run or a replay
            return {}
        # Oldest first, so that the newest wins: child_run's (two runs of a trial where a create_run that timed out
        # was sent again: MLflow's HTTP retries repeat a POST).
        return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in reversed(runs)
                if TRIAL_TAG in r.data.tags and r.info.status in ("RUNNING", "SCHEDULED")}

    def next_step(self, run_id, key):
        """The step after a metric's last in a run (0 for none); None, with a warning, where the store does not answer:
        a guess (0) would number a point as one already there."""
        try:
            return max(self.logged_steps(run_id, key, strict=True), default=-1) + 1
        except Exception as e:
            logger.warning("MLflow did not give the %s of run %s (%s); its point of this run is not logged", key,
                           run_id, type(e).__name__)
            return None

    def logged_steps(self, run_id, key, strict=False):
        """The steps at which a run holds a metric, or will once the calls queued for it are replayed; strict: the
        store's error raised where it does not answer, else taken as none (for a caller whose guess costs a point at
        most, not one that logs every point it lacks)."""
        try:
            history = self.client.get_metric_history(run_id, key)
        except Exception:
            if strict:
                raise
            history = []
        return {m.step for m in history} | self.queued_steps(run_id, key)

    def queued_steps(self, run_id, key):
        """The steps of a metric's points in the calls queued for a run (log_metrics': log_batch's metrics)."""
        return {m.step for _, args, kwargs in self.pending if args[:1] == (run_id,)
                for m in kwargs.get("metrics", ()) if m.key == key}

    def log_metrics(self, run_id, metrics, step):
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if is_number(v)]
        if batch:
            self._call(self.client.log_batch, run_id, metrics=batch)

    def log_artifact(self, run_id, path, artifact_path=None):
        self._call(self.client.log_artifact, run_id, str(path), artifact_path)

    def log_text(self, run_id, text, artifact_file):
        self._call(self.client.log_text, run_id, text, artifact_file)

    def set_tags(self, run_id, tags):
        for k, v in tags.items():
            self._call(self.client.set_tag, run_id, k, str(v))

    def set_status(self, run_id, status):
        """RUNNING, SCHEDULED, ...; queued like every call while the server is away."""
        self._call(self.client.update_run, run_id, status=status)

    def finish(self, run_id, status="FINISHED"):
        self._call(self.client.set_terminated, run_id, RunStatus.to_string(RunStatus.from_string(status)))

    def _call(self, fn, *args, **kwargs):
        """Run an MLflow call after any queued ones; queue it when the store does not answer."""
        self.flush()
        if self.pending:
            self.pending.append((fn, args, kwargs))
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # MLflow raises many kinds for an unreachable server
            if self._dropped(e, fn, args):
                return
            logger.warning("MLflow unreachable (%s); queueing, will retry", type(e).__name__)
            self.pending.append((fn, args, kwargs))
            self._wait_longer()

    def flush(self, force=False):
        """Replay queued calls in order; stop at the first that still fails (dropping those MLflow refuses, and one
        that keeps failing while the server answers: _fails_alone).

        Unless forced, a queue is replayed only after the retry interval: each attempt at a server
        that does not answer can cost a connection timeout, and the driver calls this often.
        """
        if self.pending and not force and time.monotonic() < self.retry_at:
            return False
        while self.pending:
            fn, args, kwargs = self.pending[0]
            try:
                fn(*args, **kwargs)
            except Exception as e:
                if not self._dropped(e, fn, args):
                    self._wait_longer()
                    return False
            self.pending.pop(0)
            self.answered_failures = 0  # of the next call now first
            self.retry_interval = RETRY_INTERVAL_S  # it answers again
        return True

    def _wait_longer(self):
        self.retry_at = time.monotonic() + self.retry_interval
        self.retry_interval = min(2 * self.retry_interval, MAX_RETRY_INTERVAL_S)

    def _dropped(self, e, fn, args):
        """Whether a failed call is dropped, not queued: any failure but a store that does not answer now (queued, a
        call that fails for good would hold back every call after it); said once per run refused or kind of failure,
        and counted."""
        if away(e) and not self._fails_alone(e):
            return False
        self.refused += 1
        run_id = args[0] if args else "?"
        if not (isinstance(e, MlflowException) and e.error_code in REFUSALS):
            self._failed(e, fn, run_id)
        elif run_id not in self.refused_runs:  # a run deleted meanwhile refuses every call: said once
            self.refused_runs.add(run_id)
            logger.warning("MLflow refused %s for run %s (%s); not retried, nor its run's later calls. `python -m "
                           "scaling.replay_mlflow %s` logs the study's measurements again from its Parquet files",
                           getattr(fn, "__name__", fn), run_id,
                           e.message.splitlines()[0] if e.message else e.error_code, self.output_dir)
        return True

    def _fails_alone(self, e):
        """Whether a call (the queue's first, or one about to be) that the server answered with a 5xx or 429 fails on
        its own: the server answers a cheap call now, and this is the ANSWERED_FAILURES-th time the call failed so.
        The cheap call is made only after such an answer: after a connection refused or timed out, it would wait as
        long again."""
        if not answered(e) or not self._answers():
            return False
        now = time.monotonic()
        if self.answered_failures and now - self.answered_at < RETRY_INTERVAL_S:  # a forced replay's retry at once
            return False
        self.answered_failures, self.answered_at = self.answered_failures + 1, now
        return self.answered_failures >= ANSWERED_FAILURES

    def _answers(self):
        """Whether the store answers a cheap call (the study's experiment) now."""
        try:
            self.client.get_experiment(self.experiment_id)
        except Exception:  # away, or refusing even that: the failed call may be no different from others
            return False
        return True

    def _failed(self, e, fn, run_id):
        """Warn of a call dropped for an error other than a refusal, once per call and kind of error (an artifact
        store the driver cannot write to fails every artifact alike)."""
        name = getattr(fn, "__name__", fn)
        kind = (name, type(e).__name__, getattr(e, "error_code", None))
        if kind in self.failures:
            return
        self.failures.add(kind)
        said = (str(e).strip().splitlines() or [""])[0]
        logger.warning("MLflow's %s for run %s failed (%s: %s), not for want of an answer: dropped, not retried (later "
                       "%s calls failing alike are not said)", name, run_id, type(e).__name__, shown_uri(said), name)


def away(e):
    """Whether an MLflow call's error says the store did not answer now (worth queueing the call and trying it again),
    rather than that the call fails for good; read through the errors it was raised from (MLflow's REST client wraps a
    refused connection in an MlflowException of code INTERNAL_ERROR, as it does a 4xx answer it cannot parse)."""
    errors = AWAY_ERRORS + tuple(getattr(sys.modules[module], name) for module, names in AWAY_ERRORS_OF.items()
                                 if module in sys.modules for name in names)
    for error in error_chain(e):
        if isinstance(error, errors) or getattr(error, "connection_invalidated", False):  # SQLAlchemy's: a lost link
            return True
        if isinstance(error, MlflowException) and error.error_code in AWAY_CODES:
            return True
        if _http_status(error) in AWAY_STATUSES:  # an artifact store's answer (MLflow's store retries its own)
            return True
    return False


def answered(e):
    """Whether an error that says the store is away is an answer the server gave (a 5xx that MLflow's retries ran out
    on, an artifact store's, the server's own error code), not a connection that failed or timed out, nor a rate limit
    (a hosted server limits writes apart from reads: the call is as good as the next, and waits)."""
    if rate_limited(e):
        return False
    for error in error_chain(e):
        if isinstance(error, requests.exceptions.RetryError) or _http_status(error) in AWAY_STATUSES:
            return True
        if isinstance(error, RestException) and error.error_code in AWAY_CODES:
            return True
    return False


def rate_limited(e):
    """Whether an MLflow call's error is a rate limit: a 429 (MLflow's retries of it ran out: urllib3 says "too many
    429 error responses"), or the server's REQUEST_LIMIT_EXCEEDED or RESOURCE_EXHAUSTED."""
    for error in error_chain(e):
        if _http_status(error) == 429 or "too many 429 error responses" in str(error):
            return True
        if isinstance(error, RestException) and error.error_code in ("REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"):
            return True
    return False


def error_chain(e):
    """e and the errors it was raised from or while handling, in turn."""
    seen = []
    while e is not None and not any(e is s for s in seen):
        seen.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return seen


def _http_status(error):
    """The HTTP status of an answer an error carries (requests' HTTPError, botocore's ClientError), or None."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # botocore's
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    else:
        status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def is_number(v):
    """Whether log_metrics logs a value: a number, not a bool, not NaN."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN is skipped


def client(uri):
    """An MlflowClient of uri; a tracking server gets short HTTP retries (HTTP_DEFAULTS)."""
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=uri)


def deleted_experiment(uri, name):
    """Why runs cannot be logged to experiment `name` at uri, as MLflow refuses runs in a deleted one; else None."""
    exp = client(uri).get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "deleted":
        return None
    return (f"MLflow's experiment {name!r} at {shown_uri(uri)} is deleted, and takes no runs: restore it "
            f"(MLFLOW_TRACKING_URI={shown_uri(uri)} mlflow experiments restore -x {exp.experiment_id}), or name "
            "another with tracking.experiment")


def _param_value(v):
    text = v if isinstance(v, str) else json.dumps(v)
    return text[:MAX_PARAM_LENGTH]


# MLflow's tracking stores by URI scheme (its store registry, mlflow.tracking._tracking_service.utils, is private):
# a plain path is a file store; a database's scheme may name its driver ("postgresql+psycopg2").
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
TRACKING_SCHEMES = ("", "file", "http", "https", "databricks", *DATABASE_SCHEMES)


# Seconds a database or tracking server may take to answer the check before launch; for a database, by the drivers'
# own keywords for it (a driver not named here waits as it always does).
CONNECT_TIMEOUT_S = 10
CONNECT_TIMEOUT_ARGS = {"psycopg": "connect_timeout", "psycopg2": "connect_timeout", "mysqldb": "connect_timeout",
                        "pymysql": "connect_timeout", "pyodbc": "timeout"}


def unreachable_database(uri):
    """Why the database store at uri cannot be opened (no driver, nothing answering), or None; no password shown."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        url = make_url(uri)
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:  # ValueError: a port that is not a number
        return f"not a database URI ({e})"
    shown = url.render_as_string(hide_password=True)
    engine = None
    try:
        timeout = CONNECT_TIMEOUT_ARGS.get(url.get_driver_name())
        given = timeout is None or timeout in url.query  # the URI's own timeout stands
        engine = sqlalchemy.create_engine(url, connect_args={} if given else {timeout: CONNECT_TIMEOUT_S})
        with engine.connect():
            pass
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]  # the driver's own words, one line
        return f"cannot open the database at {shown} ({reason})"
    finally:
        if engine is not None:
            engine.dispose()
    return None


def unreachable_server(uri):
    """Why no MLflow tracking server answers at uri as MLflow's client reaches it (its requests, with the credentials
    in uri or MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN, and its TLS settings: MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_SERVER_CERT_PATH, REQUESTS_CA_BUNDLE), or None; no password shown. Any HTTP answer will do: a
    proxy in front of the server may want other credentials even for /health."""
    import http.client
    import urllib.parse

    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:  # http.client's words for a port that is not a number, as the check said before it went through requests
        http.client.HTTPConnection(urllib.parse.urlsplit(uri).netloc.rpartition("@")[2])
    except (http.client.InvalidURL, ValueError) as e:
        return str(e)
    try:
        http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, timeout=CONNECT_TIMEOUT_S,
                     raise_on_status=False)
    except Exception as e:  # MLflow's, naming the URL with its password: the error at the bottom says why
        reason = str(error_chain(e)[-1]).strip() or type(error_chain(e)[-1]).__name__
        password = urllib.parse.urlsplit(uri).password
        return shown_uri(reason.replace(password, "***") if password else reason)
    return None


def store_scheme(uri):
    """A tracking URI's scheme in lower case, its driver left out ('postgresql+psycopg' -> 'postgresql'); '' if none."""
    if uri.lower() == "databricks":  # the workspace of the default profile, as MLflow reads the bare word
        return "databricks"
    return uri.split(":", 1)[0].split("+", 1)[0].lower() if re.match(r"[A-Za-z][\w+.-]*:", uri) else ""


def unsupported_store(uri):
    """Why MLflow has no tracking store for uri, or None when it has one."""
    scheme = store_scheme(uri)
    if scheme in ("", "file") and not MLFLOW_ALLOW_FILE_STORE.get():
        # MLflow 3 raises for a file store at the first call (the driver's, after Ray's start) unless let.
        return (f"MLflow no longer logs to a file store ({uri}) unless MLFLOW_ALLOW_FILE_STORE=true; use "
                f"sqlite:////absolute/path/mlflow.db (`mlflow migrate-filestore` moves a file store's runs there)")
    if scheme in TRACKING_SCHEMES:
        return None
    return (f"MLflow has no tracking store for {uri!r}; use http(s)://host:port, sqlite:///path or a database URI "
            f"({', '.join(DATABASE_SCHEMES)})")
