"""Ray Train's synchronization actor, kept by a Tune trial's actor from one trial to its next instead of one per trial.

Ray Train's worker group starts a `SynchronizationActor` for every run (the barrier that every `ray.train.report`
of every rank passes) and kills it when the run's workers stop: a fresh process that imports Ray Train, about
2.5 CPU-seconds beside each trial's start (benchmarks/README.md), when on the 2-core box the other core is training
the trial before. Tune reuses a finished trial's actor for the next trial, and the Train controller runs in that
actor (scaling.ray_trial.TrialTrainer), so the actor keeps its last run's barrier, if idle, for its next run (and
for its worker group's restart, where Ray 2.60 starts a fresh barrier too: it resets and keeps one only where it
replaces a replica group, which this backend has none of). One that a run left with a rank waiting in it (its
workers failed mid-report) is killed as before; a kept one is checked again as it is handed out, since Ray kills a
run's workers without waiting for them to stop, and one still running may have entered it since (the check narrows
that window to the moments before the next run's first report, which a fresh barrier would not have). The two hooks are
module globals of Ray Train's worker group (private; Ray is pinned in pyproject.toml); tests/test_ray_trial.py
checks that they still take effect.
"""
import contextlib
import logging

import ray
from ray.train.v2._internal.execution.worker_group import state as worker_group_state
from ray.train.v2._internal.execution.worker_group import worker_group

logger = logging.getLogger(__name__)

IDLE_CHECK_TIMEOUT_S = 5.0

# This process's idle barrier, with the arguments it was started with; and the barriers handed out, by handle.
_kept = {"key": None, "actor": None}
_handed_out = {}


class _KeptActorClass:
    """Stands in for the SynchronizationActor class where the worker group starts one: `.options(...).remote(...)`
    gives back the kept idle actor when it was started with the same arguments."""

    def __init__(self, actor_class):
        self._actor_class = actor_class

    def options(self, **options):
        return _KeptActorStart(self._actor_class, options)


class _KeptActorStart:
    def __init__(self, actor_class, options):
        self._actor_class, self._options = actor_class, options

    def remote(self, *args, **kwargs):
        key = repr((self._options, args, sorted(kwargs.items())))
        actor, kept_key = _kept["actor"], _kept["key"]
        _kept.update(key=None, actor=None)
        # Idle still: a rank of its last run that Ray's kill had not yet stopped would put the next run's ranks one
        # report out of step.
        if actor is not None and (kept_key != key or not _is_idle(actor)):
            ray.kill(actor)
            actor = None
        if actor is None:
            actor = self._actor_class.options(**self._options).remote(*args, **kwargs)
        _handed_out[actor] = key
        return actor


def _keep_or_kill(sync_actor):
    """In place of Ray Train's `ray.kill` of a run's barrier: keep it for this process's next run if no rank is
    waiting in it."""
    key = _handed_out.pop(sync_actor, None)
    if key is None or not _is_idle(sync_actor):
        ray.kill(sync_actor)
        return
    if _kept["actor"] is not None:
        ray.kill(_kept["actor"])
    _kept.update(key=key, actor=sync_actor)


def _is_idle(sync_actor):
    try:
        waiting, required = ray.get([sync_actor.get_counter.remote(), sync_actor.get_required_ranks.remote()],
                                    timeout=IDLE_CHECK_TIMEOUT_S)
    except (ray.exceptions.RayError, TimeoutError) as e:
        logger.info("Not keeping Ray Train's synchronization actor: %s", e)
        return False
    # A relaxed rank set is left by a preemption, which this process's next run must not inherit.
    return waiting == 0 and required is None


@contextlib.contextmanager
def kept_synchronization_actor():
    """While active, Ray Train runs started in this process take and leave this process's idle barrier."""
    original_class, original_shutdown = worker_group.SynchronizationActor, worker_group_state._shutdown_sync_actor
    worker_group.SynchronizationActor = _KeptActorClass(original_class)
    worker_group_state._shutdown_sync_actor = _keep_or_kill
    try:
        yield
    finally:
        worker_group.SynchronizationActor = original_class
        worker_group_state._shutdown_sync_actor = original_shutdown
