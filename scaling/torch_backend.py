"""Ray Train's torch process-group backend, configured by processes that never import torch.

Ray's `TorchConfig` lives in a module that imports torch, so every process that unpickles one imports
torch: the Tune trial actor that builds a trial's trainer and the Train controller that starts its
workers, neither of which touches a tensor. That costs each about 2 CPU-seconds and 480 MB of memory
(on the 2-core box of benchmarks/README.md), and a controller is started for every trial.
`ProcessGroupConfig` sets up the same process group: its controller-side steps (choose gloo or NCCL,
find rank 0's address, run the set-up on every worker) are written here, in the order of Ray 2.60's
`_TorchBackend`; every worker-side step is Ray's own function, imported on the worker. Left out:
TorchConfig's TPU set-up (core.train runs on CPUs and CUDA GPUs) and its `tcp://` init method (Ray's
default, `env://`, is the one used). tests/test_ray_trial.py compares the two on two workers.
"""
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import ray
from ray.exceptions import GetTimeoutError
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
from ray.train.v2._internal.util import TrainingFramework

logger = logging.getLogger(__name__)


@dataclass
class ProcessGroupConfig(BackendConfig):
    """TorchConfig's fields and behaviour for gloo and NCCL, without importing torch where it is unpickled."""

    backend: Optional[str] = None  # None: NCCL when the workers have GPUs, else gloo (as TorchConfig)
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _ProcessGroupBackend

    @property
    def train_func_context(self):
        return _worker_device

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self):
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class _ProcessGroupBackend(Backend):
    """Runs on the Train controller: every call into torch is sent to the workers."""

    share_cuda_visible_devices = True  # as Ray's torch backend: NCCL needs every local GPU visible

    def on_start(self, worker_group, backend_config):
        backend = backend_config.backend or (
            "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo")
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master_address, addr=addr, port=port)
        worker_group.execute(_set_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _init_process_group, backend=backend, world_rank=i,
                                                   world_size=len(worker_group), init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config):
        futures = worker_group.execute_async(_shutdown_torch, destroy_process_group=len(worker_group) > 1)
        timeout_s = int(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                       DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:  # as Ray's backend: a hung shutdown must not hang the trial's end
            logger.warning("torch process group shutdown timed out after %s seconds", timeout_s)


# On the workers, which import torch anyway: Ray's own steps, imported there.

def _set_master_address(addr, port):
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def _set_distributed_env_vars():
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()  # RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK


def _init_process_group(**kwargs):
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def _shutdown_torch(destroy_process_group):
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


@contextmanager
def _worker_device():
    """Around the training function on every worker: Ray's torch context (it selects the worker's GPU)."""
    from ray.train.torch.config import TorchConfigContextManager

    with TorchConfigContextManager():
        yield
