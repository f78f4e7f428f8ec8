"""SD3: an MMDiT transformer with flow matching. Two CLIP text encoders with projections
(and T5 when the base has it; without it the pipeline's zeros stand in, as diffusers does),
prompts encoded by the diffusers pipeline's own `encode_prompt`; the ControlNet is
`SD3ControlNetModel.from_transformer`, and it sees the condition as VAE latents. Training
follows diffusers' SD3 ControlNet script: logit-normal timestep density, noisy = (1 - s) x
+ s noise, target noise - x, SD3 loss weighting."""

from __future__ import annotations

import sys
from typing import Any

import torch

from . import FamilyError, Frozen, flow, initialise, load_frozen

NAME = "sd3"
PIPELINE = "StableDiffusion3ControlNetPipeline"
MAX_SEQUENCE_LENGTH = 77  # T5 tokens, as diffusers' SD3 ControlNet training script


def load(pretrained: str, dtype: torch.dtype) -> Frozen:
    """T5 (text_encoder_3) is loaded when the base has it; without it the pipeline's zeros
    stand in for its embeddings, as diffusers does."""
    import os

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    tokenizers = [(CLIPTokenizer, "tokenizer"), (CLIPTokenizer, "tokenizer_2")]
    encoders = [(CLIPTextModelWithProjection, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")]
    if os.path.isdir(os.path.join(pretrained, "text_encoder_3")):
        tokenizers.append((AutoTokenizer, "tokenizer_3"))
        encoders.append((T5EncoderModel, "text_encoder_3"))
    return load_frozen(sys.modules[__name__], pretrained, dtype, "stabilityai/stable-diffusion-3-medium-diffusers",
                       tokenizers, encoders, (SD3Transformer2DModel, "transformer"), FlowMatchEulerDiscreteScheduler)


def _prompt_pipeline(frozen: Frozen):
    """The diffusers pipeline object, only for its encode_prompt (made once)."""
    pipe = frozen.prompt_pipe
    if pipe is None:
        from diffusers import StableDiffusion3Pipeline

        third = len(frozen.text_encoders) > 2
        pipe = StableDiffusion3Pipeline(
            transformer=frozen.unet, scheduler=frozen.scheduler, vae=frozen.vae,
            text_encoder=frozen.text_encoders[0], tokenizer=frozen.tokenizers[0],
            text_encoder_2=frozen.text_encoders[1], tokenizer_2=frozen.tokenizers[1],
            text_encoder_3=frozen.text_encoders[2] if third else None, tokenizer_3=frozen.tokenizers[2] if third else None)
        frozen.prompt_pipe = pipe
    return pipe


def conditioning(frozen: Frozen, prompts: list[str], device, sizes: Any = None,
                 target: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
    embeds, _, pooled, _ = _prompt_pipeline(frozen).encode_prompt(
        prompts, None, None, device=device, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)
    return embeds, {"pooled_projections": pooled}


def make_controlnet(frozen: Frozen, controlnet: str | None, init: str):
    from diffusers import SD3ControlNetModel

    if controlnet:
        try:
            return SD3ControlNetModel.from_pretrained(controlnet)
        except (OSError, ValueError, TypeError) as exc:
            raise FamilyError(f"cannot load {controlnet!r} as an SD3 ControlNet (made for another kind of base model?): "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from None
    transformer = frozen.unet
    # the first blocks (at most 12, as diffusers does; never the last, which differs: context_pre_only)
    net = SD3ControlNetModel.from_transformer(transformer, num_layers=max(1, min(12, transformer.config.num_layers - 1)),
                                              num_extra_conditioning_channels=0)
    # the condition latent gets the VAE shift and the ControlNet the pooled prompt, as in training below
    net.register_to_config(force_zeros_for_pooled_projection=False)
    initialise((*net.controlnet_blocks, net.pos_embed_input.proj), init)
    return net


def check(frozen: Frozen, cfg) -> None:
    flow.check_unet_only(cfg, "SD3")


def check_resolution(frozen: Frozen, resolution: int) -> None:
    step = frozen.vae_scale_factor * frozen.unet.config.patch_size
    if resolution % step:
        raise FamilyError(f"resolution {resolution} does not fit {frozen.pretrained}: it must be a multiple of {step} "
                          f"(VAE factor {frozen.vae_scale_factor} x patch size {frozen.unet.config.patch_size})")


def check_controlnet(frozen: Frozen, controlnet, where: str) -> None:
    if type(controlnet).__name__ != "SD3ControlNetModel":
        raise FamilyError(f"{where}: this ControlNet was made for another kind of base model "
                          f"({type(controlnet).__name__}, the base {frozen.pretrained} is SD3)")
    for key in ("joint_attention_dim", "in_channels", "patch_size"):
        if controlnet.config.get(key) != frozen.unet.config.get(key):
            raise FamilyError(f"{where}: this ControlNet was made for another SD3 base ({key} "
                              f"{controlnet.config.get(key)!r} vs {frozen.unet.config.get(key)!r})")


def encode_latents(vae, pixels: torch.Tensor, sample: bool = True) -> torch.Tensor:
    dist = vae.encode(pixels).latent_dist
    latents = dist.sample() if sample else dist.mode()
    return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def loss(batch, cfg, frozen: Frozen, transformer, controlnet, dropout, device, dtype, log=print) -> torch.Tensor:
    vae = frozen.vae
    with torch.no_grad():
        if "latents" in batch:
            latents = batch["latents"].to(device).float()
        else:
            latents = encode_latents(vae, batch["pixel_values"].to(device, dtype)).float()
        condition = encode_latents(vae, (batch["conditioning_pixel_values"] * 2 - 1).to(device, dtype)).float()
        embeds, added = conditioning(frozen, dropout(batch["text"]), device)
    noisy, noise, timesteps, sigmas = flow.noisy_latents(frozen.scheduler, latents, device)
    pooled = added["pooled_projections"]
    blocks = controlnet(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds.float(),
                        pooled_projections=pooled.float(), controlnet_cond=condition, return_dict=False)[0]
    model_dtype = next(transformer.parameters()).dtype
    prediction = transformer(hidden_states=noisy.to(model_dtype), timestep=timesteps,
                             encoder_hidden_states=embeds.to(model_dtype), pooled_projections=pooled.to(model_dtype),
                             block_controlnet_hidden_states=[b.to(model_dtype) for b in blocks], return_dict=False)[0]
    return flow.loss(prediction, noise, latents, sigmas)


sampling_scheduler = flow.sampling_scheduler


def pipeline(frozen: Frozen, transformer, controlnet, scheduler):
    from diffusers import StableDiffusion3ControlNetPipeline

    third = len(frozen.text_encoders) > 2
    return StableDiffusion3ControlNetPipeline(
        transformer=transformer, scheduler=scheduler, vae=frozen.vae, text_encoder=frozen.text_encoders[0],
        tokenizer=frozen.tokenizers[0], text_encoder_2=frozen.text_encoders[1], tokenizer_2=frozen.tokenizers[1],
        text_encoder_3=frozen.text_encoders[2] if third else None, tokenizer_3=frozen.tokenizers[2] if third else None,
        controlnet=controlnet)


CONTROL_IMAGE_ARG = "control_image"
EXTRA_PIPELINE_ARGS = {"max_sequence_length": MAX_SEQUENCE_LENGTH}
