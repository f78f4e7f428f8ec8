"""SD 1.x / 2.x (epsilon or v-prediction): one CLIP text encoder, no added conditioning, a
UNet trained with DDPM noise. The paper's method: the ControlNet is a trainable copy of the
UNet encoder (`ControlNetModel.from_unet`) joined by zero convolutions, the loss the
noise-prediction (or velocity) MSE. SDXL builds on this family."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from . import Family, FamilyError, Frozen, Noised, cast, initialise, load_frozen


def sample_timesteps(how: str, batch: int, total: int, device, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """`uniform` as the paper; `cubic` as T2I-Adapter: t = (1 - u^3) T puts most samples at
    high noise, where the layout is decided and the condition carries the most information."""
    if how == "cubic":
        u = torch.rand(batch, device=device, generator=generator)
        return ((1 - u ** 3) * total).long().clamp(0, total - 1)
    return torch.randint(0, total, (batch,), device=device, generator=generator).long()


class SD(Family):
    NAME = "sd"
    TITLE = "SD 1.x/2.x"
    PIPELINE = "StableDiffusionControlNetPipeline"
    BASE_PIPELINE = "StableDiffusionPipeline"
    CONTROL_IMAGE_ARG = "image"
    EXTRA_PIPELINE_ARGS: dict = {}
    EXAMPLE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    SAMPLES_THROUGH_PIPELINE = False
    CACHED_TEXT = True

    def load(self, pretrained: str, dtype: torch.dtype, text: bool = True) -> Frozen:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        return load_frozen(self, pretrained, dtype, (UNet2DConditionModel, "unet"), DDPMScheduler, text)

    def text_parts(self, pretrained: str) -> tuple[list, list]:
        from transformers import CLIPTextModel, CLIPTokenizer

        return [(CLIPTokenizer, "tokenizer")], [(CLIPTextModel, "text_encoder")]

    def check_settings(self, frozen: Frozen, cfg) -> None:
        """Every training setting applies to a UNet base; consistency fine-tuning needs a
        condition with a differentiable counterpart (train/consistency.py)."""
        from ..consistency import CONDITIONS

        if cfg.consistency_weight > 0 and cfg.condition not in CONDITIONS:
            raise FamilyError(f"--consistency-weight: condition {cfg.condition!r} has no differentiable counterpart "
                              f"here (it has for: {', '.join(CONDITIONS)})")

    def check_resolution(self, frozen: Frozen, resolution: int) -> None:
        """The latent must halve evenly through every UNet level."""
        levels = len(frozen.denoiser.config.down_block_types) - 1
        step = frozen.vae_scale_factor * 2 ** levels
        if resolution % step:
            raise FamilyError(f"resolution {resolution} does not fit {frozen.pretrained}: it must be a multiple of "
                              f"{step} (VAE factor {frozen.vae_scale_factor} x 2^{levels} UNet levels)")

    def check_controlnet(self, frozen: Frozen, controlnet, where: str) -> None:
        if type(controlnet).__name__ != "ControlNetModel":
            raise FamilyError(f"{where}: this ControlNet was made for another kind of base model "
                              f"({type(controlnet).__name__}; the base {frozen.pretrained} is {self.NAME})")
        unet, net = frozen.denoiser.config, controlnet.config
        for key in ("cross_attention_dim", "addition_embed_type", "in_channels"):
            if net.get(key) != unet.get(key):
                raise FamilyError(f"{where}: this ControlNet was made for another kind of base model ({key} is "
                                  f"{net.get(key)!r}, the base {frozen.pretrained} has {unet.get(key)!r})")
        factor = 2 ** (len(net.conditioning_embedding_out_channels) - 1)
        if factor != frozen.vae_scale_factor:
            raise FamilyError(f"{where}: its condition encoder shrinks images by {factor}, but the base's VAE by "
                              f"{frozen.vae_scale_factor}: this ControlNet was trained for another base model")

    def encode_prompts(self, frozen: Frozen, prompts: list[str], device) -> tuple[torch.Tensor, None]:
        """The CLIP text encoder's last hidden states; no pooled embedding."""
        tokenizer, text_encoder = frozen.tokenizers[0], frozen.text_encoders[0]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return text_encoder(ids, return_dict=False)[0], None

    def conditioning(self, frozen: Frozen, prompts: list[str], device, sizes: Any = None,
                     target: tuple[int, int] | None = None, embeds: tuple | None = None
                     ) -> tuple[torch.Tensor, dict | None]:
        """Text hidden states for the cross-attention; SD has no added conditioning."""
        hidden, _ = embeds if embeds is not None else self.encode_prompts(frozen, prompts, device)
        return hidden, None

    def embedding_dims(self, frozen: Frozen) -> tuple[int, int | None]:
        return int(frozen.denoiser.config.cross_attention_dim), None

    def noisy_latents(self, frozen: Frozen, latents: torch.Tensor, cfg, device) -> Noised:
        scheduler = frozen.scheduler
        noise = torch.randn_like(latents)
        timesteps = sample_timesteps(cfg.timestep_sampling, latents.shape[0], scheduler.config.num_train_timesteps,
                                     device)
        return Noised(scheduler.add_noise(latents, noise, timesteps), noise, timesteps)

    def loss(self, batch, cfg, frozen: Frozen, denoiser, controlnet, dropout, device, dtype,
             log=print) -> torch.Tensor:
        vae, noise_scheduler = frozen.vae, frozen.scheduler
        with torch.no_grad():
            if "latents" in batch:  # cached at build time: mean x scaling factor
                latents = batch["latents"].to(device).float()
            else:
                latents = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist.sample()
                latents = (latents * vae.config.scaling_factor).float()
            hidden, added = self.batch_conditioning(frozen, batch, dropout, device, batch.get("sizes"),
                                                    tuple(batch["pixel_values"].shape[-2:]))  # (h, w): buckets too
        noisy, noise, timesteps, _ = self.noisy_latents(frozen, latents, cfg, device)
        condition = batch["conditioning_pixel_values"].to(device)
        prediction = self.denoise(noisy, timesteps, hidden, added, condition, denoiser, controlnet, cfg)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        if cfg.consistency_weight > 0:  # no extra random draws otherwise
            loss = loss + cfg.consistency_weight * self.consistency_loss(frozen, latents, hidden, added, condition,
                                                                         denoiser, controlnet, cfg, device)
        return loss

    def denoise(self, noisy, timesteps, hidden, added, condition, denoiser, controlnet, cfg) -> torch.Tensor:
        """The UNet's output with the ControlNet's residuals added."""
        down, mid = controlnet(noisy, timesteps, encoder_hidden_states=hidden.float(),
                               added_cond_kwargs=cast(added, torch.float32), controlnet_cond=condition,
                               return_dict=False)
        unet_dtype = next(denoiser.parameters()).dtype
        return denoiser(noisy.to(unet_dtype), timesteps, encoder_hidden_states=hidden.to(unet_dtype),
                        added_cond_kwargs=cast(added, unet_dtype),
                        down_block_additional_residuals=None if cfg.only_mid_control
                        else [d.to(unet_dtype) for d in down],
                        mid_block_additional_residual=mid.to(unet_dtype), return_dict=False)[0]

    def consistency_loss(self, frozen: Frozen, latents, hidden, added, condition, denoiser, controlnet, cfg,
                         device) -> torch.Tensor:
        """ControlNet++'s consistency loss (train/consistency.py): the same batch lightly
        noised (t below cfg.consistency_max_timestep), denoised in one step, decoded by the
        VAE and re-annotated differentiably, against its condition."""
        from .. import consistency

        timesteps = consistency.low_timesteps(latents.shape[0], cfg.consistency_max_timestep, device)
        noisy = frozen.scheduler.add_noise(latents, torch.randn_like(latents), timesteps)
        prediction = self.denoise(noisy, timesteps, hidden, added, condition, denoiser, controlnet, cfg)
        clean = consistency.predicted_clean(frozen.scheduler, noisy, prediction, timesteps)
        return consistency.edge_loss(frozen.vae, clean, condition)

    def controlnet_class(self):
        from diffusers import ControlNetModel

        return ControlNetModel

    def new_controlnet(self, frozen: Frozen, init: str):
        """The trainable copy of the UNet encoder. Its condition encoder must shrink the
        condition image by the VAE's factor (SD's is 8; a tiny base may use 4), so its stride-2
        convolutions are cut to log2(factor). `init="random"` re-initialises the zero
        convolutions (an ablation of the paper's design: noise reaches the UNet at step 0)."""
        factor = frozen.vae_scale_factor
        levels = int(round(math.log2(factor)))
        if 2 ** levels != factor or levels < 1:
            raise FamilyError(f"the VAE's downsampling factor {factor} is not a power of two >= 2")
        channels = (16, 32, 96, 256, 256, 256)[:levels + 1]
        net = self.controlnet_class().from_unet(frozen.denoiser, conditioning_embedding_out_channels=channels)
        initialise((*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out), init)
        return net

    def sampling_scheduler(self, frozen: Frozen):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(frozen.scheduler.config)

    def pipeline_parts(self, frozen: Frozen, denoiser, scheduler) -> dict:
        text = bool(frozen.text_encoders)  # none when the run trains on cached prompt embeddings
        return dict(vae=frozen.vae, text_encoder=frozen.text_encoders[0] if text else None,
                    tokenizer=frozen.tokenizers[0] if text else None, unet=denoiser,
                    scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
