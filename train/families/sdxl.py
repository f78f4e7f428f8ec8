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

    def load(self, pretrained: str, dtype: torch.dtype, text: bool = True) -> Frozen:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        return load_frozen(self, pretrained, dtype, (UNet2DConditionModel, "unet"), DDPMScheduler, text)

    def text_parts(self, pretrained: str) -> tuple[list, list]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        return ([(CLIPTokenizer, "tokenizer"), (CLIPTokenizer, "tokenizer_2")],
                [(CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")])

    def encode_prompts(self, frozen: Frozen, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Both encoders' penultimate hidden states, concatenated; the second one's pooled projection."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(frozen.tokenizers, frozen.text_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]  # the last encoder's (CLIPTextModelWithProjection) text_embeds
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def conditioning(self, frozen: Frozen, prompts: list[str], device, sizes: Any = None,
                     target: tuple[int, int] | None = None, embeds: tuple | None = None) -> tuple[torch.Tensor, dict]:
        hidden, pooled = embeds if embeds is not None else self.encode_prompts(frozen, prompts, device)
        target = target or (frozen.denoiser.config.sample_size * frozen.vae_scale_factor,) * 2
        ids = time_ids(sizes, len(prompts), target).to(device, pooled.dtype)
        return hidden, {"text_embeds": pooled, "time_ids": ids}

    def embedding_dims(self, frozen: Frozen) -> tuple[int, int]:
        """The pooled size: what the added embedding's input leaves after the 6 time ids."""
        config = frozen.denoiser.config
        return (int(config.cross_attention_dim),
                int(config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim))

    def loss(self, batch, cfg, frozen: Frozen, denoiser, controlnet, dropout, device, dtype,
             log=print) -> torch.Tensor:
        if not (batch.get("sizes") or {}).get("recorded") and "sizes" not in frozen.notes:
            frozen.notes.add("sizes")
            log("note: these shards do not record each sample's original size and crop offset (json orig_width/"
                "orig_height, crop_top/crop_left); SDXL's time_ids use the image size and no crop for those")
        return super().loss(batch, cfg, frozen, denoiser, controlnet, dropout, device, dtype, log)

    def cached_prompt_args(self, frozen: Frozen, pipe, hidden, pooled, device) -> dict:
        """With the pipeline's `force_zeros_for_empty_prompt` (the default) the negative branch
        gets zeros, made by the pipeline as it does with its encoders; else the stored empty
        prompt's embeddings."""
        args = {"prompt_embeds": hidden.to(device), "pooled_prompt_embeds": pooled.to(device)}
        if not pipe.config.get("force_zeros_for_empty_prompt", True):
            empty_hidden, empty_pooled = self.empty_negative(frozen, hidden.shape[0], device)
            args.update(negative_prompt_embeds=empty_hidden, negative_pooled_prompt_embeds=empty_pooled)
        return args

    def pipeline_parts(self, frozen: Frozen, denoiser, scheduler) -> dict:
        text = bool(frozen.text_encoders)  # none when the run trains on cached prompt embeddings
        return dict(vae=frozen.vae, text_encoder=frozen.text_encoders[0] if text else None,
                    text_encoder_2=frozen.text_encoders[1] if text else None,
                    tokenizer=frozen.tokenizers[0] if text else None, tokenizer_2=frozen.tokenizers[1] if text else None,
                    unet=denoiser,
                    scheduler=scheduler, add_watermarker=False)
