"""A study on an autoscaling cluster: checked and packed against what the autoscaler may add, not the nodes up now.

The cluster is real: a head node started with an autoscaling config, whose autoscaler (Ray's v1 monitor, with Ray's
fake multi-node provider) adds worker nodes as processes on this machine when a trial asks for one.
"""
import json
import os
import signal
import time
from pathlib import Path

import pytest
import ray
from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

from scaling.autoscaler_limits import (UNLIMITED, AutoscalerLimits, autoscaler_limits, grown, limits_of_config,
                                      v1_autoscales)
from scaling.results import load_results
from scaling.run import check_capacity
from scaling.study import StudyError, check_cluster, load_study, max_concurrent_trials, workers_per_node
from test_cluster_faults import fault_study, finish, free_ports, start_study


def autoscaling_config(gcs_address, worker_cpus, worker_gpus=0):
    """A fake multi-node cluster: a head node and one node type of worker_cpus CPUs (and worker_gpus GPUs, which
    Ray counts without any being there), none up, at most one."""
    return {
        "cluster_name": "fake_multinode", "max_workers": 1,
        # gcs_address: the provider's nodes join this head (it assumes port 6379 otherwise).
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "ray.worker.big": {"resources": {"CPU": worker_cpus, "object_store_memory": 100 * 2 ** 20,
                                             **({"GPU": worker_gpus} if worker_gpus else {})},
                               "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,  # the node stays for the test to see it
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [],
    }


def kill_processes_of(folder):
    """SIGKILL every process whose command line names folder, a Ray instance's temp dir: a node's raylet and log monitor
    (its agents and workers rename themselves, and exit with their raylet)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if folder.encode() in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):  # gone meanwhile
            pass


def wait_for_autoscaler(address, timeout=60):
    """Wait until the cluster's autoscaler has published its first status (its monitor starts with the head)."""
    ray.init(address=address, log_to_driver=False)
    try:
        deadline = time.time() + timeout
        while autoscaler_limits() is None:
            assert time.time() < deadline, f"no autoscaler status after {timeout} s"
            time.sleep(0.5)
    finally:
        ray.shutdown()


@pytest.fixture
def autoscaling_head(tmp_path, monkeypatch, _private_ray):
    """The address of a one-CPU head node whose autoscaler may add one node of 2 CPUs."""
    yield from start_autoscaling_head(tmp_path, monkeypatch, _private_ray, worker_cpus=2)


@pytest.fixture
def gpu_autoscaling_head(tmp_path, monkeypatch, _private_ray):
    """The address of a one-CPU head node, no GPU, whose autoscaler may add one node of 3 CPUs and 2 GPUs."""
    yield from start_autoscaling_head(tmp_path, monkeypatch, _private_ray, worker_cpus=3, worker_gpus=2)


def start_autoscaling_head(tmp_path, monkeypatch, private_ray, worker_cpus, worker_gpus=0):
    """Start a one-CPU head node with a fake autoscaler, yield its address, and stop it with every node it added."""
    from ray.cluster_utils import Cluster

    gcs, dashboard, agent, metrics, runtime_env, client = free_ports(6)
    address = f"{ray.util.get_node_ip_address()}:{gcs}"
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(address, worker_cpus, worker_gpus)))
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")  # the fake provider runs only in such a cluster
    monkeypatch.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=1, autoscaling_config=str(config), gcs_server_port=gcs,
                         include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard,
                         dashboard_agent_listen_port=agent, metrics_export_port=metrics,
                         runtime_env_agent_port=runtime_env, ray_client_server_port=client)
        wait_for_autoscaler(address)
        yield address
    finally:
        cluster.shutdown()
        kill_processes_of(private_ray)  # the nodes the autoscaler started, which are its monitor's, not the cluster's


