"""SD 1.x / 2.x (epsilon or v-prediction): one CLIP text encoder, no added conditioning."""

from __future__ import annotations

import sys
from typing import Any

import torch

from . import Frozen, load_frozen

NAME = "sd"
PIPELINE = "StableDiffusionControlNetPipeline"


def load(pretrained: str, dtype: torch.dtype) -> Frozen:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return load_frozen(sys.modules[__name__], pretrained, dtype, "stable-diffusion-v1-5/stable-diffusion-v1-5",
                       [(CLIPTokenizer, "tokenizer")], [(CLIPTextModel, "text_encoder")],
                       (UNet2DConditionModel, "unet"), DDPMScheduler)


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
