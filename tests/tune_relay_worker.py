"""Run by tests/test_tune_relay.py: one Tune trial whose TorchTrainer reports four times, each with a
checkpoint, under a driver that takes SLOW seconds over each result. The driver prints, as JSON lines,
each result it gets and the latest checkpoint the Train controller had registered by then.

    python tests/tune_relay_worker.py STORAGE SLOW [ours|ray]

`ray` relays with Ray's own TuneReportCallback instead, to show what scaling.tune_relay is for: the
controller registers checkpoints ahead of the driver, and the trial hangs before the driver has seen
the last report.
"""
import json
import sys
import time
from pathlib import Path

import ray
import ray.train
from ray import tune
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from scaling.ray_env import start_study_actor
from scaling.tune_relay import RelayMailboxes, TuneRelay

REPORTS = 4


def train_loop(config):
    for i in range(REPORTS):
        folder = Path(config["storage"]) / f"weights-{i}"
        folder.mkdir()
        (folder / "weights.txt").write_text(str(i))
        ray.train.report({"i": i}, checkpoint=Checkpoint.from_directory(str(folder)))


def trial(config):
    if config["relay"] == "ours":
        relay = TuneRelay("relay-mailboxes")
        callbacks = [relay]
    else:
        from ray.tune.integration.ray_train import TuneReportCallback
        relay, callbacks = None, [TuneReportCallback()]
    trainer = TorchTrainer(train_loop, train_loop_config=config, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="relay", storage_path=config["storage"], callbacks=callbacks))
    if relay is None:
        trainer.fit()
    else:
        relay.fit(trainer)


class SlowDriver(tune.Callback):
    """A driver busy with each result for a while, as one is on a loaded machine or with a slow tracking server."""

    def __init__(self, storage, seconds):
        self.snapshot = Path(storage) / "relay" / "checkpoint_manager_snapshot.json"
        self.seconds = seconds

    def on_trial_result(self, iteration, trials, trial, result, **info):
        time.sleep(self.seconds)  # the controller meanwhile goes on, as far as the relay lets it
        registered = json.loads(self.snapshot.read_text())["latest_checkpoint_result"]["metrics"]["i"]
        print(json.dumps({"i": result["i"], "checkpoint_path": result.get("checkpoint_path"),
                          "registered": registered}), flush=True)


def main(storage, slow, relay="ours"):
    ray.init(num_cpus=2)
    mailboxes = start_study_actor(RelayMailboxes, "relay-mailboxes")
    tune.Tuner(tune.with_resources(trial, {"CPU": 0, "memory": 2 ** 20}),
               param_space={"storage": storage, "relay": relay},
               run_config=tune.RunConfig(storage_path=storage, callbacks=[SlowDriver(storage, float(slow))],
                                         verbose=0)).fit()
    assert relay != "ours" or ray.get(mailboxes.open_boxes.remote()) == 0  # the trial's mailbox went with it
    print(json.dumps({"finished": True}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
