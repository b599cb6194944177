"""Ray Train reports relayed to Ray Tune one at a time, by the Tune trial function's own thread.

Deliberately not `ray.tune.integration.ray_train.TuneReportCallback` (Ray 2.60), for two reasons.
It hands each report to the Tune actor's main thread, which puts it on the session's one-slot
result queue; when the trial function returns before the main thread has taken the last report,
Tune's end-of-function report fills that slot from the function's thread, and the main thread then
blocks forever on a queue only it empties: the trial's last report (its final milestone) never
reaches the driver and the trial never ends. That happens whenever the driver is slower than a
trial's tear-down (a busy machine, a slow tracking server). And its queue lets the Train controller
run reports ahead of the driver, registering checkpoints past milestones whose rows are not written
yet: a driver killed then leaves a milestone that a re-run, resuming from the later checkpoint, can
no longer evaluate. tests/test_tune_relay.py shows both.

Here the function's thread makes every report itself, as a Tune function trainable does, and the
controller's report returns only once the driver has processed it (a Tune function's report returns
when the driver asks for the next result): the controller registers a checkpoint only after the
driver has recorded every report before it.
"""
import asyncio
import threading

import ray
import ray.tune
from ray.train import UserCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY  # the key Tune's own callback uses
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0)
class _Mailbox:
    """Holds one report at a time between the Train controller and the Tune trial function."""

    def __init__(self):
        self._reports, self._reported = asyncio.Queue(1), asyncio.Queue(1)

    async def send(self, report):
        """From the controller; returns once the trial function has reported it to Tune."""
        await self._reports.put(report)
        await self._reported.get()

    async def receive(self):
        return await self._reports.get()

    async def mark_reported(self):
        await self._reported.put(True)

    async def close(self):
        """No more reports: fit() has returned."""
        await self._reports.put(None)


class TuneRelay(UserCallback):
    """A Train callback whose reports reach Tune through `fit`, which the trial function calls."""

    def __init__(self):
        # On the trial's node: the mailbox lives and dies with the trial that reads it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._mailbox = _Mailbox.options(scheduling_strategy=here).remote()

    def after_report(self, run_context, metrics, checkpoint):
        """On the Train controller, once every worker has reported: rank 0's metrics, as Tune's callback."""
        report = dict(metrics[0])
        if checkpoint is not None:
            report[CHECKPOINT_PATH_KEY] = checkpoint.path
        ray.get(self._mailbox.send.remote(report))

    def fit(self, trainer):
        """trainer.fit(), with each of its reports made to Tune from this thread; returns after the last."""
        outcome = {}

        def run():
            try:
                outcome["result"] = trainer.fit()
            except BaseException as e:  # re-raised below, in the trial function's thread
                outcome["error"] = e
            finally:
                ray.get(self._mailbox.close.remote())

        fitting = threading.Thread(target=run, name="train-fit", daemon=True)
        fitting.start()
        while (report := ray.get(self._mailbox.receive.remote())) is not None:
            ray.tune.report(report)
            ray.get(self._mailbox.mark_reported.remote())
        fitting.join()
        ray.kill(self._mailbox)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
