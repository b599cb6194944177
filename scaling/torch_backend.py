"""Ray Train's torch process-group backend, configured by processes that never import torch.

Ray's `TorchConfig` lives in a module that imports torch, so every process that unpickles one imports
torch: the Tune trial actor that builds a trial's trainer and the Train controller that starts its
workers, neither of which touches a tensor. That costs each about 2 CPU-seconds and 480 MB of memory
(on the 2-core box of benchmarks/README.md), and a controller is started for every trial.
`ProcessGroupConfig` sets up the same process group: its controller-side steps (choose gloo or NCCL, find rank 0's
address, run the set-up on every worker) are written here, in the order of Ray 2.60's `_TorchBackend`; the
worker-side steps are Ray's own functions, imported on the worker, but for the rendezvous. Ray's finds a free port
on rank 0, closes it, and has torch bind it again moments later: another process can take it between the two
(EADDRINUSE; it happened in this project's test suite, three processes of studies side by side), and the trial fails
at its start, not retried (Ray Train retries a worker group's start only where an actor dies). Here rank 0's store
binds a port of the OS's choosing first, and the other ranks are told that one. Left out: TorchConfig's TPU set-up
(core.train runs on CPUs and CUDA GPUs) and its `tcp://` init method. tests/test_ray_trial.py compares the two on
two workers.
"""
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import ray
from ray.exceptions import GetTimeoutError
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
        addr, port = worker_group.execute_single(0, _bind_master_store, timeout_s=backend_config.timeout_s)
        worker_group.execute(_set_master_address, addr=addr, port=port)
        worker_group.execute(_set_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _init_process_group, backend=backend, world_rank=i,
                                                   world_size=len(worker_group), timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config):
        futures = worker_group.execute_async(_shutdown_torch, destroy_process_group=len(worker_group) > 1)
        timeout_s = int(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                       DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:  # as Ray's backend: a hung shutdown must not hang the trial's end
            logger.warning("torch process group shutdown timed out after %s seconds", timeout_s)


# On the workers, which import torch anyway: Ray's own steps, imported there, and the rendezvous.

_master_store = None  # rank 0's TCPStore, listening before the other ranks learn its port


def _bind_master_store(timeout_s):
    """On rank 0: the process group's store, on a port the OS chooses as it binds; (this node's address, the port)."""
    global _master_store
    from datetime import timedelta

    import torch.distributed as dist
    from ray.util import get_node_ip_address

    addr = get_node_ip_address()
    _master_store = dist.TCPStore(addr, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s),
                                  use_libuv=_use_libuv())
    return addr, _master_store.port


def _use_libuv():
    return os.environ.get("USE_LIBUV", "1") == "1"  # torch's env:// switch for the store's server


def _set_master_address(addr, port):
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def _set_distributed_env_vars():
    from ray.train.torch.config import _set_torch_distributed_env_vars

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:  # unset is every GPU, and empty none: both stay so
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus_in_numeric_order(visible)  # first: Ray's device is read from it
    _set_torch_distributed_env_vars()  # RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK


def gpus_in_numeric_order(visible):
    """A node's CUDA_VISIBLE_DEVICES with its GPU numbers in numeric order (others, such as UUIDs, as they are).

    Ray 2.60 numbers a node's workers' local ranks in the numeric order of their GPUs but joins those GPUs as text
    sorts them ("10,11,8,9"), and core.train, as DeepSpeed, trains on cuda:LOCAL_RANK: on a node of more than 10
    GPUs ranks took each other's GPUs (Ray's own device, found in this variable, agrees once it is in order)."""
    ids = visible.split(",")
    return ",".join(sorted(ids, key=int)) if all(i.strip().isdigit() for i in ids) else visible


def _init_process_group(backend, world_rank, world_size, timeout_s):
    """Ray's `_setup_torch_process_group` with env://'s rendezvous, rank 0 on the store it already holds."""
    from datetime import timedelta

    import torch.distributed as dist
    from ray.train.torch.config import _is_backend_nccl

    timeout = timedelta(seconds=timeout_s)
    if _is_backend_nccl(backend) and not {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT"} & set(
            os.environ):
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"  # as Ray: fail a collective that times out
    store = _master_store if world_rank == 0 else dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout,
        use_libuv=_use_libuv())
    # The prefix env:// puts on the store (torch's init_process_group), so keys land where they would.
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=world_rank,
                            world_size=world_size, timeout=timeout)


def _shutdown_torch(destroy_process_group):
    global _master_store
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)
    _master_store = None  # a process group not destroyed (one worker) keeps it until the actor ends


@contextmanager
def _worker_device():
    """Around the training function on every worker: Ray's torch context (it selects the worker's GPU)."""
    from ray.train.torch.config import TorchConfigContextManager

    with TorchConfigContextManager():
        yield
