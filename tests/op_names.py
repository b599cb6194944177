"""A dispatch mode recording the ops that run inside it, for tests that check which kernels a form takes."""
from torch.utils._python_dispatch import TorchDispatchMode


class OpNames(TorchDispatchMode):
    """Records the name of every aten (or mkldnn) op that runs inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))
