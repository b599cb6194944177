"""The study's Ray job environment: its workers address their own cluster, even beside another local Ray, and start
with the garbage collector paused."""
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ray
from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
from ray.experimental.internal_kv import _internal_kv_get

from scaling.autoscaler_limits import autoscaler_limits
from scaling.ray_env import local_ray_options, start_train_autoscaling_coordinator, study_runtime_env


@ray.remote(num_cpus=0)
class StateProbe:
    """Asks Ray's state API, without an address as Ray Train's placement-group cleaner does, about itself."""

    def own_state(self):
        from ray.util.state import get_actor

        return get_actor(ray.get_runtime_context().get_actor_id(), timeout=30).state


def start_other_ray(temp_dir):
    """Another local Ray on the machine: a driver that holds one until its stdin closes, and says "up"."""
    return subprocess.Popen(
        [sys.executable, "-c", "import sys, ray; ray.init(include_dashboard=False); print('up', flush=True); "
                               "sys.stdin.read()"],
        env={**os.environ, "RAY_TMPDIR": temp_dir}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_state_api_in_workers_finds_their_own_ray_beside_another():
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    other = start_other_ray(temp_dir)
    try:
        ray.init(runtime_env=study_runtime_env(), **local_ray_options())
        try:
            assert other.stdout.readline().strip() == "up", "the other Ray did not start"
            # Without the job's setup hook: "Found multiple active Ray instances", a ConnectionError.
            assert ray.get(StateProbe.remote().own_state.remote()) == "ALIVE"
        finally:
            ray.shutdown()
    finally:
        other.stdin.close()
        other.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_train_controllers_find_the_autoscaling_coordinator_the_driver_started():
    from ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client import (
        TrainAutoscalingCoordinatorClient)

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        started = start_train_autoscaling_coordinator()
        # What a Train controller looks up when it registers its trial's resources (Ray Train V2's client).
        found = TrainAutoscalingCoordinatorClient("train-test")._autoscaling_coordinator
        assert found._actor_id == started._actor_id  # not a second one, nor one Train would create and wait for
    finally:
        ray.shutdown()


def test_a_studys_local_ray_prestarts_no_idle_workers():
    from ray.util.state import list_workers

    ray.init(runtime_env=study_runtime_env(), **local_ray_options())
    try:
        address = ray.get_runtime_context().gcs_address
        # The option leaves the study's own processes alone: an actor of the job still starts. Ray's prestarted
        # workers (one per CPU, with its default options, which none of a study's processes could use) are started
        # as the driver registers, before this actor's worker: by the time it is up, they would be too.
        probe = StateProbe.remote()
        assert ray.get(probe.own_state.remote()) == "ALIVE"
        deadline = time.time() + 2
        while time.time() < deadline:
            workers = list_workers(address=address, detail=True, raise_on_missing_output=False)
            assert sorted(w.worker_type for w in workers if w.is_alive) == ["DRIVER", "WORKER"]  # the probe's
            time.sleep(0.5)
    finally:
        ray.shutdown()


def test_a_studys_local_ray_is_its_own_where_ray_start_recorded_a_cluster(monkeypatch):
    # `ray start` records its cluster here, and a plain ray.init() joins it (it refused the study's local options:
    # "_system_config must not be provided"). A study given no address starts its own, as scaling.run says.
    recorded = os.path.join(os.environ["RAY_TMPDIR"], "ray", "ray_current_cluster")
    os.makedirs(os.path.dirname(recorded), exist_ok=True)
    with open(recorded, "w") as f:
        f.write("127.0.0.1:9")  # the discard port: no Ray there
    monkeypatch.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")  # the head's monitor reports within seconds
    ray.init(runtime_env=study_runtime_env(), **local_ray_options())
    try:
        assert not ray.get_runtime_context().gcs_address.endswith(":9")
        # No autoscaler: the study is checked against the nodes up. The head's readonly monitor publishes its status
        # too (once it has its first report), which must not read as an autoscaler's.
        deadline = time.time() + 30
        while b"node_type_mapping" not in (_internal_kv_get(DEBUG_AUTOSCALING_STATUS) or b""):
            assert time.time() < deadline, "no monitor status after 30 s"
            time.sleep(0.2)
        assert autoscaler_limits() is None
        assert ray.get(StateProbe.remote().own_state.remote()) == "ALIVE"
    finally:
        ray.shutdown()


@ray.remote(num_cpus=0)
class CollectorProbe:
    """An actor of the study's job, as Ray Train's workers are: its garbage collector's state."""

    def collector(self):
        return gc.isenabled(), gc.get_freeze_count()

    def resume(self):
        from scaling.startup_gc import resume_collector

        resume_collector()
        return self.collector()

    def resume_again(self):
        """Whether a second resume froze an object made after the first (it must not)."""
        from scaling.startup_gc import resume_collector

        made_after = [[]]
        resume_collector()
        in_generations = any(o is made_after for g in range(3) for o in gc.get_objects(g))
        return gc.isenabled(), not in_generations


def test_a_studys_workers_start_with_the_collector_paused_and_resume_it_frozen():
    ray.init(runtime_env=study_runtime_env(), **local_ray_options())
    try:
        probe = CollectorProbe.remote()
        assert ray.get(probe.collector.remote()) == (False, 0)  # paused by the job's setup hook, within its start-up
        enabled, frozen = ray.get(probe.resume.remote())  # as scaling.ray_trial's worker loop does before training
        assert enabled and frozen > 10_000  # Ray's own modules at least, out of every later scan
        assert ray.get(probe.resume_again.remote()) == (True, False)  # once: a second call freezes nothing
    finally:
        ray.shutdown()


@ray.remote(num_cpus=0)
def visible_gpus():
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@ray.remote(num_cpus=0)
class GPUProbe:
    """An actor, as Ray Train's workers are."""

    def visible_gpus(self):
        return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_a_process_given_no_gpu_sees_none_on_a_node_that_has_one():
    # This machine has no GPU; Ray takes the count it is told. Without the study's environment, a process given no GPU
    # kept the node's CUDA_VISIBLE_DEVICES (all of them): a CPU trial trained on GPU 0, unreserved.
    ray.init(runtime_env=study_runtime_env(), num_gpus=1, **local_ray_options())
    try:
        assert ray.get(visible_gpus.options(num_gpus=0).remote()) == ""
        assert ray.get(GPUProbe.options(num_gpus=0).remote().visible_gpus.remote()) == ""
        assert ray.get(visible_gpus.options(num_gpus=1).remote()) == "0"
    finally:
        ray.shutdown()


def test_a_variable_the_ray_job_sets_stands_and_the_driver_starts(monkeypatch):
    # `ray job submit --runtime-env-json '{"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}}'`: Ray hands the
    # driver the job's runtime_env and refuses one that sets a variable both set. ray.init raised a ValueError.
    import json

    job = {"runtime_env": {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2", "JOB_ONLY": "yes"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    ray.init(runtime_env=study_runtime_env(), **local_ray_options())
    try:
        seen = ray.get(ray.remote(num_cpus=0)(lambda: {k: os.environ.get(k) for k in (
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "JOB_ONLY", "RAY_TRAIN_METRICS_ENABLED")}).remote())
    finally:
        ray.shutdown()
    assert seen == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2", "JOB_ONLY": "yes", "RAY_TRAIN_METRICS_ENABLED": "0"}


def test_a_local_ray_counts_the_cpus_the_driver_may_run_on():
    # Ray counts the machine's CPUs: under taskset (a batch scheduler's CPU set) it packed trials onto CPUs the job
    # does not have, and the dry run, which counts the usable ones, planned another number of trials at once.
    code = ("import os, ray; from scaling.ray_env import local_ray_options; os.sched_setaffinity(0, {min(os.sched_"
            "getaffinity(0))}); ray.init(**local_ray_options()); print(ray.cluster_resources()['CPU'])")
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    try:
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RAY_TMPDIR": temp_dir},
                              capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 0 and done.stdout.split() == ["1.0"], done.stdout + done.stderr[-2000:]


def test_a_local_rays_cpus_stay_within_a_containers_quota(monkeypatch):
    # A quota below the CPUs the process may run on (`docker --cpus=1 --cpuset-cpus=0,1`): Ray's own count, which
    # reads the quota, was replaced by the affinity's; the dry run plans with the same count as the run.
    import ray._private.utils

    from scaling.dry_run import local_resources

    monkeypatch.setattr(ray._private.utils, "get_num_cpus", lambda **kwargs: 1.0)  # as Ray reads such a quota
    assert local_ray_options()["num_cpus"] == 1 and local_resources()["CPU"] == 1
    monkeypatch.setattr(ray._private.utils, "get_num_cpus", lambda **kwargs: 1000.0)  # a quota above: the affinity
    assert local_ray_options()["num_cpus"] == local_resources()["CPU"] == len(os.sched_getaffinity(0))
