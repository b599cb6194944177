"""The study's placement-group watch gives back a dead trial's CPUs, with no cleaner process per trial (scaling.placement_group_watch)."""
import time

import pytest
import ray
from ray.train import RunConfig, ScalingConfig
from ray.util.state import list_actors

from scaling.placement_group_watch import PlacementGroupWatch
from scaling.ray_env import local_ray_options, start_study_actor, study_runtime_env
from scaling.ray_trial import TrialTrainer


@ray.remote(num_cpus=0)
class TuneTrial:
    """Stands in for a Tune trial actor: the Train controller of its trainer runs in it."""

    def fit(self, storage, name, watch, seconds):
        def loop(config):
            time.sleep(config["seconds"])

        TrialTrainer(loop, train_loop_config={"seconds": seconds}, placement_group_watch=watch,
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                     run_config=RunConfig(name=name, storage_path=storage)).fit()


def wait_until(condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.2)


def test_a_killed_trials_placement_group_is_removed_by_the_study_watch(tmp_path):
    ray.init(runtime_env=study_runtime_env(), **{**local_ray_options(), "num_cpus": 2})
    try:
        watch = start_study_actor(PlacementGroupWatch, "pg-watch")
        free_cpus = lambda: ray.available_resources().get("CPU", 0)  # noqa: E731

        # A trial that ends: its controller registers, then unregisters and removes its group itself.
        ray.get(TuneTrial.remote().fit.remote(str(tmp_path), "ends", "pg-watch", 0))
        assert ray.get(watch.watched.remote()) == []

        # A trial killed while training (Tune stopping it, its node lost): its controller dies with it.
        trial = TuneTrial.remote()
        trial.fit.remote(str(tmp_path), "killed", "pg-watch", 3600)
        wait_until(lambda: len(ray.get(watch.watched.remote())) == 1 and free_cpus() == 0, 120,
                   "the trial's worker group holds both CPUs")
        ray.kill(trial)
        wait_until(lambda: free_cpus() == 2, 30, "the killed trial's CPUs are free again")
        assert ray.get(watch.watched.remote()) == []
        groups = ray.util.placement_group_table().values()
        assert sorted(g["state"] for g in groups) == ["REMOVED", "REMOVED"]
        # The watch did it: Ray Train started no cleaner of its own for either trial.
        address = ray.get_runtime_context().gcs_address
        assert list_actors(address=address, filters=[("class_name", "=", "PlacementGroupCleaner")]) == []
        # Nor a controller process: each trial's controller ran in its trial's actor, whose death the watch saw.
        assert list_actors(address=address, filters=[("class_name", "=", "TrainController")]) == []
    finally:
        ray.shutdown()
