"""core.sampling and core.diffusion refuse what they cannot sample, naming the value (the rest in test_diffusion)."""
import numpy as np
import pytest
import torch

from core.diffusion import GaussianDiffusion, create_diffusion
from core.models import DiT, model_config
from core.sampling import make_scheduler, sample


@pytest.mark.parametrize("cfg_scale", [4.0, 0.5])
def test_guidance_of_a_model_without_a_null_class_is_refused(cfg_scale):
    # class_dropout_prob 0 builds no null-class embedding: guidance indexed past the table (a device-side assert on
    # CUDA). Any cfg_scale but 1.0 guides.
    model = DiT(**model_config("DiT-P/2", class_dropout_prob=0.0))
    with pytest.raises(ValueError, match=rf"^cfg_scale {cfg_scale} needs the null class .* class_dropout_prob 0.0: "):
        sample(model, torch.tensor([1, 2]), [0, 1], num_steps=2, cfg_scale=cfg_scale)
    assert sample(model, torch.tensor([1, 2]), [0, 1], num_steps=2).shape == (2, 1, 8, 8)  # unguided, it samples


@pytest.mark.parametrize("labels, bad", [([3, 10], 10), ([-1, 3], -1), ([12, 2, -5], 12)])
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_labels_outside_the_models_classes_are_named(labels, bad, cfg_scale):
    model = DiT(**model_config("DiT-P/2"))  # 10 classes
    with pytest.raises(ValueError, match=rf"^label {bad} is outside \[0, 10\), the model's classes$"):
        sample(model, torch.tensor(labels), list(range(len(labels))), num_steps=2, cfg_scale=cfg_scale)
    assert sample(model, torch.tensor([0, 9]), [0, 1], num_steps=2, cfg_scale=cfg_scale).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("num_steps", [0, -3, 1, 1001])
def test_a_step_count_outside_the_diffusion_is_refused(sampler, num_steps):
    # 0 was a ZeroDivisionError (DDIM) or an IndexError (DDPM); 1 sampled the last step alone, on the starting noise,
    # and returned that noise (FID scored it like samples).
    with pytest.raises(ValueError, match=rf"^num_steps must be in \[2, 1000\] \(the diffusion steps\), "
                                         rf"got {num_steps}$"):
        make_scheduler(sampler, num_steps)
    assert [int(t) for t in make_scheduler(sampler, 2).timesteps] == {"ddpm": [999, 0], "ddim": [500, 0]}[sampler]


@pytest.mark.parametrize("respacing, kept", [("1", 1), ("0", 0), ("0,1", 1), ("0,0,0", 0)])
def test_a_respacing_of_fewer_than_two_steps_is_refused(respacing, kept):
    # The posterior's clipped log-variance borrows step 1's value: one step or none was an IndexError.
    with pytest.raises(ValueError, match=rf"^timestep_respacing '{respacing}' keeps {kept} of 1000 steps; a diffusion "
                                         r"needs at least 2$"):
        create_diffusion(respacing)
    with pytest.raises(ValueError, match=r"^a diffusion needs at least 2 timesteps, got 1$"):
        GaussianDiffusion(np.array([0.5]))
    assert create_diffusion("2").num_timesteps == 2


@pytest.mark.parametrize("diffusion_steps", [20, 10, 0, -5, 250.0, True])
def test_a_diffusion_of_20_steps_or_fewer_is_refused_by_core_too(diffusion_steps):
    # The linear schedule's last beta is 20 / steps: at 20 it reaches 1 (1 / sqrt(ᾱ) infinite), at 10 ᾱ goes negative
    # (NaN samples); 0 blamed num_steps. The study and core.train refused them; core's functions took them.
    with pytest.raises(ValueError, match=rf"^diffusion_steps must be a whole number of at least 21 \(the linear "
                                         rf"schedule's last beta is 20 / diffusion_steps\), got {diffusion_steps!r}$"):
        make_scheduler("ddpm", 2, diffusion_steps=diffusion_steps)
    with pytest.raises(ValueError, match=r"^diffusion_steps must be a whole number of at least 21"):
        create_diffusion(diffusion_steps=diffusion_steps)
    assert create_diffusion(diffusion_steps=21).betas[-1] == pytest.approx(20 / 21)


@pytest.mark.parametrize("guided_channels", [0, -1])
def test_guided_channels_below_one_are_refused(guided_channels):
    # 0 doubled the batch and guided nothing; -1 guided every channel but the last, the learned variance's among them.
    model = DiT(**model_config("DiT-P/2"))
    with pytest.raises(ValueError, match=rf"^guided_channels must be None \(all\) or at least 1, got {guided_channels}$"):
        sample(model, torch.tensor([1, 2]), [0, 1], num_steps=2, cfg_scale=4.0, guided_channels=guided_channels)


def test_a_sample_that_fails_midway_leaves_a_training_model_training():
    model = DiT(**model_config("DiT-P/2")).train()
    calls = []

    def fails_second(module, args):  # as an out-of-memory error at the second step would
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
    model.register_forward_pre_hook(fails_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        sample(model, torch.tensor([1, 2]), [0, 1], num_steps=3)
    assert model.training
