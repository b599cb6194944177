"""Gaussian diffusion as DiT trains it: linear betas, epsilon prediction, learned-range variance.

Training needs the loss of the paper (epsilon MSE plus the variational bound of the learned
variance, with the mean detached), which no diffusers scheduler computes, so the forward process,
the posterior and p_mean_variance are written here in float64 like the reference. Sampling uses
diffusers' schedulers (core/sampling.py), checked against p_mean_variance in the tests.
"""
import math

import numpy as np
import torch

VARIANCE_TYPES = ("learned_range", "fixed_small", "fixed_large")


MIN_DIFFUSION_STEPS = 21  # the schedule's last beta is 20 / steps: at 20 or fewer it reaches 1, and ᾱ 0 or below


def linear_beta_schedule(num_timesteps):
    """The DDPM linear schedule 1e-4..0.02 for 1000 steps, rescaled for other step counts."""
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or \
            num_timesteps < MIN_DIFFUSION_STEPS:
        raise ValueError(f"diffusion_steps must be a whole number of at least {MIN_DIFFUSION_STEPS} (the linear "
                         f"schedule's last beta is 20 / diffusion_steps), got {num_timesteps!r}")
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps, section_counts):
    """The subset of the original timesteps kept when sampling with fewer steps.

    "250" takes 250 evenly spaced steps; "10,15,20" takes 10, 15 and 20 from three equal thirds;
    "ddim50" takes the stride that gives exactly 50 steps, as DDIM does.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} steps from {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):  # the stride summed, not multiplied: the reference's rounding at ties (.5)
            steps.append(start + round(position))
            position += stride
        start += size
    return set(steps)


def _extract(arr, timesteps, broadcast_shape):
    """Index a float64 numpy schedule by a batch of timesteps; broadcast to broadcast_shape."""
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    return res.reshape(-1, *([1] * (len(broadcast_shape) - 1))).expand(broadcast_shape)


def mean_flat(x):
    """Mean over all but the batch dimension."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL divergence between two diagonal Gaussians, elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """A fast approximation of the standard normal CDF (the one the reference uses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of [-1, 1] data discretised into 256 bins under a Gaussian, elementwise."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    """The forward process, its posterior, and the model's reverse-step distribution."""

    def __init__(self, betas, variance_type="learned_range", timestep_map=None):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        if len(betas) < 2:  # the posterior's clipped log-variance at t = 0 borrows t = 1's
            raise ValueError(f"a diffusion needs at least 2 timesteps, got {len(betas)}")
        self.variance_type = variance_type
        self.num_timesteps = len(betas)
        # The original timestep of each of ours: the model is always called with original ones.
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: clip its log to the next value.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    def q_sample(self, x_start, t, noise=None):
        """Diffuse x_start to step t: sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = _extract(self.posterior_variance, t, x_t.shape)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 implied by the noise prediction eps at x_t."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """The noise implied by an x_0 prediction at x_t."""
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def model_timesteps(self, t):
        """Our timestep indices as the original timesteps the model was trained on."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t]

    def p_mean_variance(self, model, x, t, clip_denoised=True, model_kwargs=None, model_output=None):
        """The model's p(x_{t-1} | x_t): mean, variance, log_variance and pred_xstart."""
        c = x.shape[1]
        if model_output is None:
            model_output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        model_output = model_output.float()
        if self.variance_type == "learned_range":
            eps, var_values = torch.split(model_output, c, dim=1)
            min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract(np.log(self.betas), t, x.shape)
            frac = (var_values + 1) / 2  # the model outputs [-1, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output[:, :c]
            if self.variance_type == "fixed_large":
                # Start from the posterior variance so that the log at t=0 is finite.
                var = np.append(self.posterior_variance[1], self.betas[1:])
                variance, log_variance = _extract(var, t, x.shape), _extract(np.log(var), t, x.shape)
            else:
                variance = _extract(self.posterior_variance, t, x.shape)
                log_variance = _extract(self.posterior_log_variance_clipped, t, x.shape)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised=False):
        """The variational bound term at t in bits per dimension (decoder NLL at t = 0)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(None, x_t, t, clip_denoised=clip_denoised, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example loss terms {"loss", "mse", "vb"} of the paper: ε-MSE (+ VB of the learned variance)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {})).float()
        c = x_t.shape[1]
        terms = {"mse": mean_flat((noise - model_output[:, :c]) ** 2)}
        if self.variance_type == "learned_range":
            # The VB trains only the variance: the mean prediction is detached.
            eps, var_values = torch.split(model_output, c, dim=1)
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms


def create_diffusion(timestep_respacing="", learn_sigma=True, diffusion_steps=1000, variance_type=None):
    """The diffusion DiT trains with (respacing "") or samples with (e.g. "250", "ddim50")."""
    betas = linear_beta_schedule(diffusion_steps)
    if variance_type is None:
        variance_type = "learned_range" if learn_sigma else "fixed_large"  # the reference's default (not sigma_small)
    if not timestep_respacing:
        return GaussianDiffusion(betas, variance_type)
    use_timesteps = space_timesteps(diffusion_steps, timestep_respacing)
    if len(use_timesteps) < 2:
        raise ValueError(f"timestep_respacing {timestep_respacing!r} keeps {len(use_timesteps)} of {diffusion_steps} "
                         "steps; a diffusion needs at least 2")
    # Respacing keeps ᾱ at the kept steps and recomputes the betas between them.
    alphas_cumprod = np.cumprod(1.0 - betas)
    new_betas, timestep_map, last = [], [], 1.0
    for i, acp in enumerate(alphas_cumprod):
        if i in use_timesteps:
            new_betas.append(1 - acp / last)
            timestep_map.append(i)
            last = acp
    return GaussianDiffusion(np.array(new_betas), variance_type, timestep_map=timestep_map)
