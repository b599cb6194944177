"""One watcher per study that gives back the placement groups of Train controllers that died, where Ray Train starts one per trial.

A Train controller removes its worker group's placement group when it stops; one that dies instead (Tune
stopped its trial, or the trial's node went) would leave the group's CPUs and GPUs taken until the study
ends. Ray Train 2.60 guards against that with a `PlacementGroupCleaner` actor per run: one more fresh
process at every trial's start (it imports Ray Train, about 1.5 CPU-seconds on the 2-core box of
benchmarks/README.md) and a poller for the trial's whole run. `PlacementGroupWatch` does the same job for
every trial of a study from one actor the driver starts; `WatchedPlacementGroups` is the Train callback
that registers a trial's controller and placement group with it, in place of Ray's.
"""
import logging
import threading
import time

import ray
from ray.exceptions import RayError
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.constants import GET_ACTOR_TIMEOUT_S
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.util.placement_group import placement_group_table, remove_placement_group
from ray.util.state import get_actor

logger = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0  # as Ray's cleaner: a dead controller's resources are free again within about a second
UNREGISTER_TIMEOUT_S = 30.0


@ray.remote(num_cpus=0)
class PlacementGroupWatch:
    """Removes the placement group of every registered Train controller that dies without removing it."""

    def __init__(self, check_interval_s=CHECK_INTERVAL_S, get_actor_timeout_s=GET_ACTOR_TIMEOUT_S):
        # The id of the actor a controller runs in (a trial's Tune actor: scaling.ray_trial.TrialTrainer) -> its
        # worker group's placement group (None before it has one).
        self._groups = {}
        self._lock = threading.Lock()
        self._check_interval_s, self._get_actor_timeout_s = check_interval_s, get_actor_timeout_s
        threading.Thread(target=self._watch, name="PlacementGroupWatch", daemon=True).start()

    def register(self, controller_id, placement_group=None):
        """Watch a controller; with a placement group, the one to remove if it dies (a restarted worker group replaces it)."""
        with self._lock:
            self._groups[controller_id] = placement_group

    def unregister(self, controller_id):
        """The controller is stopping and removes its placement group itself."""
        with self._lock:
            self._groups.pop(controller_id, None)

    def watched(self):
        """The ids of the controllers being watched."""
        with self._lock:
            return sorted(self._groups)

    def _watch(self):
        verdicts = ControllerVerdicts(lambda controller_id: get_actor(controller_id, timeout=self._get_actor_timeout_s))
        while True:
            time.sleep(self._check_interval_s)
            with self._lock:
                controllers = list(self._groups)
            for controller_id in verdicts.dead(controllers):
                with self._lock:
                    placement_group = self._groups.pop(controller_id, None)
                if not remove_dead_controllers_group(controller_id, placement_group):
                    with self._lock:  # tried again next round (the study's end is hours away on a long sweep)
                        self._groups.setdefault(controller_id, placement_group)


# Ray's own cleaner (is_actor_alive) takes the state API's empty answer for a dead actor: a live trial's placement
# group removed, its workers killed and restarted. Here it is a dead one only after this many rounds unlisted (a dead
# actor stays listed as DEAD; one no longer listed at all, dropped from the GCS's table of dead actors, goes then).
UNLISTED_ROUNDS = 10


