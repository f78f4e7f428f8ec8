"""SD3: an MMDiT transformer with flow matching. Two CLIP text encoders with projections
(and T5 when the base has it; without it the pipeline's zeros stand in, as diffusers does),
prompts encoded by the diffusers pipeline's own `encode_prompt`; the ControlNet is
`SD3ControlNetModel.from_transformer`, and it sees the condition as VAE latents. Training
follows diffusers' SD3 ControlNet script: logit-normal timestep density, noisy = (1 - s) x
+ s noise, target noise - x, SD3 loss weighting."""

from __future__ import annotations

import os
from typing import Any

import torch

from . import FamilyError, Frozen, flow, initialise, load_frozen


def encode_latents(vae, pixels: torch.Tensor, sample: bool = True) -> torch.Tensor:
    dist = vae.encode(pixels).latent_dist
    latents = dist.sample() if sample else dist.mode()
    return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


class SD3(flow.Flow):
    NAME = "sd3"
    TITLE = "SD3"
    PIPELINE = "StableDiffusion3ControlNetPipeline"
    BASE_PIPELINE = "StableDiffusion3Pipeline"
    EXAMPLE = "stabilityai/stable-diffusion-3-medium-diffusers"
    CONTROLNET_KEYS = ("joint_attention_dim", "in_channels", "patch_size")

    def load(self, pretrained: str, dtype: torch.dtype, text: bool = True) -> Frozen:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        return load_frozen(self, pretrained, dtype, (SD3Transformer2DModel, "transformer"),
                           FlowMatchEulerDiscreteScheduler, text)

    def text_parts(self, pretrained: str) -> tuple[list, list]:
        """T5 (text_encoder_3) when the base has it; without it the pipeline's zeros stand in
        for its embeddings, as diffusers does."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        tokenizers = [(CLIPTokenizer, "tokenizer"), (CLIPTokenizer, "tokenizer_2")]
        encoders = [(CLIPTextModelWithProjection, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")]
        if os.path.isdir(os.path.join(pretrained, "text_encoder_3")):
            tokenizers.append((AutoTokenizer, "tokenizer_3"))
            encoders.append((T5EncoderModel, "text_encoder_3"))
        return tokenizers, encoders

    def check_resolution(self, frozen: Frozen, resolution: int) -> None:
        patch = frozen.denoiser.config.patch_size
        step = frozen.vae_scale_factor * patch
        if resolution % step:
            raise FamilyError(f"resolution {resolution} does not fit {frozen.pretrained}: it must be a multiple of "
                              f"{step} (VAE factor {frozen.vae_scale_factor} x patch size {patch})")

    def encode_prompts(self, frozen: Frozen, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's own `encode_prompt`: CLIP (and T5) hidden states, both CLIPs' pooled projections."""
        embeds, _, pooled, _ = self.base_pipeline(frozen).encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=flow.MAX_SEQUENCE_LENGTH)
        return embeds, pooled

    def conditioning(self, frozen: Frozen, prompts: list[str], device, sizes: Any = None,
                     target: tuple[int, int] | None = None, embeds: tuple | None = None) -> tuple[torch.Tensor, dict]:
        hidden, pooled = embeds if embeds is not None else self.encode_prompts(frozen, prompts, device)
        return hidden, {"pooled_projections": pooled}

    def loss(self, batch, cfg, frozen: Frozen, denoiser, controlnet, dropout, device, dtype,
             log=print) -> torch.Tensor:
        vae = frozen.vae
        with torch.no_grad():
            if "latents" in batch:
                latents = batch["latents"].to(device).float()
            else:
                latents = encode_latents(vae, batch["pixel_values"].to(device, dtype)).float()
            condition = encode_latents(vae, (batch["conditioning_pixel_values"] * 2 - 1).to(device, dtype)).float()
            embeds, added = self.batch_conditioning(frozen, batch, dropout, device)
        noisy, noise, timesteps, sigmas = self.noisy_latents(frozen, latents, cfg, device)
        pooled = added["pooled_projections"]
        blocks = controlnet(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds.float(),
                            pooled_projections=pooled.float(), controlnet_cond=condition, return_dict=False)[0]
        model_dtype = next(denoiser.parameters()).dtype
        prediction = denoiser(hidden_states=noisy.to(model_dtype), timestep=timesteps,
                              encoder_hidden_states=embeds.to(model_dtype), pooled_projections=pooled.to(model_dtype),
                              block_controlnet_hidden_states=[b.to(model_dtype) for b in blocks], return_dict=False)[0]
        return flow.loss(prediction, noise, latents, sigmas)

    def controlnet_class(self):
        from diffusers import SD3ControlNetModel

        return SD3ControlNetModel

    def new_controlnet(self, frozen: Frozen, init: str):
        transformer = frozen.denoiser
        # the first blocks (at most 12, as diffusers does; never the last, which differs: context_pre_only)
        net = self.controlnet_class().from_transformer(
            transformer, num_layers=max(1, min(12, transformer.config.num_layers - 1)), num_extra_conditioning_channels=0)
        # the condition latent gets the VAE shift and the ControlNet the pooled prompt, as in training above
        net.register_to_config(force_zeros_for_pooled_projection=False)
        initialise((*net.controlnet_blocks, net.pos_embed_input.proj), init)
        return net

    def cached_prompt_args(self, frozen: Frozen, pipe, hidden, pooled, device) -> dict:
        """Both CFG branches from stored embeddings: the prompts', and the stored empty
        prompt's for the negative branch (what the pipeline encodes when given none)."""
        empty_hidden, empty_pooled = self.empty_negative(frozen, hidden.shape[0], device)
        return {"prompt_embeds": hidden.to(device), "pooled_prompt_embeds": pooled.to(device),
                "negative_prompt_embeds": empty_hidden, "negative_pooled_prompt_embeds": empty_pooled}

    def pipeline_parts(self, frozen: Frozen, denoiser, scheduler) -> dict:
        (tokenizer, encoder), (tokenizer_2, encoder_2), (tokenizer_3, encoder_3) = (
            self.text_part(frozen, i) for i in range(3))
        return dict(transformer=denoiser, scheduler=scheduler, vae=frozen.vae, text_encoder=encoder,
                    tokenizer=tokenizer, text_encoder_2=encoder_2, tokenizer_2=tokenizer_2,
                    text_encoder_3=encoder_3, tokenizer_3=tokenizer_3)