def test_a_study_needing_a_node_the_autoscaler_adds_runs_on_it(tmp_path, autoscaling_head):
    # The cluster has 1 CPU now and a trial's worker needs 2: a fixed cluster refuses the study before launch, and
    # this one was refused too ("the cluster has 1"), though its autoscaler would add a node of 2 CPUs for it.
    study, out = fault_study(tmp_path, (10,), "{workers_per_trial: 1, cpus_per_worker: 2}")
    with open(tmp_path / "study.log", "w") as log:
        code, text = finish(start_study([study, "--address", autoscaling_head, "--no-report"], log), log, 300)
    assert code == 0, text
    # Autoscaler v1 publishes no limits: the check against the nodes up warns, and the trials are packed into what is
    # up now (one at a time here).
    assert (f"warning: {study}:6: resources.cpus_per_worker: a trial needs 1 × 2 = 2 CPUs, the cluster has 1; the "
            "cluster autoscales, and its autoscaler does not publish what it may add: the study goes on, its trials "
            "waiting for nodes that hold them (for ever if none is added)") in text
    assert ("note: the cluster autoscales, and its autoscaler does not publish what it may add: the nodes up hold "
            "none of the study's trials, so 1 runs at once, its wait asking the autoscaler for a node; for more at "
            "once, set resources.max_concurrent_trials to the trials the cluster holds at its largest (the trials a "
            "node it adds holds, times the nodes it may add)") in text
    df = load_results(out)
    assert list(df.step) == [10] and (df.status == "ok").all()
    ray.init(address=autoscaling_head, log_to_driver=False)
    try:
        assert sorted(n["Resources"]["CPU"] for n in ray.nodes() if n["Alive"]) == [1.0, 2.0]  # the node added
        assert autoscaler_limits() == AutoscalerLimits()  # runs, limits unknown
    finally:
        ray.shutdown()


def test_a_gpu_encode_waits_for_the_gpu_node_the_autoscaler_adds(tmp_path, gpu_autoscaling_head):
    # No GPU is up: the encode's pool starts with one VAE copy, whose GPU the autoscaler adds a node for (2 GPUs);
    # the pool may grow to a copy per GPU while images wait for one (scaling.encode_latents.vae_workers: Ray Data's
    # autoscaling pool; here the loading of the images is the slower part, and one copy keeps up). The fake GPUs are
    # Ray's count only: the copy runs on the CPU (scaling.encode_latents._Encode), as other tests' CPU copies do.
    from scaling.encode_latents import encode_folder
    from test_data import make_folder, save_tiny_vae

    images = make_folder(tmp_path / "images", sizes=[(16, 16)] * 12, classes=("a", "b"))
    save_tiny_vae(tmp_path / "vae")
    ray.init(address=gpu_autoscaling_head, log_to_driver=False)
    try:
        encode_folder(images, tmp_path / "vae", tmp_path / "latents", 16, batch_size=2, shard_size=8, device="gpu")
        gpus = sorted(n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"])
    finally:
        ray.shutdown()
    assert gpus == [0, 2.0]  # the node added
    meta = json.loads((tmp_path / "latents" / "meta.json").read_text())
    assert (meta["num_images"], meta["classes"], [s["num_images"] for s in meta["shards"]]) == (24, ["a", "b"], [8] * 3)


def test_a_readonly_monitors_status_is_no_autoscaler():
    # Every head node runs autoscaler v1's monitor; with nothing to scale it names each node's type after the node.
    now = 1.8e9
    readonly = {"time": now, "autoscaler_report": {"node_type_mapping": {"fb73a6": "node_fb73a6"}}}
    scaling = {"time": now, "autoscaler_report": {"node_type_mapping": {"fb73a6": "ray.head.default",
                                                                        "ff0001": "ray.worker.big"}}}
    assert not v1_autoscales(json.dumps(readonly).encode(), now)
    assert v1_autoscales(json.dumps(scaling).encode(), now)
    assert not v1_autoscales(json.dumps(scaling).encode(), now + 600)  # left by an autoscaler that stopped
    assert not v1_autoscales(json.dumps({"time": now}).encode(), now)  # its first updates: no report yet
    assert not v1_autoscales(None)


def v2_config(max_resources=None):
    """A cluster config (as a later Ray's autoscaler publishes it): a fixed head, up to 4 GPU nodes of 8 CPUs and 1 GPU
    each, any number of 16-CPU nodes."""
    return ClusterConfig(node_group_configs=[
        NodeGroupConfig(name="head", resources={"CPU": 4}, min_count=1, max_count=1),
        NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, min_count=0, max_count=4),
        NodeGroupConfig(name="cpu", resources={"CPU": 16}, min_count=0, max_count=-1),
    ], max_resources=max_resources or {})


