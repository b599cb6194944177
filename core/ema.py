"""Exponential moving average of a model's weights, kept in fp32 and used for sampling."""
import copy

import torch
import torch.distributed as dist


class EMA:
    """An fp32 copy of a model updated as ema = decay * ema + (1 - decay) * weights.

    The weights are the fp32 ones the optimizer steps: under bf16, DeepSpeed's fp32 master copy, not the bf16 module
    (whose rounding, about one AdamW step at 1e-4, the average would keep). Under bf16 with ZeRO 1-2 each rank holds
    the master of its own partition only, so it moves that part of the EMA, and synchronize() gathers the parts before
    the EMA is read; under bf16 with ZeRO-0 every rank holds them whole (follow_masters). ZeRO-3 partitions every
    weight and its fp32 master alike (whatever the precision): each rank moves its slice from the master, gathered
    as ZeRO 1-2's parts are. Under fp32 and tf32 with ZeRO 0-2 the module's weights equal the ones stepped.
    """

    def __init__(self, model, decay):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._ema_params = list(self.model.parameters())
        self._optimizer = None

    def follow_masters(self, optimizer):
        """Follow the whole fp32 masters a DeepSpeed optimizer keeps beside its bf16 parameters (ZeRO-0's bf16
        optimizer: fp16_groups and fp32_groups, whatever the low precision). ZeRO 1-2's partitions need nothing: their
        parameters name their own (_hp_mapping)."""
        self._optimizer = optimizer

    def _whole_masters(self):
        """{id(bf16 parameter): its fp32 master}, read from the optimizer at each update (a resume copies into them)."""
        low, high = (getattr(self._optimizer, name, None) for name in ("fp16_groups", "fp32_groups"))
        if low is None or high is None:
            return {}
        return {id(p): m for group, masters in zip(low, high) for p, m in zip(group, masters)}

    @torch.no_grad()
    def update(self, params):
        """Move toward params (the training model's parameters, in the EMA's order), or their fp32 masters."""
        ema_parts, current = [], []
        whole = self._whole_masters()
        for ema_p, p in zip(self._ema_params, params):
            if not p.requires_grad:  # fixed (the sin-cos positions): its fp32 copy stays, not a bf16 rounding of it
                continue
            if id(p) in whole and p.dtype != torch.float32:
                ema_parts.append(ema_p)
                current.append(whole[id(p)].detach().float())
            elif _is_zero3(p):
                # Imported here: DeepSpeed imported before core.train.import_deepspeed imports MLflow (0.8-1.5 s).
                from deepspeed.utils import safe_get_local_fp32_param

                start, n = _zero3_slice(p)
                if n:  # else the padding past the weight's end, or another rank's
                    ema_parts.append(ema_p.view(-1).narrow(0, start, n))
                    current.append(safe_get_local_fp32_param(p).narrow(0, 0, n))
            elif _has_master(p):
                mapping = p._hp_mapping  # DeepSpeed's link of the param to its slice of the flat fp32 partition
                if mapping is None:  # another rank's partition holds all of it
                    continue
                at = mapping.lp_fragment_address
                ema_parts.append(ema_p.view(-1).narrow(0, at.start, at.numel))
                current.append(mapping.get_hp_fragment())
            else:  # fp32 weights: the weights are what the optimizer steps
                ema_parts.append(ema_p)
                current.append(p.detach().float())
        torch._foreach_lerp_(ema_parts, current, 1.0 - self.decay)

    @torch.no_grad()
    def synchronize(self, params):
        """Gather each rank's moved parts into whole weights on every rank. A collective: every rank calls it before
        the EMA is read (validation, sampling, a checkpoint); nothing is sent where one rank holds every master."""
        for ema_p, p in zip(self._ema_params, params):
            if not p.requires_grad or not dist.is_initialized():
                continue
            if _is_zero3(p):
                group, (start, n) = p.ds_process_group, _zero3_slice(p)
            elif _has_master(p):
                group = p._dp_group
                at = p._hp_mapping.lp_fragment_address if p._hp_mapping is not None else None
                start, n = (at.start, at.numel) if at is not None else (0, 0)
            else:
                continue
            if dist.get_world_size(group) == 1:
                continue
            # As DeepSpeed's get_full_hp_param gathers a master (it reads the optimizer's partition, not this one):
            # each rank adds its part to zeros, the sum is the whole.
            whole = torch.zeros_like(ema_p).view(-1)
            whole.narrow(0, start, n).copy_(ema_p.view(-1).narrow(0, start, n))
            dist.all_reduce(whole, group=group)
            ema_p.copy_(whole.view_as(ema_p))

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state, strict=True)


def _is_zero3(param):
    """Whether param is ZeRO-3's: partitioned over its group, its fp32 master too (DeepSpeed's ds_id)."""
    return hasattr(param, "ds_id")


def _zero3_slice(param):
    """(start, numel) of the flattened weight that this rank's ZeRO-3 partition holds: rank r the r-th
    ds_tensor.ds_numel elements (ceil(numel / ranks)), the last ones padding past the weight's end."""
    size = param.ds_tensor.ds_numel
    start = dist.get_rank(group=param.ds_process_group) * size if dist.is_initialized() else 0
    return start, max(0, min(size, param.ds_numel - start))


def _has_master(param):
    """Whether DeepSpeed steps a partitioned fp32 master of param that param names, the module's own being a rounding
    of it (bf16 under ZeRO 1-2; ZeRO-3's are partitioned otherwise: _zero3_slice)."""
    return hasattr(param, "_hp_mapping") and param.dtype != torch.float32
