"""Sampling from a trained DiT with diffusers' DDPM and DDIM schedulers and classifier-free guidance."""
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from core.diffusion import linear_beta_schedule, space_timesteps

SAMPLERS = ("ddpm", "ddim")


def make_scheduler(sampler="ddpm", num_steps=250, learn_sigma=True, diffusion_steps=1000, clip_denoised=True):
    """A diffusers scheduler on the betas DiT trains with, respaced to num_steps.

    clip_denoised clips each x_0 prediction to [-1, 1]: right for pixels, wrong for latents, which the
    reference samples unclipped (its sample.py's clip_denoised=False).
    """
    betas = linear_beta_schedule(diffusion_steps)
    # One step is the last step alone (t = 0) on the starting noise: it returns that noise, which FID would score
    # like samples (the reference's respacing refuses fewer than 2, as core.diffusion's does).
    if not 2 <= num_steps <= diffusion_steps:
        raise ValueError(f"num_steps must be in [2, {diffusion_steps}] (the diffusion steps), got {num_steps}")
    if sampler == "ddpm":
        scheduler = DDPMScheduler(
            num_train_timesteps=diffusion_steps, trained_betas=betas, prediction_type="epsilon",
            clip_sample=clip_denoised, variance_type="learned_range" if learn_sigma else "fixed_large",
        )
        # The reference's respacing ("250" = round(i * 999 / 249)), given as explicit timesteps.
        scheduler.set_timesteps(timesteps=sorted(space_timesteps(diffusion_steps, str(num_steps)), reverse=True))
    elif sampler == "ddim":
        # "leading" spacing is the reference's "ddimN" when N divides the training steps. Otherwise the
        # reference takes another stride (ddim30 of 1000: every 34th step from 986, where "leading" takes every
        # 33rd from 957) or none, and diffusers' DDIM takes no explicit timesteps: such N are refused.
        if diffusion_steps % num_steps:
            raise ValueError(f"DDIM with {num_steps} steps: the number of steps must divide the training's "
                             f"{diffusion_steps} diffusion steps")
        scheduler = DDIMScheduler(
            num_train_timesteps=diffusion_steps, trained_betas=betas, prediction_type="epsilon",
            clip_sample=clip_denoised, set_alpha_to_one=True, timestep_spacing="leading",
        )
        scheduler.set_timesteps(num_steps)
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return scheduler


@torch.no_grad()
def sample(model, labels, seeds, *, sampler="ddpm", num_steps=250, cfg_scale=1.0, eta=0.0, guided_channels=3,
           diffusion_steps=1000, autocast_dtype=None, clip_denoised=True):
    """Generate one image per label; image i depends only on seeds[i], not on the batch it is in.

    cfg_scale 1.0 samples the conditional model alone (the paper's scaling plots); any other scale doubles the
    batch with null labels and guides it through model.forward_with_cfg (below 1.0 towards the unconditional model).
    clip_denoised: pixels (True) or latents (False), see make_scheduler.
    """
    if len(labels) != len(seeds):
        raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if sampler == "ddim" and not 0 <= eta <= 1:  # above 1 the DDIM step's square root is of a negative number
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if guided_channels is not None and guided_channels < 1:  # 0 guides nothing, -1 all channels but the last
        raise ValueError(f"guided_channels must be None (all) or at least 1, got {guided_channels}")
    num_classes = model.config["num_classes"]
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):  # else an IndexError in the embedding, a device-side assert on CUDA
        raise ValueError(f"label {int(bad[0])} is outside [0, {num_classes}), the model's classes")
    guided = cfg_scale != 1.0
    dropout = model.config.get("class_dropout_prob", 1)  # a stand-in model without one is taken at its word
    if guided and dropout <= 0:  # no null class embedding: an IndexError, a device-side assert on CUDA
        raise ValueError(f"cfg_scale {cfg_scale} needs the null class of a model trained with label dropout; this "
                         f"one has class_dropout_prob {dropout}: sample it with cfg_scale 1.0")
    device = labels.device
    c, size = model.in_channels, model.config["input_size"]
    scheduler = make_scheduler(sampler, num_steps, model.learn_sigma, diffusion_steps, clip_denoised)
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    x = torch.cat([torch.randn(1, c, size, size, generator=g, device=device) for g in generators])  # (N, C, H, W)
    y = torch.cat([labels, torch.full_like(labels, num_classes)]) if guided else labels

    was_training = model.training
    model.eval()
    try:
        return _denoise(model, scheduler, x, y, sampler, cfg_scale, eta, guided_channels, autocast_dtype, generators)
    finally:  # an error midway (out of memory) leaves a training model training still
        model.train(was_training)


def _denoise(model, scheduler, x, y, sampler, cfg_scale, eta, guided_channels, autocast_dtype, generators):
    """sample's loop: x (N, C, H, W) noise to images through every step of scheduler."""
    device, c, guided = x.device, model.in_channels, cfg_scale != 1.0
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        t_batch = torch.full((len(model_in),), int(t), device=device, dtype=torch.long)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if guided:
                out = model.forward_with_cfg(model_in, t_batch, y, cfg_scale, guided_channels=guided_channels)
            else:
                out = model(model_in, t_batch, y)
        out = out[: len(x)].float()  # (N, C_out, H, W)
        if sampler == "ddim":
            # DDIM re-derives eps from the clipped x_0 prediction, as the reference's ddim_sample does.
            x = scheduler.step(out[:, :c], t, x, eta=eta, use_clipped_model_output=True, generator=generators).prev_sample
        else:
            x = scheduler.step(out, t, x, generator=generators).prev_sample
    return x
