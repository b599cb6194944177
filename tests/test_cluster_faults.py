"""Faults around a running study, for real: a Ray node lost mid-trial, an MLflow tracking server outage.

Both start their own Ray instances in a private temp dir (conftest) on free ports, so other Ray users on
the machine neither see them nor get torn down with them.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from scaling.replay_mlflow import main as replay_main
from scaling.results import load_results
from scaling.tracking import HTTP_DEFAULTS
from test_run import REPO, mlflow_runs, write_study

LOG_EVERY = 10
NO_MEMORY = 512 * 2 ** 10  # below the 1 MiB token of memory each Tune trial actor reserves (scaling.run)


def free_ports(n):
    """n distinct TCP ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def fault_study(tmp_path, milestones, resources, extra=""):
    """One DiT-P/4 trial without FID, logging every LOG_EVERY steps, checkpointing every 20."""
    study, out = write_study(tmp_path, steps=milestones, fid=False, extra=extra)
    text = study.read_text()
    for old, new in (("patch: [2, 4]", "patch: [4]"), ("log_every: 5", f"log_every: {LOG_EVERY}"),
                     ("ckpt_every: 10", "ckpt_every: 20"),
                     ("resources: {workers_per_trial: 1, cpus_per_worker: 1}", f"resources: {resources}")):
        assert old in text
        text = text.replace(old, new)
    study.write_text(text)
    return study, out


def start_study(args, log):
    """`python -m scaling.run ARGS` in the background, its output into the file log."""
    return subprocess.Popen([sys.executable, "-m", "scaling.run", *map(str, args)], cwd=REPO,
                            env={**os.environ, "RAY_DEDUP_LOGS": "0"}, stdout=log, stderr=subprocess.STDOUT)


def rows(out):
    """results.parquet as a DataFrame (empty before the first milestone)."""
    return load_results(out) if (out / "results.parquet").exists() else pd.DataFrame()


def wait_for_rows(out, n, proc, timeout):
    """Wait until results.parquet holds n rows; fail if the study ends or the time runs out first."""
    deadline = time.time() + timeout
    while len(rows(out)) < n:
        assert proc.poll() is None, f"the study exited ({proc.returncode}) before {n} rows"
        assert time.time() < deadline, f"fewer than {n} rows after {timeout} s"
        time.sleep(0.2)


def finish(proc, log, timeout):
    """Wait for the study to exit; its return code and output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        stop(proc)
    return proc.returncode, Path(log.name).read_text()


def stop(proc):
    """Kill a study's driver if it still runs."""
    if proc.poll() is None:
        # The driver alone, not its process group: Ray's reaper in that group then stops the Ray it started.
        proc.kill()
        proc.wait()


def assert_complete(out, client, parents, children, milestones):
    """One ok row per milestone, one parent and one child run, and a gapless train_loss history."""
    df = load_results(out)
    assert sorted(df.step) == list(milestones) and (df.status == "ok").all()
    assert len(parents) == 1 and len(children) == 1
    child = children[0]
    assert set(df.mlflow_run_id) == {child.info.run_id}
    assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    # Every logged step exactly once, in order, to the end: steps a restarted trial repeated
    # (or reported while MLflow was away) are neither duplicated nor lost.
    history = client.get_metric_history(child.info.run_id, "train_loss")
    steps = [m.step for m in history]
    assert steps == list(range(LOG_EVERY, milestones[-1] + 1, LOG_EVERY))
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_loss")) == list(milestones)
    curves = pd.read_parquet(out / "loss_curves.parquet").sort_values("step")
    # MLflow keeps a repeated step's first report and Parquet its last: a resumed trial repeats the same values.
    assert list(curves.step) == steps and list(curves.train_loss) == [m.value for m in history]


@pytest.fixture
def cluster():
    """A Ray cluster object with no nodes yet; every node it starts is stopped afterwards."""
    from ray.cluster_utils import Cluster

    c = Cluster(shutdown_at_exit=True)
    yield c
    c.shutdown()


def start_head(cluster):
    """A head node that holds no part of a trial (no CPU, too little memory for a trial actor), its
    dashboard on 127.0.0.1 and every listening port a free one."""
    gcs, dashboard, agent, metrics, runtime_env, client = free_ports(6)
    # The dashboard stays on: Ray Train's placement-group cleaner asks its state API whether a dead
    # trial controller is gone, and without it a lost controller's CPUs are never given back.
    return cluster.add_node(num_cpus=0, memory=NO_MEMORY, gcs_server_port=gcs, include_dashboard=True,
                            dashboard_host="127.0.0.1", dashboard_port=dashboard, dashboard_agent_listen_port=agent,
                            metrics_export_port=metrics, runtime_env_agent_port=runtime_env,
                            ray_client_server_port=client)


def actors_of(cluster, class_name):
    """The node ids of class_name's actors, alive and dead."""
    return [(a["Address"]["NodeID"], a["State"]) for a in cluster.global_state.actor_table(None).values()
            if a["ActorClassName"] == class_name]


