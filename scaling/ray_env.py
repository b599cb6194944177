"""The Ray job environment of a study: Ray Train's settings, every worker addressing its own cluster and starting
with its garbage collector paused."""
import json
import os

from core.cpus import usable_cpus
from scaling.startup_gc import pause_collector_for_startup


def study_runtime_env():
    """The job-level runtime_env that `scaling.run` passes to `ray.init`."""
    # Ray Train V2 hands each report over through a one-slot queue that its controller drains on
    # every health check (2 s by default), so a report can wait up to that long: check every 1 s
    # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S in the environment overrides it). Trials hold their log reports
    # between two of them (scaling.held_logs).
    # Faster checks cost the trials CPU (at 0.1 s with Train's metrics on, DiT-T/2 (ZeRO-2) trained at 194
    # images/s; at 1 s with them off, 241 on the 2-core box). Train's metrics are Prometheus
    # gauges for the dashboard; MLflow has every number we log. The preemption watcher is one
    # more actor process per trial (seconds of start-up on a small machine) that only observes
    # preemption notices; a lost node is handled by FailureConfig.
    # A process given no GPU sees none: Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for it unless told to empty it, and a
    # CPU trial (`gpus_per_worker: 0`) on a GPU node then trained on GPU 0, unreserved, beside every other such trial.
    interval = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.0")
    env_vars = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval, "RAY_TRAIN_METRICS_ENABLED": "0",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}
    # Under `ray job submit`, ray.init merges the job's runtime_env with this one and refuses a variable both set
    # (a ValueError): one the job sets (its --runtime-env-json) stands.
    job_vars = _job_runtime_env().get("env_vars") or {}
    env_vars = {k: v for k, v in env_vars.items() if k not in job_vars}
    return {"env_vars": env_vars, "worker_process_setup_hook": f"{__name__}.set_up_worker"}


def _job_runtime_env():
    """The runtime_env of the Ray job this driver runs as (`ray job submit`), which Ray hands it in the environment;
    {} outside one."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # Ray's name for it
    return job_config.get("runtime_env") or {}


def local_ray_options():
    """`ray.init`'s options for the local Ray instance a study starts when it is given no cluster."""
    # Ray prestarts one idle worker process per CPU for a new instance's first driver, so that its first
    # tasks start at once. Those processes have no runtime_env and every process of a study does (the job's,
    # or Ray Train's own for its workers), so none of them is ever used; on the 2-core box
    # they took 1.6 CPU-s just as the first trials start (a lone trial 11.9, 11.2, 10.6 s from scheduled to
    # first step without them, 13.0, 12.3, 11.7 s with them, interleaved; benchmarks/README.md).
    # "local": a Ray of its own, as `scaling.run` promises without --address; a plain ray.init() would join a
    # cluster that `ray start` recorded on this machine (and refuse the _system_config below). On such a cluster's
    # head node, a study is pointed at it with `--address auto`.
    options = {"address": "local", "include_dashboard": True, "dashboard_host": "127.0.0.1", "log_to_driver": False,
               "_system_config": {"prestart_worker_first_driver": False}}
    options["num_cpus"] = local_cpus()
    return options


def local_cpus():
    """The CPUs of a study's local Ray: those this process may run on (its affinity: taskset, a batch scheduler's CPU
    set) within a container's CPU quota. Ray counts the quota or the machine's CPUs, not the affinity: its trials were
    packed onto CPUs the job does not have. The dry run plans with the same count."""
    # Ray's own count (a container's quota, else the machine's): a private function, as no public one gives it before
    # ray.init. Its Docker warning is for a count it would use as it is.
    from ray._private.utils import get_num_cpus

    return max(1, min(usable_cpus(), int(get_num_cpus(override_docker_cpu_warning=True))))


def start_study_actor(actor_class, name):
    """A named actor of the study on the driver's node (which the study cannot outlive), running when returned so
    that trials find it by name."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = actor_class.options(name=name, scheduling_strategy=here).remote()
    ray.get(actor.__ray_ready__.remote())
    return actor


def start_train_autoscaling_coordinator():
    """Start Ray Train's cluster-wide autoscaling coordinator now, without waiting for it.

    Each Train controller registers its trial's resources with this actor (Ray Data's, one per cluster) and
    waits for the answer; the first controller of a cluster would otherwise create it and wait out its start
    (a fresh process importing Ray Data): 1.2-2.2 s of the first trials' start on the 2-core box
    (benchmarks/README.md). Ray's own function, so the actor is the one Train looks up by name.
    """
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator)

    return get_or_create_autoscaling_coordinator()


def set_up_worker():
    """Ray's setup hook of every worker of a study: its own cluster's address; the collector paused for start-up."""
    address_own_cluster()
    pause_collector_for_startup()


def address_own_cluster():
    """Point a worker's Ray state API at the worker's own cluster (RAY_ADDRESS).

    Without an address the state API looks for a local cluster among the machine's processes, and
    with two local Rays on one machine (a study beside another study or a test run) it refuses to
    choose. The study's placement-group watch (as Ray Train's own cleaner) and Train's state actor ask it
    whether a trial's controller is alive, with no address: Ray's cleaner's monitor thread died at its
    first check, and a controller lost later (a trial stopped by Tune) would have kept its placement
    group's CPUs.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
