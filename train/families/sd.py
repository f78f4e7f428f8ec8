"""SD 1.x / 2.x (epsilon or v-prediction): one CLIP text encoder, no added conditioning."""

from __future__ import annotations

import sys
from typing import Any

import torch

from . import Frozen, load_error

NAME = "sd"
PIPELINE = "StableDiffusionControlNetPipeline"


def load(pretrained: str, dtype: torch.dtype) -> Frozen:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise load_error(pretrained, exc, "stable-diffusion-v1-5/stable-diffusion-v1-5") from None
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.eval()
    return Frozen(sys.modules[__name__], pretrained, [tokenizer], [text_encoder.to(dtype)], vae.to(dtype),
                  unet, scheduler)


def conditioning(frozen: Frozen, prompts: list[str], device, sizes: Any = None,
                 target: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict | None]:
    """Text hidden states for the cross-attention; SD has no added conditioning."""
    tokenizer, text_encoder = frozen.tokenizers[0], frozen.text_encoders[0]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids, return_dict=False)[0], None


def pipeline(frozen: Frozen, unet, controlnet, scheduler):
    from diffusers import StableDiffusionControlNetPipeline

    return StableDiffusionControlNetPipeline(
        vae=frozen.vae, text_encoder=frozen.text_encoders[0], tokenizer=frozen.tokenizers[0], unet=unet,
        controlnet=controlnet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
