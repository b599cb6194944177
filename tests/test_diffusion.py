"""core.diffusion and core.sampling against the reference Gaussian diffusion."""
import numpy as np
import pytest
import torch

from core.diffusion import create_diffusion, linear_beta_schedule, space_timesteps
from core.evaluate import EvalConfig, generate
from core.sampling import make_scheduler, sample


def test_linear_schedule():
    betas = linear_beta_schedule(1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    # Other step counts rescale so the total noise stays comparable.
    short = linear_beta_schedule(250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_q_sample(reference):
    _, _, ref = reference
    x_t = create_diffusion().q_sample(ref["x0"], ref["t"], noise=ref["noise"])
    assert (x_t - ref["x_t"]).abs().max() < 1e-5


def test_training_loss_terms(reference, reference_model):
    _, _, ref = reference
    with torch.no_grad():
        terms = create_diffusion().training_losses(reference_model, ref["x0"], ref["t"], dict(y=ref["y"]),
                                                   noise=ref["noise"])
    for name in ("loss", "mse", "vb"):
        assert (terms[name] - ref[name]).abs().max() < 1e-5, name


def test_vb_trains_only_the_variance(reference, reference_model):
    _, _, ref = reference
    model = reference_model.train()
    model.y_embedder.dropout_prob = 0.0
    terms = create_diffusion().training_losses(model, ref["x0"], ref["t"], dict(y=ref["y"]), noise=ref["noise"])
    terms["vb"].sum().backward()
    # The VB gradient reaches the output layer only through the variance half of its rows.
    g = model.final_layer.linear.weight.grad.reshape(2, 2, 2 * 4, -1)  # (p, p, 2C, D)
    assert torch.count_nonzero(g[:, :, :4]) == 0 and torch.count_nonzero(g[:, :, 4:]) > 0


def test_fixed_variance_loss_is_mse(reference):
    from core.models import DiT

    meta, _, ref = reference
    model = DiT(**{**meta["model"], "learn_sigma": False}).eval()
    terms = create_diffusion(learn_sigma=False).training_losses(model, ref["x0"], ref["t"], dict(y=ref["y"]),
                                                                noise=ref["noise"])
    assert "vb" not in terms and torch.equal(terms["loss"], terms["mse"])


def test_p_mean_variance(reference, reference_model):
    _, _, ref = reference
    diffusion = create_diffusion()
    with torch.no_grad():
        out = diffusion.p_mean_variance(reference_model, ref["x_t"], ref["t"], clip_denoised=False,
                                        model_kwargs=dict(y=ref["y"]))
    for name in ("mean", "variance", "log_variance"):
        torch.testing.assert_close(out[name], ref[f"pmv_{name}"], atol=1e-5, rtol=1e-5, msg=name)
    # pred_xstart = x_t / √ᾱ - √(1/ᾱ - 1)·ε reaches ~700 at t=999, and the fp32 rounding of the model's ε (that of
    # any two implementations, ~1e-7) grows with it by √(1/ᾱ - 1), 157 at t=999: the tolerance grows alike.
    alpha_bar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float32)[ref["t"]]
    growth = (1 / alpha_bar - 1).sqrt().clamp(min=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(out["pred_xstart"] / growth, ref["pmv_pred_xstart"] / growth, atol=1e-5, rtol=1e-5)


def test_space_timesteps_like_the_reference():
    steps = sorted(space_timesteps(1000, "250"))
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999 and steps[1] == 4
    # The reference accumulates the fractional stride: its 11th of 21 steps is 10 × 49.95 summed, 499.49999...,
    # which rounds to 499 (a product, 499.5, would round to 500).
    assert 499 in space_timesteps(1000, "21") and 500 not in space_timesteps(1000, "21")
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    assert len(space_timesteps(100, "10,15,20")) == 45
    with pytest.raises(ValueError, match="cannot take exactly 33 steps from 100 with an integer stride"):
        space_timesteps(100, "ddim33")


def test_respaced_diffusion_keeps_alphas_cumprod():
    base, spaced = create_diffusion(), create_diffusion("250")
    assert spaced.num_timesteps == 250
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-12)


@pytest.mark.parametrize("index", [249, 120, 7, 1])
def test_diffusers_ddpm_step_agrees_with_p_mean_variance(reference, reference_model, index):
    """A respaced diffusers DDPM step = core's mean + exp(log_variance / 2) · noise."""
    _, _, ref = reference
    spaced, scheduler = create_diffusion("250"), make_scheduler("ddpm", 250)
    t_orig = int(spaced.timestep_map[index])
    assert int(scheduler.timesteps[249 - index]) == t_orig
    x, y, n = ref["x_t"], ref["y"], len(ref["y"])
    with torch.no_grad():
        ours = spaced.p_mean_variance(reference_model, x, torch.full((n,), index), model_kwargs=dict(y=y))
        model_out = reference_model(x, torch.full((n,), t_orig), y)
        theirs = scheduler.step(model_out, t_orig, x, generator=[torch.Generator().manual_seed(i) for i in range(n)])
    noise = torch.cat([torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(n)])
    expected = ours["mean"] + torch.exp(0.5 * ours["log_variance"]) * noise
    # diffusers keeps ᾱ in float32, core in float64 like the reference.
    torch.testing.assert_close(theirs.prev_sample, expected, atol=1e-4, rtol=1e-4)


def test_diffusers_ddim_step_agrees_with_core(reference, reference_model):
    _, _, ref = reference
    base, scheduler = create_diffusion(), make_scheduler("ddim", 50)
    x, y, n = ref["x_t"], ref["y"], len(ref["y"])
    t = 500
    with torch.no_grad():
        out = reference_model(x, torch.full((n,), t), y)
        pmv = base.p_mean_variance(None, x, torch.full((n,), t), model_output=out)
        prev = scheduler.step(out[:, :4], t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    eps = base.predict_eps_from_xstart(x, torch.full((n,), t), pmv["pred_xstart"])
    abar_prev = torch.tensor(base.alphas_cumprod[t - 20]).float()
    expected = pmv["pred_xstart"] * abar_prev.sqrt() + (1 - abar_prev).sqrt() * eps
    torch.testing.assert_close(prev, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler, steps", [("ddpm", 10), ("ddim", 10)])
def test_sampling_is_deterministic_and_batch_independent(reference_model, sampler, steps):
    labels = torch.tensor([0, 1, 2, 3])
    a = sample(reference_model, labels, [10, 11, 12, 13], sampler=sampler, num_steps=steps, cfg_scale=4.0)
    b = sample(reference_model, labels, [10, 11, 12, 13], sampler=sampler, num_steps=steps, cfg_scale=4.0)
    c = sample(reference_model, labels[2:], [12, 13], sampler=sampler, num_steps=steps, cfg_scale=4.0)
    assert torch.equal(a, b)
    assert (a[2:] - c).abs().max() < 1e-4
    assert a.shape == (4, 4, 8, 8) and torch.isfinite(a).all()
    d = sample(reference_model, labels, [20, 21, 22, 23], sampler=sampler, num_steps=steps, cfg_scale=4.0)
    assert not torch.allclose(a, d)


def ddim_by_hand(model, labels, seeds, num_steps):
    """DDIM (eta 0) with the model's ε at the given labels, step by step with diffusers' scheduler."""
    scheduler = make_scheduler("ddim", num_steps)
    x = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    for t in scheduler.timesteps:
        with torch.no_grad():
            eps = model(x, torch.full((len(x),), int(t)), labels)[:, :4]  # (N, 4, 8, 8)
        x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x


def test_guidance_scale_one_is_the_conditional_model(reference, reference_model):
    labels, seeds = torch.tensor([0, 1, 2]), [1, 2, 3]
    plain = sample(reference_model, labels, seeds, sampler="ddim", num_steps=5, cfg_scale=1.0)
    with pytest.raises(ValueError, match="cfg_scale"):
        sample(reference_model, labels, seeds, sampler="ddim", num_steps=5, cfg_scale=-1.0)
    with pytest.raises(ValueError, match=r"^eta must be in \[0, 1\], got 1.05$"):  # NaN samples, not an error, before
        sample(reference_model, labels, seeds, sampler="ddim", num_steps=5, eta=1.05)
    assert torch.isfinite(sample(reference_model, labels, seeds, sampler="ddim", num_steps=5, eta=1.0)).all()
    assert plain.shape == (3, 4, 8, 8)
    # The conditional model at the true labels, not the null class, and no guidance mixed in.
    conditional = ddim_by_hand(reference_model, labels, seeds, 5)
    null = ddim_by_hand(reference_model, torch.full_like(labels, reference[0]["model"]["num_classes"]), seeds, 5)
    torch.testing.assert_close(plain, conditional, atol=1e-5, rtol=1e-5)
    assert (plain - null).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # every image depends on its label


def test_fixed_variance_samples_with_the_references_large_variance(reference, reference_model):
    """learn_sigma=False: the reference's FIXED_LARGE (β_t), in core's diffusion and in the DDPM sampler."""
    _, _, ref = reference
    assert create_diffusion(learn_sigma=False).variance_type == "fixed_large"
    spaced, scheduler = create_diffusion("250", learn_sigma=False), make_scheduler("ddpm", 250, learn_sigma=False)
    index = 120
    t_orig = int(spaced.timestep_map[index])
    x, y, n = ref["x_t"], ref["y"], len(ref["y"])
    with torch.no_grad():
        eps = reference_model(x, torch.full((n,), t_orig), y)[:, :4]  # (N, 4, H, W): a fixed-variance model's output
    ours = spaced.p_mean_variance(None, x, torch.full((n,), index), model_output=eps)
    theirs = scheduler.step(eps, t_orig, x, generator=[torch.Generator().manual_seed(i) for i in range(n)])
    noise = torch.cat([torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(n)])
    torch.testing.assert_close(theirs.prev_sample, ours["mean"] + torch.exp(0.5 * ours["log_variance"]) * noise,
                               atol=1e-4, rtol=1e-4)


class DataAtTwo(torch.nn.Module):
    """The exact ε-predictor of data that is 2.0 everywhere: latent-like values, outside pixels' [-1, 1]."""

    in_channels, learn_sigma, config = 1, False, dict(input_size=4, num_classes=10)

    def forward(self, x, t, y):
        alpha_bar = torch.as_tensor(np.cumprod(1 - linear_beta_schedule(1000)), dtype=torch.float32)[t]
        alpha_bar = alpha_bar.view(-1, 1, 1, 1)
        return (x - alpha_bar.sqrt() * 2.0) / (1 - alpha_bar).sqrt()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_latents_are_sampled_unclipped_and_pixels_clipped(sampler):
    # The reference samples latents with clip_denoised=False (they are not confined to [-1, 1]) and clips
    # only pixels' x_0 predictions.
    model, labels, seeds = DataAtTwo(), torch.zeros(3, dtype=torch.long), [0, 1, 2]
    unclipped = sample(model, labels, seeds, sampler=sampler, num_steps=50, clip_denoised=False)
    clipped = sample(model, labels, seeds, sampler=sampler, num_steps=50)
    torch.testing.assert_close(unclipped, torch.full_like(unclipped, 2.0), atol=1e-3, rtol=0)
    assert clipped.max() <= 1.0 + 1e-6
    # evaluate's generate samples latents (what it decodes) unclipped: through a stand-in decoder z / 4, the
    # data's 2.0 becomes 0.5, uint8 191 (a clipped 1.0 would give 0.25, uint8 159).
    cfg = EvalConfig(sampler=sampler, num_steps=50, batch_size=8)
    decoded = generate(model, cfg, labels, seeds, device=torch.device("cpu"), decode=lambda z: z / 4)
    assert (decoded == 191).all()