class ControllerVerdicts:
    """Which watched controllers died, by ask(controller_id): the state API's ActorState, or None where it lists none."""

    def __init__(self, ask, unlisted_rounds=UNLISTED_ROUNDS):
        self._ask, self._unlisted_rounds = ask, unlisted_rounds
        self._unlisted = {}  # controller id -> rounds in a row it went unlisted
        self._unanswered = set()  # controllers whose last question failed: warned once, until an answer

    def dead(self, controllers):
        """The controllers among these that died: listed DEAD, or unlisted unlisted_rounds rounds in a row."""
        dead = []
        for gone in set(self._unlisted) - set(controllers):  # unregistered since: its count is no one's
            del self._unlisted[gone]
        self._unanswered &= set(controllers)
        for controller_id in controllers:
            try:
                state = self._ask(controller_id)
            except Exception as e:  # the state API busy or restarting: ask again next round (never end the thread)
                if controller_id not in self._unanswered:
                    logger.warning("could not ask Ray's state API whether Train controller %s is alive (asking "
                                   "again every round): %s", controller_id, e)
                    self._unanswered.add(controller_id)
                continue
            self._unanswered.discard(controller_id)
            if state is None:
                self._unlisted[controller_id] = self._unlisted.get(controller_id, 0) + 1
                if self._unlisted[controller_id] < self._unlisted_rounds:
                    continue
            elif state.state != "DEAD":
                self._unlisted.pop(controller_id, None)
                continue
            self._unlisted.pop(controller_id, None)
            dead.append(controller_id)
        return dead


def remove_dead_controllers_group(controller_id, placement_group, table=placement_group_table,
                                  remove=remove_placement_group):
    """Remove a dead Train controller's placement group unless it is gone; False where that failed (the GCS briefly
    unreachable, say), to try again."""
    if placement_group is None:
        return True
    try:
        removed = table(placement_group).get("state", "REMOVED") == "REMOVED"
    except Exception as e:  # as Ray's own cleaner: a group whose state is unknown is removed all the same
        logger.warning("could not read the state of placement group %s: %s", placement_group.id.hex(), e)
        removed = False
    if removed:
        return True
    logger.warning("Train controller %s died; removing its placement group %s", controller_id,
                   placement_group.id.hex())
    try:
        remove(placement_group)
    except Exception as e:
        logger.warning("could not remove placement group %s of dead Train controller %s (tried again in a "
                       "second): %s", placement_group.id.hex(), controller_id, e)
        return False
    return True


class WatchedPlacementGroups(ControllerCallback, WorkerGroupCallback):
    """Registers a Train controller and each of its worker groups' placement groups with the study's watcher."""

    def __init__(self, watch_name):
        self._watch_name = watch_name
        self._watch = self._controller_id = None

    # The study's watch gone (its node lost, the OOM killer): the trial trains on unwatched, as under Ray's own cleaner
    # when it fails. Raised, Train retried each worker group's start for good (a retryable error, no limit), and each
    # trial started after it failed.
    def after_controller_start(self, train_run_context):
        self._controller_id = ray.get_runtime_context().get_actor_id()
        try:
            self._watch = ray.get_actor(self._watch_name)
        except ValueError as e:  # no such actor
            self._unwatched(e)

    def after_worker_group_start(self, worker_group):
        if self._watch is None:
            return
        placement_group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        try:
            ray.get(self._watch.register.remote(self._controller_id, placement_group))
        except RayError as e:
            self._unwatched(e)

    def _unwatched(self, error):
        logger.warning("the study's placement-group watch %s is gone (%s): Train controller %s runs unwatched, and "
                       "its CPUs and GPUs stay taken until the study's end if it dies", self._watch_name, error,
                       self._controller_id)
        self._watch = None

    async def before_controller_shutdown(self):
        self._unregister()

    def before_controller_abort(self):
        self._unregister()

    def _unregister(self):
        if self._watch is None:  # stopped before it started
            return
        try:
            ray.get(self._watch.unregister.remote(self._controller_id), timeout=UNREGISTER_TIMEOUT_S)
        except RayError as e:  # the study is ending, or the watch is gone or stuck: raised, Train took a finished run
            # for a failed one (an error before its controller's shutdown)
            logger.warning("could not unregister Train controller %s from the study's placement-group watch %s: %s",
                           self._controller_id, self._watch_name, e)


def replace_ray_cleaner(callbacks, watch_name):
    """A Train run's default callbacks with Ray's per-run placement-group cleaner replaced by the study's watcher."""
    return [WatchedPlacementGroups(watch_name) if isinstance(c, PlacementGroupCleanerCallback) else c
            for c in callbacks]