def remove_when(cluster, node, out, n, proc, milestones):
    """Remove node once results.parquet holds n rows, while the trial still has milestones to go."""
    wait_for_rows(out, n, proc, timeout=400)
    cluster.remove_node(node)
    assert len(rows(out)) < len(milestones)  # the trial was still running when its node went


def alive(cluster, class_name):
    """The sorted node ids of class_name's live actors."""
    return sorted(n for n, s in actors_of(cluster, class_name) if s == "ALIVE")


# One study loses two nodes: first one that holds only one of the trial's two Ray Train workers
# (Train restarts its worker group), then the one that holds the other worker together with the
# trial's Tune actor and its Train controller (Tune reruns the trial). Node memory pins the
# placement: a node offering less memory than the trial actor's token cannot hold it, while Train
# workers only ask for a CPU; the head node offers neither.
def test_node_losses_restart_the_trial_from_its_checkpoint(tmp_path, cluster):
    """Nodes die after the first and the second milestone: the study still measures every milestone once."""
    milestones = (20, 60, 300)
    start_head(cluster)
    trial_node = cluster.add_node(num_cpus=1)
    worker_node = cluster.add_node(num_cpus=1, memory=NO_MEMORY)
    study, out = fault_study(tmp_path, milestones,
                             "{workers_per_trial: 2, cpus_per_worker: 1, max_failures: 2}")
    with open(tmp_path / "study.log", "w") as log:
        proc = start_study([study, "--address", cluster.address, "--no-report"], log)
        try:
            wait_for_rows(out, 1, proc, timeout=400)
            # Two 1-CPU workers on the two 1-CPU nodes; the trial's actor (its Train controller runs in it) on the
            # one with memory.
            assert alive(cluster, "RayTrainWorker") == sorted([trial_node.node_id, worker_node.node_id])
            assert alive(cluster, "ImplicitFunc") == [trial_node.node_id] and alive(cluster, "TrainController") == []
            remove_when(cluster, worker_node, out, 1, proc, milestones)
            # A fresh node in its place each time: the restarted trial needs its two CPUs again.
            fresh_worker_node = cluster.add_node(num_cpus=1, memory=NO_MEMORY)
            remove_when(cluster, trial_node, out, 2, proc, milestones)
            fresh_trial_node = cluster.add_node(num_cpus=1)
        except BaseException:
            stop(proc)
            raise
        rc, output = finish(proc, log, timeout=400)
    assert rc == 0, output[-4000:]
    assert_complete(out, *mlflow_runs(out), milestones)
    # The worker group started three times: on the first two nodes, on the two left after the first
    # loss, on the two left after the second. The trial actor was replaced once, on the fresh node.
    workers = sorted(n for n, _ in actors_of(cluster, "RayTrainWorker"))
    assert workers == sorted([trial_node.node_id, worker_node.node_id, trial_node.node_id,
                              fresh_worker_node.node_id, fresh_worker_node.node_id, fresh_trial_node.node_id])
    trial_actors = sorted(n for n, _ in actors_of(cluster, "ImplicitFunc"))
    assert trial_actors == sorted([trial_node.node_id, fresh_trial_node.node_id])


def test_a_file_a_node_does_not_see_is_named_before_launch(tmp_path, cluster, monkeypatch):
    # A multi-node study whose output lay on one node's disk launched and failed its trials one by one (Ray Train's
    # own storage check, at each trial's start); data or eval files a node lacks failed a trial only when it read them.
    # These nodes share one file system: a file removed after the study read it stands for one a node does not see.
    import shutil

    import ray

    from scaling import run as scaling_run
    from scaling.study import StudyError
    from test_study import load

    start_head(cluster)
    cluster.add_node(num_cpus=1)
    held, out = tmp_path / "held" / "a", tmp_path / "out"
    held.mkdir(parents=True)
    (held / "0.png").write_bytes(b"")
    (held / "1.png").write_bytes(b"")  # FID's statistics need two
    out.mkdir()
    study = load(tmp_path, overrides=[f"output={out}", f"eval.heldout={held.parent}"])
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        scaling_run.check_shared_storage(study)  # every node sees the output and the held-out images
        assert list(out.iterdir()) == []  # its marker file is gone
        shutil.rmtree(held.parent)
        with pytest.raises(StudyError) as err:
            scaling_run.check_shared_storage(study)
    finally:
        ray.shutdown()
    assert re.fullmatch(
        rf"{re.escape(str(study.path))}: node \S+ \(id \w{{12}}\) \(and 1 more node\(s\)\) does not see eval.heldout "
        rf"\({re.escape(str(held.parent))}\): every node of a multi-node study must see the study's files at the same "
        rf"path \(shared storage\), as Ray keeps the trials' checkpoints under {re.escape(str(out / 'ray'))}",
        str(err.value)), str(err.value)
    assert list(out.iterdir()) == []

    # FID in Inception's features from torch-fidelity's cache: the trials read the driver's cached file (a node's own
    # $TORCH_HOME may hold none), which every node must see. It was checked on the driver alone, and a node without
    # it failed each trial at its first milestone, after training.
    from core.fid import URL_INCEPTION_V3

    torch_home = tmp_path / "torch-home"
    cached = torch_home / "hub" / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"stands for the weights")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    study = load(tmp_path, overrides=[f"output={out}", "eval.feature_extractor=inception-v3-compat"], check_data=False)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        scaling_run.check_shared_storage(study)
        cached.unlink()
        with pytest.raises(StudyError) as err:
            scaling_run.check_shared_storage(study)
    finally:
        ray.shutdown()
    assert f"does not see Inception-v3's weights in torch-fidelity's cache ({cached})" in str(err.value)


