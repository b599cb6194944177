"""The study's placement-group watch gives back a dead trial's CPUs, with no cleaner process per trial (scaling.placement_group_watch)."""
import logging
import time

import pytest
import ray
from ray.train import RunConfig, ScalingConfig
from ray.util.state import list_actors

from scaling import placement_group_watch
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


def test_a_dead_controllers_group_is_removed_though_its_state_cannot_be_read_and_retried_when_removal_fails(caplog,
                                                                                                           monkeypatch):
    # One failed call (the GCS briefly away just after a node loss) left the group, its CPUs or GPUs taken, until the
    # study's end: the watch had already forgotten the controller.
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from scaling.placement_group_watch import remove_dead_controllers_group

    def unreachable(*args):
        raise ConnectionError("GCS unreachable")

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        for table, remove, done in ((placement_group_table, unreachable, False),
                                    (unreachable, remove_placement_group, True)):
            group = placement_group([{"CPU": 1}])
            ray.get(group.ready(), timeout=60)
            assert remove_dead_controllers_group("c1", group, table=table, remove=remove) is done
            state = placement_group_table(group)["state"]
            assert state == ("REMOVED" if done else "CREATED")
        assert remove_dead_controllers_group("c1", group) is True  # already removed: nothing to do
        assert remove_dead_controllers_group("c2", None) is True  # a controller with no group yet

        # The study's watch gone (its node lost): the trial trains on unwatched, saying so. Raised, Train retried each
        # worker group's start for good, and trials started after it failed at their start.
        from types import SimpleNamespace

        from scaling.placement_group_watch import WatchedPlacementGroups

        state = SimpleNamespace(placement_group_handle=SimpleNamespace(placement_group=group))
        worker_group = SimpleNamespace(get_worker_group_state=lambda: state)  # what the callback reads of one
        watch = PlacementGroupWatch.options(name="pg-watch-test").remote()
        killed, missing = WatchedPlacementGroups("pg-watch-test"), WatchedPlacementGroups("pg-watch-none")
        killed.after_controller_start(None)
        ray.kill(watch)
        with caplog.at_level(logging.WARNING, logger="scaling.placement_group_watch"):
            missing.after_controller_start(None)
            for callback in (killed, missing):
                callback.after_worker_group_start(worker_group)
                callback.before_controller_abort()
        gone = [r.getMessage() for r in caplog.records if "placement-group watch" in r.getMessage()]
        assert [m.split(" is gone")[0] for m in gone] == ["the study's placement-group watch pg-watch-none",
                                                          "the study's placement-group watch pg-watch-test"]

        # A watch that does not answer the unregistering of a finished run: only RayActorError was caught, and a
        # timeout or another of Ray's errors raised before the controller's shutdown made Train fail the run.
        @ray.remote(num_cpus=0)
        class Stuck:
            def unregister(self, controller_id):
                time.sleep(60)

        monkeypatch.setattr(placement_group_watch, "UNREGISTER_TIMEOUT_S", 0.5)
        finished = WatchedPlacementGroups("pg-watch-stuck")
        finished._watch, finished._controller_id = Stuck.remote(), "c3"
        with caplog.at_level(logging.WARNING, logger="scaling.placement_group_watch"):
            finished.before_controller_abort()
        assert "could not unregister Train controller c3 from the study's placement-group watch pg-watch-stuck: " \
            in caplog.text
    finally:
        ray.shutdown()


def test_a_controller_the_state_api_does_not_list_is_not_taken_for_dead_at_once(caplog):
    # Ray's is_actor_alive reads an empty answer as dead: the live trial's placement group was removed, its workers
    # killed. Now only DEAD, or unlisted UNLISTED_ROUNDS rounds in a row; a failed question is warned of once.
    from types import SimpleNamespace

    from scaling.placement_group_watch import ControllerVerdicts

    answers = {"alive": ["ALIVE"] * 6, "dead": ["ALIVE", "DEAD"], "unlisted": [None, None, "ALIVE", None, None, None],
               "gone": [None] * 6, "unasked": [ConnectionError("state API restarting")] * 2 + ["DEAD"]}

    def ask(controller_id):
        answer = answers[controller_id].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer and SimpleNamespace(state=answer)

    verdicts = ControllerVerdicts(ask, unlisted_rounds=3)
    watched = ["alive", "dead", "unlisted", "gone", "unasked"]
    rounds = []
    with caplog.at_level(logging.WARNING, logger="scaling.placement_group_watch"):
        for _ in range(6):
            dead = verdicts.dead(watched)
            watched = [c for c in watched if c not in dead]
            rounds.append(dead)
    assert rounds == [[], ["dead"], ["gone", "unasked"], [], [], ["unlisted"]]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith("could not ask Ray's state API whether Train controller "
                                                     "unasked is alive (asking again every round): state API")