def test_limits_of_an_autoscaler_v2_config():
    limits = limits_of_config(v2_config())
    assert limits.node_types == [{"CPU": 4.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 16.0}]
    assert limits.max_resources == {"CPU": UNLIMITED, "GPU": 4}  # Ray's sum: 4 nodes of 1 GPU, CPUs without limit
    assert limits.node_counts == [1, 4, UNLIMITED]
    # The cluster's own cap, also over a node type without a limit.
    assert limits_of_config(v2_config({"GPU": 3, "CPU": 100})).max_resources == {"CPU": 100, "GPU": 3}
    # The cluster now (a head and one GPU node, 2 of its GPUs taken elsewhere: totals count) grows to the limit.
    assert grown({"CPU": 12.0, "GPU": 1.0, "memory": 1e9}, limits) == {"CPU": float(UNLIMITED), "GPU": 4.0,
                                                                      "memory": 1e9}
    # Node types that cannot be added (each at its count, or none): no autoscaling, the cluster is what is up.
    fixed = ClusterConfig(node_group_configs=[NodeGroupConfig(name="gpu", resources={"GPU": 8}, min_count=2,
                                                              max_count=2),
                                              NodeGroupConfig(name="off", resources={"CPU": 8}, max_count=0)])
    assert limits_of_config(fixed) is None and limits_of_config(None) is None
    assert grown({"CPU": 2.0}, AutoscalerLimits()) == {"CPU": 2.0}  # v1: nothing known beyond now