def start_mlflow(port, store, log):
    """`mlflow server` on 127.0.0.1:port over a SQLite store in store; returns once it answers."""
    proc = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", (store / "artifacts").as_uri()],
        # Without its job runner (unused here) it starts in a quarter of the time on a busy machine.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # its own group: it forks workers
    deadline = time.time() + 180
    try:
        while not mlflow_answers(port):
            assert proc.poll() is None, f"mlflow server exited with {proc.returncode}"
            assert time.time() < deadline, "mlflow server did not answer within 180 s"
            time.sleep(0.2)
    except BaseException:
        stop_mlflow(proc)
        raise
    return proc


def mlflow_answers(port):
    """Whether the tracking server on port answers its health check."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def mlflow_http_runs(uri):
    """(client, parent runs, child runs) of the study "tiny" on a tracking server."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def mlflow_statuses(uri):
    """[parent status, child status] of the study's single trial."""
    _, parents, children = mlflow_http_runs(uri)
    return [parents[0].info.status, children[0].info.status]


def stop_mlflow(proc):
    """Stop a tracking server and the workers it forked."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_mlflow_outage_is_queued_and_replayed(tmp_path, monkeypatch, capsys):
    """The tracking server goes away mid-study and comes back: training never waits, MLflow gets every point."""
    for key, value in HTTP_DEFAULTS.items():  # what the driver uses; set here so the test's own env is restored
        monkeypatch.setenv(key, value)
    milestones = (10, 150, 1000)  # 150 is reached during the outage; training to 1000 usually outlasts it
    port, = free_ports(1)
    uri = f"http://127.0.0.1:{port}"
    store = tmp_path / "mlflow-server"
    store.mkdir()
    study, out = fault_study(tmp_path, milestones, "{workers_per_trial: 1, cpus_per_worker: 1}",
                             extra=f"tracking: {{mlflow_uri: '{uri}'}}\n")
    server_log = open(tmp_path / "mlflow.log", "a")
    servers = [start_mlflow(port, store, server_log)]
    try:
        with open(tmp_path / "study.log", "w") as log:
            proc = start_study([study, "--no-report"], log)
            try:
                wait_for_rows(out, 1, proc, timeout=400)
                stop_mlflow(servers[0])
                down_at = time.time()
                assert not mlflow_answers(port)
                # The server stays away until the next milestone is in Parquet: a driver that waited on
                # MLflow would never get there. Then a restart (10-40 s here); the trial trains on meanwhile.
                # (On a busy machine the trial can reach 150 while the server shuts down: then the
                # milestone after it, the last, is the one recorded while MLflow is away.)
                wait_for_rows(out, len(rows(out)) + 1, proc, timeout=400)
                servers.append(start_mlflow(port, store, server_log))
                up_at = time.time()
            except BaseException:
                stop(proc)
                raise
            rc, output = finish(proc, log, timeout=400)
        assert rc == 0, output[-4000:]
        written = load_results(out).timestamp.map(lambda t: t.timestamp())
        assert ((written > down_at) & (written < up_at)).any(), "no milestone recorded while MLflow was away"

        # A restart can outlast the rest of the trial on a busy machine: then the driver says what it
        # could not log, and the documented replay logs it from Parquet. Otherwise its queue did.
        ended_first = re.search(r"(\d+) calls not logged \(MLflow did not answer\)", output)
        if not ended_first:
            assert mlflow_statuses(uri) == ["FINISHED", "FINISHED"]
        capsys.readouterr()
        # `python -m scaling.replay_mlflow OUT`, in this process: a second interpreter would spend
        # most of the time importing.
        assert replay_main([str(out)]) == 0
        logged = int(re.search(r"logged (\d+) missing measurements", capsys.readouterr().out).group(1))
        assert (logged > 0) if ended_first else (logged == 0)
        client, parents, children = mlflow_http_runs(uri)
        assert_complete(out, client, parents, children, milestones)
        # The trial's overhead too, which the driver logs last (its teardown, once the slot is free).
        df = load_results(out)
        for key in ("startup_s", "teardown_s"):
            assert df[key].notna().all() and df[key].nunique() == 1
            assert children[0].data.metrics[key] == pytest.approx(df[key].iloc[0], rel=1e-9)
        # Closed by the driver, or else by the replay, which closes what the driver could not.
        assert mlflow_statuses(uri) == ["FINISHED", "FINISHED"]
    finally:
        for server in servers:
            stop_mlflow(server)
        server_log.close()
