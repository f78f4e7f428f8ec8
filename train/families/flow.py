"""Flow matching, shared by the rectified-flow families (SD3, Flux), as diffusers' SD3 and
Flux ControlNet scripts train: timesteps drawn from a logit-normal density, noisy =
(1 - s) x + s noise, target noise - x, SD3's loss weighting."""

from __future__ import annotations

import torch


def noisy_latents(scheduler, latents: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, noise, timesteps, sigmas shaped to broadcast over latents)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    noise = torch.randn_like(latents)
    steps = scheduler.config.num_train_timesteps
    u = compute_density_for_timestep_sampling("logit_normal", latents.shape[0], logit_mean=0.0, logit_std=1.0)
    indices = (u * steps).long().clamp(0, steps - 1)
    timesteps = scheduler.timesteps[indices].to(device)
    sigmas = scheduler.sigmas.to(device)[indices].float().view(-1, *[1] * (latents.dim() - 1))
    return (1.0 - sigmas) * latents + sigmas * noise, noise, timesteps, sigmas


def loss(prediction: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weighting = compute_loss_weighting_for_sd3("logit_normal", sigmas=sigmas)
    target = noise - latents
    return (weighting.float() * (prediction.float() - target) ** 2).reshape(latents.shape[0], -1).mean(1).mean()


def sampling_scheduler(frozen):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(frozen.scheduler.config)


#: trainer settings that only make sense with a UNet
UNET_ONLY = ("unlock_decoder", "only_mid_control")


def check_unet_only(cfg, family: str) -> None:
    from . import FamilyError

    for name in UNET_ONLY:
        if getattr(cfg, name, False):
            raise FamilyError(f"--{name.replace('_', '-')} applies to UNet bases (SD, SDXL), not {family}")
