"""Diffusion training math, written once: noise, timesteps, the denoising loss, and x0 prediction.

Notation follows DDPM/DDIM: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. The network predicts eps
("epsilon") or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 ("v_prediction"), as the scheduler's config says.
"""
from __future__ import annotations

import torch


def sample_timesteps(scheduler, batch: int, generator: torch.Generator | None = None,
                     device="cpu", t_min: int = 0, t_max: int | None = None) -> torch.Tensor:
    """Uniform integer timesteps in [t_min, t_max) (default: the whole training schedule)."""
    t_max = scheduler.config.num_train_timesteps if t_max is None else t_max
    return torch.randint(t_min, t_max, (batch,), generator=generator, device="cpu").to(device)


def _abar(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar_t shaped to broadcast over `like`. Read from the scheduler without calling its add_noise/get_velocity:
    those move the scheduler's alphas_cumprod to the samples' device as a side effect, after which the same
    scheduler fails to step a pipeline on another device (a CUDA-trained model generating on the CPU)."""
    a = scheduler.alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device)]
    return a.view(-1, *([1] * (like.ndim - 1)))


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
    abar = _abar(scheduler, t, x0)
    return abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise


def target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network should output at x_t: eps, or v (Salimans & Ho 2022, eq. 9)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        abar = _abar(scheduler, t, x0)
        return abar ** 0.5 * noise - (1 - abar) ** 0.5 * x0
    raise ValueError(f"unsupported prediction_type {kind!r}")


def predict_x0(scheduler, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_0 from the network output at x_t: (x_t - sqrt(1-abar) eps) / sqrt(abar), or sqrt(abar) x_t - sqrt(1-abar) v."""
    abar = _abar(scheduler, t, x_t)
    if scheduler.config.prediction_type == "epsilon":
        return (x_t - (1 - abar).sqrt() * model_output) / abar.sqrt()
    return abar.sqrt() * x_t - (1 - abar).sqrt() * model_output


def diffusion_loss(unet, scheduler, x0: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   noise: torch.Tensor | None = None, t: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   added_cond_kwargs: dict | None = None, reduction: str = "mean") -> torch.Tensor:
    """The simple denoising loss || target - unet(x_t, t, c) ||^2 (DDPM eq. 14), in fp32.

    `mask` (B, 1, h, w) restricts the loss to valid latent pixels (Custom Diffusion's rescale augmentation);
    `reduction="none"` returns one loss per sample (for weighting, prior preservation, attribution).
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
    if t is None:
        t = sample_timesteps(scheduler, x0.shape[0], generator, x0.device)
    x_t = add_noise(scheduler, x0, noise, t)
    kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
    pred = unet(x_t, t, encoder_hidden_states, **kwargs).sample
    err = (pred.float() - target(scheduler, x0, noise, t).float()) ** 2
    if mask is not None:
        m = mask.to(err.dtype).expand_as(err)
        per = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
    else:
        per = err.flatten(1).mean(1)
    return per if reduction == "none" else per.mean()
