"""A trial's TorchTrainer starts no Ray Data actor: one process fewer in every trial's start."""
from pathlib import Path

import ray
import torch.distributed
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.state import list_actors

from scaling.ray_env import study_runtime_env
from scaling.ray_trial import DatasetlessTorchTrainer


def dataset_managers(address):
    return len(list_actors(address=address, filters=[("class_name", "=", "DatasetManager")], limit=1000))


def test_a_trial_trains_without_ray_datas_actor(tmp_path):
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False, runtime_env=study_runtime_env())
    try:
        address = ray.get_runtime_context().gcs_address

        def write_world_size(config):  # nested: pickled by value, as the workers cannot import this module
            Path(config["out"]).write_text(str(torch.distributed.get_world_size()))

        def fit(trainer_class, name):
            out = tmp_path / f"{name}.txt"
            trainer = trainer_class(write_world_size, train_loop_config={"out": str(out)},
                                    scaling_config=ScalingConfig(num_workers=1),
                                    run_config=RunConfig(name=name, storage_path=str(tmp_path)))
            trainer.fit()
            return int(out.read_text())

        assert fit(DatasetlessTorchTrainer, "ours") == 1  # trained, in torch's process group
        assert dataset_managers(address) == 0
        # Ray's own trainer starts one, so the count above would see it: the override took effect.
        assert fit(TorchTrainer, "ray") == 1
        assert dataset_managers(address) == 1
    finally:
        ray.shutdown()
