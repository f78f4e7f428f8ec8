"""Flow matching, shared by the rectified-flow families (SD3, Flux), as diffusers' SD3 and
Flux ControlNet scripts train: timesteps drawn from a logit-normal density, noisy =
(1 - s) x + s noise, target noise - x, SD3's loss weighting. `Flow` is what those families
share: they sample through their diffusers pipelines, and reject UNet-only settings."""

from __future__ import annotations

import torch

from . import Family, FamilyError, Frozen, Noised

MAX_SEQUENCE_LENGTH = 77  # T5 tokens, as diffusers' SD3 and Flux ControlNet training scripts


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


#: trainer settings that only make sense with a UNet
UNET_ONLY = ("unlock_decoder", "only_mid_control")


class Flow(Family):
    """The rectified-flow families: a transformer denoiser, flow-matching noise, sampling
    through the family's diffusers pipeline (the control in both CFG branches)."""

    CONTROL_IMAGE_ARG = "control_image"
    EXTRA_PIPELINE_ARGS = {"max_sequence_length": MAX_SEQUENCE_LENGTH}
    SAMPLES_THROUGH_PIPELINE = True
    CACHED_TEXT = True

    def embedding_dims(self, frozen: Frozen) -> tuple[int, int]:
        """The transformer's text input: joint_attention_dim (CLIP and T5 hidden states, as
        the pipeline's `encode_prompt` makes them) and pooled_projection_dim."""
        config = frozen.denoiser.config
        return int(config.joint_attention_dim), int(config.pooled_projection_dim)

    @staticmethod
    def text_part(frozen: Frozen, index: int):
        """The index-th tokenizer and text encoder, or (None, None) when the run has none
        loaded (it trains on cached prompt embeddings) or the base has fewer."""
        if index >= len(frozen.text_encoders):
            return None, None
        return frozen.tokenizers[index], frozen.text_encoders[index]

    def check_settings(self, frozen: Frozen, cfg) -> None:
        if cfg.consistency_weight > 0:
            raise FamilyError(f"--consistency-weight is implemented for SD 1.x/2.x and SDXL bases, not {self.TITLE}")
        for name in UNET_ONLY:
            if getattr(cfg, name, False):
                raise FamilyError(f"--{name.replace('_', '-')} applies to UNet bases (SD, SDXL), not {self.TITLE}")

    def check_controlnet(self, frozen: Frozen, controlnet, where: str) -> None:
        """Of this family's class, and made for a base of the same shape (the config keys
        `CONTROLNET_KEYS` agree with the transformer's)."""
        if type(controlnet).__name__ != self.controlnet_class().__name__:
            raise FamilyError(f"{where}: this ControlNet was made for another kind of base model "
                              f"({type(controlnet).__name__}; the base {frozen.pretrained} is {self.TITLE})")
        for key in self.CONTROLNET_KEYS:
            if controlnet.config.get(key) != frozen.denoiser.config.get(key):
                raise FamilyError(f"{where}: this ControlNet was made for another {self.TITLE} base ({key} "
                                  f"{controlnet.config.get(key)!r} vs {frozen.denoiser.config.get(key)!r})")

    #: ControlNet config keys that must equal the base transformer's
    CONTROLNET_KEYS: tuple[str, ...] = ()

    def noisy_latents(self, frozen: Frozen, latents: torch.Tensor, cfg, device) -> Noised:
        return Noised(*noisy_latents(frozen.scheduler, latents, device))

    def sampling_scheduler(self, frozen: Frozen):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(frozen.scheduler.config)
