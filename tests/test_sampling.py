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