def test_an_autoscaled_cluster_is_checked_against_its_limits(tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\ndata: {dataset: digits}\nsweep: {model: [DiT-P], patch: [4], "
                                     "steps: [10]}\nresources: {workers_per_trial: 8, gpus_per_worker: 1}\n")
    study = load_study(tmp_path / "s.yaml")
    limits = limits_of_config(v2_config())
    now = {"CPU": 4.0}  # the head alone: no GPU up yet
    with pytest.raises(StudyError) as err:
        check_cluster(study, grown(now, limits), [now] + limits.node_types, autoscaled=True,
                      counts=[1] + limits.node_counts)
    assert str(err.value) == (f"{study.path}:4: resources.gpus_per_worker: a trial needs 8 × 1 = 8 GPUs, the cluster "
                              f"grows to at most 4 with what its autoscaler may add")
    study = load_study(tmp_path / "s.yaml", overrides=["resources.workers_per_trial=4"])
    check_cluster(study, grown(now, limits), [now] + limits.node_types, autoscaled=True,
                  counts=[1] + limits.node_counts)  # 4 GPU nodes to come
    # Packed into what the cluster may grow to: as many one-GPU trials at once as its GPU nodes hold, not the one
    # trial (no GPU up) that the head alone gave.
    one_gpu = load_study(tmp_path / "s.yaml", overrides=["resources.workers_per_trial=1"])
    assert max_concurrent_trials(one_gpu, grown(now, limits)) == 4 and max_concurrent_trials(one_gpu, now) == 1
    assert max_concurrent_trials(one_gpu, grown(now, limits), [now] + limits.node_types, [1] + limits.node_counts) == 4
    study = load_study(tmp_path / "s.yaml", overrides=["resources.workers_per_trial=1",
                                                       "resources.cpus_per_worker=12"])
    with pytest.raises(StudyError) as err:  # any number of CPUs, but no node type with 12 beside a GPU
        check_cluster(study, grown(now, limits), [now] + limits.node_types, autoscaled=True,
                      counts=[1] + limits.node_counts)
    assert str(err.value).endswith("resources.cpus_per_worker: a worker needs 12 CPUs and 1 GPUs on one node; the "
                                   "cluster's nodes and the node types its autoscaler adds have 16 CPUs and 0 GPUs, "
                                   "4 CPUs and 0 GPUs, 8 CPUs and 1 GPUs")


def test_autoscaler_v2_read_only_is_no_autoscaler(monkeypatch):
    # The flag is set by any head started with RAY_enable_autoscaler_v2=1, also with nothing to scale: a fixed cluster
    # keeps its refusal. Nodes an autoscaler launches carry their node type's name (RAY_NODE_TYPE_NAME, which Ray's
    # providers set for them).
    monkeypatch.setenv("RAY_enable_autoscaler_v2", "1")
    for type_name, expected in ((None, None), ("gpu-group", AutoscalerLimits())):
        if type_name:
            monkeypatch.setenv("RAY_NODE_TYPE_NAME", type_name)
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        try:
            assert autoscaler_limits() == expected
        finally:
            ray.shutdown()


def test_a_cluster_config_in_the_gcs_sets_the_check_and_the_packing(tmp_path, monkeypatch):
    # A Ray whose GCS says autoscaler v2 runs and launched its node, and then holds a cluster config, written with the
    # GCS client's own call, as an autoscaler that publishes one writes it.
    from ray._raylet import GcsClient

    monkeypatch.setenv("RAY_enable_autoscaler_v2", "1")
    monkeypatch.setenv("RAY_NODE_TYPE_NAME", "head-group")
    (tmp_path / "s.yaml").write_text("name: s\ndata: {dataset: digits}\nsweep: {model: [DiT-P], patch: [4], "
                                     "steps: [10]}\nresources: {workers_per_trial: 1, gpus_per_worker: 1}\n")
    one_gpu = load_study(tmp_path / "s.yaml")
    eight_gpus = load_study(tmp_path / "s.yaml", overrides=["resources.workers_per_trial=8"])
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert autoscaler_limits() == AutoscalerLimits()  # it runs, its limits unknown: the nodes up, with a warning
        unsaid = check_capacity(one_gpu)
        assert unsaid.resources["CPU"] == 1.0 and unsaid.unsaid_nodes  # the data's copies: as many as run at once
        GcsClient(address=ray.get_runtime_context().gcs_address).report_cluster_config(
            v2_config().SerializeToString())
        assert autoscaler_limits() == limits_of_config(v2_config())
        with pytest.raises(StudyError, match="the cluster has 0$"):  # a study's own local Ray never autoscales
            check_capacity(one_gpu, local=True)
        capacity = check_capacity(one_gpu)  # no GPU up: the GPU nodes to come
        assert capacity.resources["GPU"] == 4.0 and max_concurrent_trials(one_gpu, *capacity[:3]) == 4
        assert workers_per_node(one_gpu, capacity.nodes, 4) == 1  # the nodes to come hold one each: one data copy
        # The four GPU nodes to come, two trials of two workers; the CPU nodes (any number) hold none of them.
        two = load_study(tmp_path / "s.yaml", overrides=["resources.workers_per_trial=2"])
        assert max_concurrent_trials(two, *check_capacity(two)[:3]) == 2
        with pytest.raises(StudyError, match="a trial needs 8 × 1 = 8 GPUs, the cluster grows to at most 4 "):
            check_capacity(eight_gpus)
        # A config whose node types can add none: the cluster is what is up (0 GPUs), refused whatever the flag says.
        fixed = ClusterConfig(node_group_configs=[NodeGroupConfig(name="head", resources={"CPU": 1}, min_count=1,
                                                                  max_count=1)])
        GcsClient(address=ray.get_runtime_context().gcs_address).report_cluster_config(fixed.SerializeToString())
        assert autoscaler_limits() is None
        with pytest.raises(StudyError, match="a trial needs 1 × 1 = 1 GPUs, the cluster has 0$"):
            check_capacity(one_gpu)
    finally:
        ray.shutdown()


def test_resources_other_work_holds_on_a_shared_cluster_are_noted(tmp_path, capsys):
    # Trials are packed into the cluster's resources; on a cluster shared with other jobs, those beyond what is free
    # waited in Ray Train's placement retries, unsaid, their wait counted as start-up.
    from ray.util.placement_group import placement_group, remove_placement_group

    (tmp_path / "s.yaml").write_text("name: s\ndata: {dataset: digits}\nsweep: {model: [DiT-P], patch: [4], "
                                     "steps: [10]}\nresources: {workers_per_trial: 1, cpus_per_worker: 1}\n")
    study = load_study(tmp_path / "s.yaml")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        check_capacity(study)
        assert "other work" not in capsys.readouterr().err
        held = placement_group([{"CPU": 2}])  # another job's
        ray.get(held.ready(), timeout=60)
        assert max_concurrent_trials(study, *check_capacity(study)[:3]) == 3
        assert capsys.readouterr().err == ("note: other work on the cluster holds 2 of its 3 CPUs now: 3 trial(s) at "
                                           "once, of which 1 fit in what is free; the others wait for it "
                                           "(resources.max_concurrent_trials sets fewer)\n")
        check_capacity(study, local=True)  # a study's own Ray: nothing else runs there
        assert capsys.readouterr().err == ""
        remove_placement_group(held)
    finally:
        ray.shutdown()


def made_up_cluster(monkeypatch, nodes, limits):
    """check_capacity's view of a cluster of these nodes (their resources), none of it held by other work, whose
    autoscaler_limits() are limits: no Ray started."""
    import scaling.autoscaler_limits

    totals = {r: sum(node.get(r, 0.0) for node in nodes) for r in ("CPU", "GPU")}
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(totals))
    monkeypatch.setattr(ray, "available_resources", lambda: dict(totals))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": node} for node in nodes])
    monkeypatch.setattr(scaling.autoscaler_limits, "autoscaler_limits", lambda: limits)


