"""Run by tests/test_tune_relay.py: one Tune trial whose TorchTrainer reports three times, under a
driver that takes SLOW seconds over each result; prints the results the driver got, as JSON lines.

    python tests/tune_relay_worker.py STORAGE SLOW [ours|ray]

`ray` relays with Ray's own TuneReportCallback instead, to show what scaling.tune_relay is for: the
trial hangs after the driver has seen two of the three reports.
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

from scaling.tune_relay import TuneRelay


def train_loop(config):
    for i in range(3):
        checkpoint = None
        if i == 2:  # the last report carries a checkpoint, as a trial's final milestone does
            folder = Path(config["storage"]) / "final"
            folder.mkdir(exist_ok=True)
            (folder / "weights.txt").write_text("w")
            checkpoint = Checkpoint.from_directory(str(folder))
        ray.train.report({"i": i}, checkpoint=checkpoint)


def trial(config):
    relay = TuneRelay() if config["relay"] == "ours" else None
    if relay is None:
        from ray.tune.integration.ray_train import TuneReportCallback
    trainer = TorchTrainer(train_loop, train_loop_config=config, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="relay", storage_path=config["storage"],
                                                callbacks=[relay or TuneReportCallback()]))
    if relay is None:
        trainer.fit()
    else:
        relay.fit(trainer)


class SlowDriver(tune.Callback):
    """A driver busy with each result for a while, as one is on a loaded machine or with a slow tracking server."""

    def __init__(self, seconds):
        self.seconds = seconds

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(json.dumps({"i": result["i"], "checkpoint_path": result.get("checkpoint_path")}), flush=True)
        time.sleep(self.seconds)


def main(storage, slow, relay="ours"):
    ray.init(num_cpus=2)
    tune.Tuner(tune.with_resources(trial, {"CPU": 0, "memory": 2 ** 20}),
               param_space={"storage": storage, "relay": relay},
               run_config=tune.RunConfig(storage_path=storage, callbacks=[SlowDriver(float(slow))], verbose=0)).fit()
    print(json.dumps({"finished": True}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
