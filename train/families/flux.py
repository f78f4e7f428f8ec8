"""Flux: a rectified-flow transformer on 2x2-packed latents. CLIP (pooled) and T5 prompts
through the diffusers pipeline's own `encode_prompt`; `FluxControlNetModel.from_transformer`
sees the condition as packed VAE latents; the guidance embedding gets the distilled guidance
scale where the base has one. Training follows diffusers' Flux ControlNet script: logit-normal
timestep density, noisy = (1 - s) x + s noise, target noise - x, on packed latents."""

from __future__ import annotations

import sys
from typing import Any

import torch

from . import FamilyError, Frozen, flow, initialise, load_frozen

NAME = "flux"
PIPELINE = "FluxControlNetPipeline"
MAX_SEQUENCE_LENGTH = 77
GUIDANCE = 3.5  # the distilled guidance scale a Flux-dev base is trained and sampled with
CONTROL_IMAGE_ARG = "control_image"
EXTRA_PIPELINE_ARGS = {"max_sequence_length": MAX_SEQUENCE_LENGTH}


def load(pretrained: str, dtype: torch.dtype) -> Frozen:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    return load_frozen(sys.modules[__name__], pretrained, dtype, "black-forest-labs/FLUX.1-dev",
                       [(CLIPTokenizer, "tokenizer"), (T5TokenizerFast, "tokenizer_2")],
                       [(CLIPTextModel, "text_encoder"), (T5EncoderModel, "text_encoder_2")],
                       (FluxTransformer2DModel, "transformer"), FlowMatchEulerDiscreteScheduler)


def _prompt_pipeline(frozen: Frozen):
    pipe = frozen.prompt_pipe
    if pipe is None:
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=frozen.scheduler, vae=frozen.vae, text_encoder=frozen.text_encoders[0],
                            tokenizer=frozen.tokenizers[0], text_encoder_2=frozen.text_encoders[1],
                            tokenizer_2=frozen.tokenizers[1], transformer=frozen.unet)
        frozen.prompt_pipe = pipe
    return pipe


def conditioning(frozen: Frozen, prompts: list[str], device, sizes: Any = None,
                 target: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
    embeds, pooled, text_ids = _prompt_pipeline(frozen).encode_prompt(
        prompts, None, device=device, max_sequence_length=MAX_SEQUENCE_LENGTH)
    return embeds, {"pooled_projections": pooled, "txt_ids": text_ids}


def make_controlnet(frozen: Frozen, controlnet: str | None, init: str):
    from diffusers import FluxControlNetModel

    if controlnet:
        try:
            return FluxControlNetModel.from_pretrained(controlnet)
        except (OSError, ValueError, TypeError) as exc:
            raise FamilyError(f"cannot load {controlnet!r} as a Flux ControlNet (made for another kind of base "
                              f"model?): {type(exc).__name__}: {str(exc)[:200]}") from None
    config = frozen.unet.config
    net = FluxControlNetModel.from_transformer(
        frozen.unet, num_layers=min(4, config.num_layers), num_single_layers=min(10, config.num_single_layers),
        attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads)
    initialise((*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder), init)
    return net


def check(frozen: Frozen, cfg) -> None:
    flow.check_unet_only(cfg, "Flux")


def check_resolution(frozen: Frozen, resolution: int) -> None:
    step = frozen.vae_scale_factor * 2  # latents are packed in 2x2 patches
    if resolution % step:
        raise FamilyError(f"resolution {resolution} does not fit {frozen.pretrained}: it must be a multiple of {step} "
                          f"(VAE factor {frozen.vae_scale_factor} x 2 for Flux's packed latents)")


def check_controlnet(frozen: Frozen, controlnet, where: str) -> None:
    if type(controlnet).__name__ != "FluxControlNetModel":
        raise FamilyError(f"{where}: this ControlNet was made for another kind of base model "
                          f"({type(controlnet).__name__}; the base {frozen.pretrained} is Flux)")
    for key in ("joint_attention_dim", "in_channels", "pooled_projection_dim", "guidance_embeds"):
        if controlnet.config.get(key) != frozen.unet.config.get(key):
            raise FamilyError(f"{where}: this ControlNet was made for another Flux base ({key} "
                              f"{controlnet.config.get(key)!r} vs {frozen.unet.config.get(key)!r})")


def _packed_latents(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    from diffusers import FluxPipeline

    latents = vae.encode(pixels).latent_dist.sample()
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w), h, w


def loss(batch, cfg, frozen: Frozen, transformer, controlnet, dropout, device, dtype, log=print) -> torch.Tensor:
    from diffusers import FluxPipeline

    vae = frozen.vae
    with torch.no_grad():
        latents, h, w = _packed_latents(vae, batch["pixel_values"].to(device, dtype))
        condition, _, _ = _packed_latents(vae, (batch["conditioning_pixel_values"] * 2 - 1).to(device, dtype))
        embeds, added = conditioning(frozen, dropout(batch["text"]), device)
    latents, condition = latents.float(), condition.float()
    image_ids = FluxPipeline._prepare_latent_image_ids(latents.shape[0], h // 2, w // 2, device, latents.dtype)
    noisy, noise, timesteps, sigmas = flow.noisy_latents(frozen.scheduler, latents, device)
    guidance = (torch.full((latents.shape[0],), GUIDANCE, device=device)
                if transformer.config.guidance_embeds else None)
    common = dict(timestep=timesteps / 1000, guidance=guidance, pooled_projections=added["pooled_projections"].float(),
                  encoder_hidden_states=embeds.float(), txt_ids=added["txt_ids"], img_ids=image_ids, return_dict=False)
    blocks, single_blocks = controlnet(hidden_states=noisy, controlnet_cond=condition, **common)
    model_dtype = next(transformer.parameters()).dtype
    cast = (lambda xs: None if xs is None else [x.to(model_dtype) for x in xs])
    prediction = transformer(hidden_states=noisy.to(model_dtype), controlnet_block_samples=cast(blocks),
                             controlnet_single_block_samples=cast(single_blocks),
                             **{**common, "pooled_projections": common["pooled_projections"].to(model_dtype),
                                "encoder_hidden_states": common["encoder_hidden_states"].to(model_dtype)})[0]
    return flow.loss(prediction, noise, latents, sigmas)


sampling_scheduler = flow.sampling_scheduler


def pipeline(frozen: Frozen, transformer, controlnet, scheduler):
    from diffusers import FluxControlNetPipeline

    return FluxControlNetPipeline(scheduler=scheduler, vae=frozen.vae, text_encoder=frozen.text_encoders[0],
                                  tokenizer=frozen.tokenizers[0], text_encoder_2=frozen.text_encoders[1],
                                  tokenizer_2=frozen.tokenizers[1], transformer=transformer, controlnet=controlnet)