def test_the_note_of_an_autoscaler_that_does_not_say_is_true_of_the_nodes_up(tmp_path, monkeypatch, capsys):
    # A head alone holds no GPU trial: the note said "1 trial(s) at once, what the nodes up hold".
    (tmp_path / "s.yaml").write_text("name: s\ndata: {dataset: digits}\nsweep: {model: [DiT-P], patch: [4], "
                                     "steps: [10]}\nresources: {workers_per_trial: 1, gpus_per_worker: 1, "
                                     "cpus_per_worker: 12}\n")
    study = load_study(tmp_path / "s.yaml")
    unpublished = "note: the cluster autoscales, and its autoscaler does not publish what it may add: "
    made_up_cluster(monkeypatch, [{"CPU": 64.0}], AutoscalerLimits())
    assert max_concurrent_trials(study, *check_capacity(study)[:3]) == 1  # the rule stands: one, asking for a node
    assert capsys.readouterr().err.splitlines()[1] == (
        f"{unpublished}the nodes up hold none of the study's trials, so 1 runs at once, its wait asking the "
        "autoscaler for a node; for more at once, set resources.max_concurrent_trials to the trials the cluster holds "
        "at its largest (the trials a node it adds holds, times the nodes it may add)")
    made_up_cluster(monkeypatch, [{"CPU": 64.0}, {"CPU": 96.0, "GPU": 8.0}], AutoscalerLimits())
    assert max_concurrent_trials(study, *check_capacity(study)[:3]) == 8
    assert capsys.readouterr().err == (
        f"{unpublished}8 trial(s) at once, what the nodes up hold; for more, set resources.max_concurrent_trials to "
        "the trials the cluster holds at its largest (e.g. 8 for each node like one up of 96 CPUs and 8 GPUs)\n")
    four = load_study(tmp_path / "s.yaml", overrides=["resources.workers_per_trial=16"])  # two such nodes a trial
    made_up_cluster(monkeypatch, [{"CPU": 64.0}] + [{"CPU": 96.0, "GPU": 8.0}] * 2, AutoscalerLimits())
    check_capacity(four)
    assert capsys.readouterr().err == (
        f"{unpublished}1 trial(s) at once, what the nodes up hold; for more, set resources.max_concurrent_trials to "
        "the trials the cluster holds at its largest (e.g. the workers its nodes hold ÷ 16, a node like one up of "
        "96 CPUs and 8 GPUs holding 8)\n")


def test_more_trials_at_once_than_a_fixed_cluster_holds_are_a_warning(tmp_path, monkeypatch, capsys):
    # An explicit max_concurrent_trials was used as given, unsaid: on 2 CPUs, 8 one-CPU trials launched, 6 of them
    # waiting in Ray's placement with their Tune actors and Train controllers, their wait counted as start-up.
    (tmp_path / "s.yaml").write_text("name: s\ndata: {dataset: digits}\nsweep: {model: [DiT-P], patch: [4], "
                                     "steps: [10]}\nresources: {workers_per_trial: 1, cpus_per_worker: 1, "
                                     "max_concurrent_trials: 8}\n")
    study = load_study(tmp_path / "s.yaml")
    made_up_cluster(monkeypatch, [{"CPU": 1.0}, {"CPU": 1.0}], None)
    assert max_concurrent_trials(study, *check_capacity(study)[:3]) == 8  # kept: nodes may join by hand
    assert capsys.readouterr().err == (
        f"warning: {study.path}:4: resources.max_concurrent_trials: 8 trials at once, and the cluster holds 2 of them "
        f"(each worker whole on one node): the other 6 wait for room, their wait counted in their start-up\n")
    check_capacity(study, local=True)
    assert "8 trials at once, and this machine holds 2 of them" in capsys.readouterr().err
    made_up_cluster(monkeypatch, [{"CPU": 8.0}], None)
    check_capacity(study)
    assert capsys.readouterr().err == ""
    # An autoscaling cluster: the value is how far the user lets it grow.
    made_up_cluster(monkeypatch, [{"CPU": 2.0}], AutoscalerLimits())
    check_capacity(study)
    assert capsys.readouterr().err == ""
