"""SDXL: two CLIP text encoders (hidden states of the penultimate layer, concatenated),
the second one's pooled projection, and `time_ids` (original size, crop offset, target
size) as added conditioning, for the UNet and the ControlNet alike. Otherwise SD's UNet
training and ControlNet."""

from __future__ import annotations

from typing import Any

import torch

from . import Frozen, load_frozen
from .sd import SD


def time_ids(sizes: Any, batch: int, target: tuple[int, int]) -> torch.Tensor:
    """(original h, w, crop top, left, target h, w) per sample; `sizes` holds the recorded
    `original_size` and `crop_top_left` (B x 2 each), or None: then the target size and no crop."""
    if sizes is None:
        rows = [[*target, 0, 0, *target]] * batch
        return torch.tensor(rows, dtype=torch.float32)
    return torch.cat([sizes["original_size"].float(), sizes["crop_top_left"].float(),
                      torch.tensor([list(target)] * batch, dtype=torch.float32)], dim=1)


class SDXL(SD):
    NAME = "sdxl"
    TITLE = "SDXL"
    PIPELINE = "StableDiffusionXLControlNetPipeline"
    BASE_PIPELINE = "StableDiffusionXLPipeline"
    EXAMPLE = "stabilityai/stable-diffusion-xl-base-1.0"

    def load(self, pretrained: str, dtype: torch.dtype) -> Frozen:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        return load_frozen(self, pretrained, dtype, [(CLIPTokenizer, "tokenizer"), (CLIPTokenizer, "tokenizer_2")],
                           [(CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")],
                           (UNet2DConditionModel, "unet"), DDPMScheduler)

    def conditioning(self, frozen: Frozen, prompts: list[str], device, sizes: Any = None,
                     target: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(frozen.tokenizers, frozen.text_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]  # the last encoder's (CLIPTextModelWithProjection) text_embeds
            hidden.append(out.hidden_states[-2])
        target = target or (frozen.denoiser.config.sample_size * frozen.vae_scale_factor,) * 2
        ids = time_ids(sizes, len(prompts), target).to(device, pooled.dtype)
        return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": ids}

    def loss(self, batch, cfg, frozen: Frozen, denoiser, controlnet, dropout, device, dtype,
             log=print) -> torch.Tensor:
        if not (batch.get("sizes") or {}).get("recorded") and "sizes" not in frozen.notes:
            frozen.notes.add("sizes")
            log("note: these shards do not record each sample's original size and crop offset (json orig_width/"
                "orig_height, crop_top/crop_left); SDXL's time_ids use the image size and no crop for those")
        return super().loss(batch, cfg, frozen, denoiser, controlnet, dropout, device, dtype, log)

    def pipeline_parts(self, frozen: Frozen, denoiser, scheduler) -> dict:
        return dict(vae=frozen.vae, text_encoder=frozen.text_encoders[0], text_encoder_2=frozen.text_encoders[1],
                    tokenizer=frozen.tokenizers[0], tokenizer_2=frozen.tokenizers[1], unet=denoiser,
                    scheduler=scheduler, add_watermarker=False)
