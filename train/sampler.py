"""The paper's sampler: DDIM with classifier-free guidance, one or several ControlNets
(residuals summed, each with its scale), and four ways to weight the control.

Guidance weighting (`mode`):
- `paper`: control only in the conditional branch, each ControlNet->UNet connection
  multiplied by w_i = h_top / h_i (h_i: that residual's latent size, h_top: the largest;
  at 512 px this is the paper's 64 / h_i), from the actual residual shapes, so any
  resolution works.
- `lllyasviel`: control only in the conditional branch, w_i = 0.825 ** (12 - i) over the
  13 connections (the reference code's soft control).
- `diffusers`: diffusers' guess mode: conditional branch only, w = logspace(-1, 0, 13).
- `both`: control in both branches, all weights 1 (the plain behaviour).
- `uncond`: control only in the unconditional branch, weights 1 (an ablation: CFG then
  pushes *away* from the control).
With no ControlNet at all the sampler draws from the base model alone (for comparison).
It serves the families that do not sample through their diffusers pipeline (SD, SDXL).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .config import GuidanceMode
from .families import cast

MODES = typing.get_args(GuidanceMode)
DEFAULT_PROMPT = "a professional, detailed, high-quality image"


def control_weights(mode: str, sizes: Sequence[int]) -> list[float]:
    """One weight per connection (the down residuals, then the mid one), from their latent sizes."""
    if mode not in MODES:
        raise ValueError(f"guidance mode must be one of {MODES}, got {mode!r}")
    n = len(sizes)
    if mode == "paper":
        top = max(sizes)
        return [top / h for h in sizes]
    if mode == "lllyasviel":
        return [0.825 ** float(n - 1 - i) for i in range(n)]
    if mode == "diffusers":
        return torch.logspace(-1, 0, n).tolist()
    return [1.0] * n


def resolve_mode(mode: str | None, family, flag: str = "--mode") -> str:
    """`mode`, or its default: `paper`, or `both` for families that sample through their
    diffusers pipeline (which puts the control in both CFG branches, and nowhere else);
    ValueError naming `flag` for a mode such a family cannot draw."""
    if not family.SAMPLES_THROUGH_PIPELINE:
        return mode or "paper"
    if mode not in (None, "both"):
        raise ValueError(f"{flag} {mode}: {family.NAME} samples through diffusers' {family.PIPELINE}, which puts "
                         f"the control in both CFG branches: use {flag} both")
    return "both"


@dataclass
class Control:
    """One ControlNet with its condition image (B x 3 x H x W in [0, 1]) and scale."""

    model: Any
    image: torch.Tensor
    scale: float = 1.0


def control_residuals(controls: Sequence[Control], latents, t, text, added: dict | None = None
                      ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """The paper's composition: the residuals of several ControlNets, summed (None, None without any)."""
    down_sum, mid_sum = None, None
    for control in controls:
        down, mid = control.model(latents, t, encoder_hidden_states=text, controlnet_cond=control.image,
                                  conditioning_scale=control.scale, added_cond_kwargs=added, return_dict=False)
        if down_sum is None:
            down_sum, mid_sum = list(down), mid
        else:
            down_sum = [a + b for a, b in zip(down_sum, down)]
            mid_sum = mid_sum + mid
    return down_sum, mid_sum


def weighted(down: list[torch.Tensor] | None, mid: torch.Tensor | None, mode: str):
    if down is None:
        return None, None, []
    sizes = [d.shape[-1] for d in down] + [mid.shape[-1]]
    weights = control_weights(mode, sizes)
    return [d * w for d, w in zip(down, weights[:-1])], mid * weights[-1], weights


@dataclass
class SampleResult:
    images: list[Any]
    weights: list[float] = field(default_factory=list)


@torch.no_grad()
def sample(frozen, scheduler, controls: Sequence[Control], prompts: list[str], negative_prompt: str = "",
           mode: str = "paper", steps: int = 20, guidance_scale: float = 9.0, height: int = 512, width: int = 512,
           generator: torch.Generator | Sequence[torch.Generator] | None = None, embeds: tuple | None = None,
           negative_embeds: tuple | None = None, on_step: Callable | None = None) -> SampleResult:
    """DDIM + CFG on a loaded base (`families.load`: its UNet, VAE and the family's prompt
    encoding), with `mode` deciding where the control goes and how it is weighted.

    `generator` may be one per prompt: each sample's starting noise then comes from its
    own generator, so a sample is the same whether it is drawn alone or in a batch.
    `embeds`, `negative_embeds`: (hidden, pooled or None) stored for the prompts and the
    negative prompt, batch-sized, used instead of encoding them (a run on cached prompt
    embeddings has no text encoders). `on_step(index, t, step_output)` sees each DDIM step's
    scheduler output (its `pred_original_sample` is the predicted clean latent): for probes of
    where in sampling something is decided."""
    from PIL import Image

    unet, vae = frozen.denoiser, frozen.vae
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    batch = len(prompts)

    def encode(texts: list[str], stored: tuple | None):
        return frozen.family.conditioning(frozen, texts, device, None, (height, width), embeds=stored)

    cond_text, cond_added = encode(prompts, embeds)
    uncond_text, uncond_added = encode([negative_prompt] * batch, negative_embeds)
    cond_text, uncond_text = cond_text.to(dtype), uncond_text.to(dtype)
    cond_added, uncond_added = cast(cond_added, dtype), cast(uncond_added, dtype)
    factor = frozen.vae_scale_factor
    shape = (unet.config.in_channels, height // factor, width // factor)
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} prompts: give one per prompt")
        noise = torch.stack([torch.randn(shape, generator=g, device="cpu") for g in generator])
    else:
        noise = torch.randn((batch, *shape), generator=generator, device="cpu")
    latents = noise.to(device, dtype) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    weights: list[float] = []
    for index, t in enumerate(scheduler.timesteps):
        x = scheduler.scale_model_input(latents, t)
        down, mid = control_residuals(controls, x, t, cond_text, cond_added) if mode != "uncond" else (None, None)
        down, mid, weights = weighted(down, mid, mode)
        eps_cond = unet(x, t, encoder_hidden_states=cond_text, added_cond_kwargs=cond_added,
                        down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]
        if mode in ("both", "uncond"):
            down_u, mid_u = control_residuals(controls, x, t, uncond_text, uncond_added)
            eps_uncond = unet(x, t, encoder_hidden_states=uncond_text, added_cond_kwargs=uncond_added,
                              down_block_additional_residuals=down_u, mid_block_additional_residual=mid_u,
                              return_dict=False)[0]
            weights = weights or [1.0] * (len(down_u) + 1 if down_u is not None else 0)
        else:  # the unconditional branch sees no control
            eps_uncond = unet(x, t, encoder_hidden_states=uncond_text, added_cond_kwargs=uncond_added,
                              return_dict=False)[0]
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        stepped = scheduler.step(eps, t, latents)
        latents = stepped.prev_sample
        if on_step is not None:
            on_step(index, t, stepped)
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    arrays = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return SampleResult([Image.fromarray(a) for a in arrays], weights)
