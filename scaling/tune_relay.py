"""Ray Train reports relayed to Ray Tune by the Tune trial function's own thread.

Deliberately not `ray.tune.integration.ray_train.TuneReportCallback` (Ray 2.60): it hands each
report to the Tune actor's main thread, which puts it on the session's one-slot result queue. When
the trial function returns before the main thread has taken the last report, Tune's end-of-function
report fills that slot from the function's thread, and the main thread then blocks forever on a
queue only it empties: the trial's last report (its final milestone) never reaches the driver and
the trial never ends. That happens whenever the driver is slower than a trial's tear-down (a busy
machine, a slow tracking server); tests/test_tune_relay.py shows it. Here the function's thread makes
every report itself, as a Tune function trainable does, so reports and the end cannot cross.
"""
import threading

import ray
import ray.tune
from ray.train import UserCallback
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

CHECKPOINT_PATH_KEY = "checkpoint_path"  # the key Tune's own callback uses


class TuneRelay(UserCallback):
    """A Train callback that queues every report for the Tune trial function that runs `fit`."""

    def __init__(self):
        # On the trial's node: the queue lives and dies with the trial that reads it. One slot, as
        # Ray's own: the Train controller, and with it the checkpoints it registers, stays within a
        # report or two of the driver's rows, so a driver killed mid-study rarely leaves a milestone
        # without a row behind the checkpoint a re-run resumes from (that milestone's weights are gone).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._queue = Queue(maxsize=1, actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def after_report(self, run_context, metrics, checkpoint):
        """On the Train controller, once every worker has reported: rank 0's metrics, as Tune's callback."""
        report = dict(metrics[0])
        if checkpoint is not None:
            report[CHECKPOINT_PATH_KEY] = checkpoint.path
        self._queue.put(report)

    def fit(self, trainer):
        """trainer.fit(), with each of its reports made to Tune from this thread; returns after the last."""
        outcome = {}

        def run():
            try:
                outcome["result"] = trainer.fit()
            except BaseException as e:  # re-raised below, in the trial function's thread
                outcome["error"] = e
            finally:
                # The controller has made its last put by the time fit() returns: this comes after it.
                self._queue.put(None)

        fitting = threading.Thread(target=run, name="train-fit", daemon=True)
        fitting.start()
        while (report := self._queue.get()) is not None:
            ray.tune.report(report)
        fitting.join()
        self._queue.shutdown()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
