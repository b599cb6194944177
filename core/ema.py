"""Exponential moving average of a model's weights, kept in fp32 and used for sampling."""
import copy

import torch


class EMA:
    """An fp32 copy of a model updated as ema = decay * ema + (1 - decay) * weights."""

    def __init__(self, model, decay):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._ema_params = list(self.model.parameters())

    @torch.no_grad()
    def update(self, params):
        """Move toward params (the training model's parameters, in the EMA's order)."""
        current = [p.detach().float() for p in params]
        torch._foreach_lerp_(self._ema_params, current, 1.0 - self.decay)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state, strict=True)
