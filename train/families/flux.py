"""Flux: a rectified-flow transformer on 2x2-packed latents. CLIP (pooled) and T5 prompts
through the diffusers pipeline's own `encode_prompt`; `FluxControlNetModel.from_transformer`
sees the condition as packed VAE latents; the guidance embedding gets the distilled guidance
scale where the base has one. Training follows diffusers' Flux ControlNet script: logit-normal
timestep density, noisy = (1 - s) x + s noise, target noise - x, on packed latents."""

from __future__ import annotations

from typing import Any

import torch

from . import FamilyError, Frozen, flow, initialise, load_frozen

GUIDANCE = 3.5  # the distilled guidance scale a Flux-dev base is trained and sampled with


def _pack(latents: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """[B, C, H, W] latents -> 2x2-packed [B, H/2 * W/2, 4C], and H, W (for the image ids)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w), h, w


def _packed_latents(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    latents = vae.encode(pixels).latent_dist.sample()
    return _pack((latents - vae.config.shift_factor) * vae.config.scaling_factor)


class Flux(flow.Flow):
    NAME = "flux"
    TITLE = "Flux"
    PIPELINE = "FluxControlNetPipeline"
    BASE_PIPELINE = "FluxPipeline"
    EXAMPLE = "black-forest-labs/FLUX.1-dev"
    CONTROLNET_KEYS = ("joint_attention_dim", "in_channels", "pooled_projection_dim", "guidance_embeds")

    def load(self, pretrained: str, dtype: torch.dtype, text: bool = True) -> Frozen:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        return load_frozen(self, pretrained, dtype, (FluxTransformer2DModel, "transformer"),
                           FlowMatchEulerDiscreteScheduler, text)

    def text_parts(self, pretrained: str) -> tuple[list, list]:
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        return ([(CLIPTokenizer, "tokenizer"), (T5TokenizerFast, "tokenizer_2")],
                [(CLIPTextModel, "text_encoder"), (T5EncoderModel, "text_encoder_2")])

    def check_resolution(self, frozen: Frozen, resolution: int) -> None:
        step = frozen.vae_scale_factor * 2  # latents are packed in 2x2 patches
        if resolution % step:
            raise FamilyError(f"resolution {resolution} does not fit {frozen.pretrained}: it must be a multiple of "
                              f"{step} (VAE factor {frozen.vae_scale_factor} x 2 for Flux's packed latents)")

    def encode_prompts(self, frozen: Frozen, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's own `encode_prompt`: T5 hidden states, CLIP's pooled output."""
        embeds, pooled, _ = self.base_pipeline(frozen).encode_prompt(
            prompts, None, device=device, max_sequence_length=flow.MAX_SEQUENCE_LENGTH)
        return embeds, pooled

    def conditioning(self, frozen: Frozen, prompts: list[str], device, sizes: Any = None,
                     target: tuple[int, int] | None = None, embeds: tuple | None = None) -> tuple[torch.Tensor, dict]:
        hidden, pooled = embeds if embeds is not None else self.encode_prompts(frozen, prompts, device)
        text_ids = torch.zeros(hidden.shape[1], 3, device=device, dtype=hidden.dtype)  # as the pipeline makes them
        return hidden, {"pooled_projections": pooled, "txt_ids": text_ids}

    def loss(self, batch, cfg, frozen: Frozen, denoiser, controlnet, dropout, device, dtype,
             log=print) -> torch.Tensor:
        from diffusers import FluxPipeline

        vae = frozen.vae
        with torch.no_grad():
            if "latents" in batch:  # cached at build time, shifted and scaled: only the packing is left
                latents, h, w = _pack(batch["latents"].to(device).float())
            else:
                latents, h, w = _packed_latents(vae, batch["pixel_values"].to(device, dtype))
            condition, _, _ = _packed_latents(vae, (batch["conditioning_pixel_values"] * 2 - 1).to(device, dtype))
            embeds, added = self.batch_conditioning(frozen, batch, dropout, device)
        latents, condition = latents.float(), condition.float()
        image_ids = FluxPipeline._prepare_latent_image_ids(latents.shape[0], h // 2, w // 2, device, latents.dtype)
        noisy, noise, timesteps, sigmas = self.noisy_latents(frozen, latents, cfg, device)
        guidance = (torch.full((latents.shape[0],), GUIDANCE, device=device)
                    if denoiser.config.guidance_embeds else None)
        common = dict(timestep=timesteps / 1000, guidance=guidance,
                      pooled_projections=added["pooled_projections"].float(), encoder_hidden_states=embeds.float(),
                      txt_ids=added["txt_ids"], img_ids=image_ids, return_dict=False)
        blocks, single_blocks = controlnet(hidden_states=noisy, controlnet_cond=condition, **common)
        model_dtype = next(denoiser.parameters()).dtype
        cast = (lambda xs: None if xs is None else [x.to(model_dtype) for x in xs])
        prediction = denoiser(hidden_states=noisy.to(model_dtype), controlnet_block_samples=cast(blocks),
                              controlnet_single_block_samples=cast(single_blocks),
                              **{**common, "pooled_projections": common["pooled_projections"].to(model_dtype),
                                 "encoder_hidden_states": common["encoder_hidden_states"].to(model_dtype)})[0]
        return flow.loss(prediction, noise, latents, sigmas)

    def controlnet_class(self):
        from diffusers import FluxControlNetModel

        return FluxControlNetModel

    def new_controlnet(self, frozen: Frozen, init: str):
        config = frozen.denoiser.config
        net = self.controlnet_class().from_transformer(
            frozen.denoiser, num_layers=min(4, config.num_layers), num_single_layers=min(10, config.num_single_layers),
            attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads)
        initialise((*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder), init)
        return net

    def cached_prompt_args(self, frozen: Frozen, pipe, hidden, pooled, device) -> dict:
        """The prompts' stored embeddings; Flux-dev has no negative branch (its guidance is
        distilled into the guidance embedding)."""
        return {"prompt_embeds": hidden.to(device), "pooled_prompt_embeds": pooled.to(device)}

    def pipeline_parts(self, frozen: Frozen, denoiser, scheduler) -> dict:
        (tokenizer, encoder), (tokenizer_2, encoder_2) = (self.text_part(frozen, i) for i in range(2))
        return dict(scheduler=scheduler, vae=frozen.vae, text_encoder=encoder, tokenizer=tokenizer,
                    text_encoder_2=encoder_2, tokenizer_2=tokenizer_2, transformer=denoiser)
