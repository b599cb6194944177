"""The EMA's arithmetic and timing against the reference's update_ema."""
import torch

from core.ema import EMA
from core.models import DiT


def test_the_ema_starts_as_a_copy_and_moves_as_the_reference_update_ema():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    ema = EMA(model, decay=0.9)
    weights = dict(model.named_parameters())
    assert all(torch.equal(p, weights[k]) for k, p in ema.model.named_parameters())
    before = {k: p.clone() for k, p in ema.model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    ema.update(list(model.parameters()))
    for k, p in ema.model.named_parameters():  # the reference: ema.mul_(decay).add_(param, alpha=1 - decay)
        expected = before[k].mul(0.9).add(weights[k].detach(), alpha=0.1)
        assert torch.allclose(p, expected, rtol=0, atol=1e-6), k
        assert not torch.equal(p, before[k]) or k == "pos_embed"
    assert torch.equal(ema.model.pos_embed, before["pos_embed"])  # fixed: nothing to average


def test_the_ema_moves_once_an_optimizer_step_whatever_the_accumulation(tmp_path, monkeypatch):
    import core.train as core_train

    calls = []
    update = core_train.EMA.update
    monkeypatch.setattr(core_train.EMA, "update", lambda self, params: calls.append(1) or update(self, params))
    cfg = core_train.TrainConfig(model="DiT-P/4", dataset="digits", batch_size=16, grad_accum=4, max_steps=3, lr=1e-3,
                                 zero_stage=0, log_every=3, ckpt_every=1000, val_batch=0, num_workers=0)
    core_train.train(cfg, tmp_path)
    assert len(calls) == 3
