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
import uuid

import ray
import ray.tune
from ray.train import UserCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY  # the key Tune's own callback uses


@ray.remote(num_cpus=0, max_concurrency=10_000)  # two waiting calls per running trial
class RelayMailboxes:
    """The study's mailboxes, one per running trial, each holding one report at a time between a trial's
    Train controller and its Tune trial function. One actor for the study rather than one per trial: a
    fresh process at every trial's start costs about a CPU-second (on the 2-core box of benchmarks/README.md)."""

    def __init__(self):
        self._boxes = {}  # relay key -> (reports, reported), one-slot queues
        self._discarded = set()  # keys whose trial function has stopped receiving (a few bytes per trial)
        self._milestone_rows = set()  # (trial id, step) of the milestone rows the driver has

    def _box(self, key):
        if key not in self._boxes:
            self._boxes[key] = asyncio.Queue(1), asyncio.Queue(1)
        return self._boxes[key]

    async def send(self, key, report):
        """From the controller; True once the trial function has reported it to Tune, False (at once) when the
        function no longer receives (it failed, or was stopped): nobody would take the report, and a new box
        for it would outlive the trial."""
        if key in self._discarded:
            return False
        reports, reported = self._box(key)
        await reports.put(report)
        return await reported.get()

    async def receive(self, key):
        return await self._box(key)[0].get()

    async def mark_reported(self, key):
        await self._box(key)[1].put(True)

    async def close(self, key):
        """No more reports: fit() has returned."""
        if key not in self._discarded:  # else the trial function is gone, and a new box would outlive it
            await self._box(key)[0].put(None)

    async def discard(self, key):
        """The trial function stops receiving: a report waiting in the box, or sent later, is dropped."""
        self._discarded.add(key)
        _, reported = self._boxes.pop(key, (None, None))
        if reported is not None and reported.empty():
            reported.put_nowait(False)  # releases a controller's send waiting there, if any

    async def open_boxes(self):
        return len(self._boxes)

    async def add_milestone_rows(self, rows):
        """From the driver (scaling.recorder): (trial id, step) of milestone rows it has (its results.parquet's at
        launch, then each one as it is written)."""
        self._milestone_rows.update((trial_id, int(step)) for trial_id, step in rows)

    async def has_milestone_row(self, trial_id, step):
        """Whether the driver has that row: a trial resumed from the milestone's checkpoint (a re-run of the study,
        its worker group restarted, or its Tune actor's node lost) need not evaluate it again."""
        return (trial_id, step) in self._milestone_rows


class TrialFunctionStopped(RuntimeError):
    """The Tune trial function takes no more reports: raised in the Train controller, which then ends the run."""


class TuneRelay(UserCallback):
    """A Train callback whose reports reach Tune through `fit`, which the trial function calls."""

    def __init__(self, mailboxes_name):
        self._mailboxes = ray.get_actor(mailboxes_name)
        self._key = uuid.uuid4().hex  # this fit's mailbox: a rerun of the trial gets a fresh one

    def after_report(self, run_context, metrics, checkpoint):
        """On the Train controller, once every worker has reported: rank 0's metrics, as Tune's callback."""
        report = dict(metrics[0])
        if checkpoint is not None:
            report[CHECKPOINT_PATH_KEY] = checkpoint.path
        if not ray.get(self._mailboxes.send.remote(self._key, report)):
            # The study was stopped (or the trial function failed) and this report reached no driver. Returning, the
            # controller would go on to the next report and register its checkpoint, which may lie past a milestone
            # whose row was never written (a resume from it then fails). Raised here, it ends the run (Ray Train
            # retries no error of a callback's).
            raise TrialFunctionStopped(f"the trial function takes no more reports; report {report.get('step')} and "
                                       "those after it are not registered")

    def fit(self, trainer):
        """trainer.fit(), with each of its reports made to Tune from this thread; returns after the last."""
        outcome = {}

        def run():
            try:
                outcome["result"] = trainer.fit()
            except BaseException as e:  # re-raised below, in the trial function's thread
                outcome["error"] = e
            finally:
                ray.get(self._mailboxes.close.remote(self._key))

        fitting = threading.Thread(target=run, name="train-fit", daemon=True)
        fitting.start()
        try:
            while (report := ray.get(self._mailboxes.receive.remote(self._key))) is not None:
                ray.tune.report(report)
                ray.get(self._mailboxes.mark_reported.remote(self._key))
            fitting.join()
        finally:
            ray.get(self._mailboxes.discard.remote(self._key))
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
