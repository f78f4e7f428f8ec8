"""Cached latents: each stored image encoded once at build time with the base model's VAE,
so training never runs the VAE encoder (`build --latents MODEL`).

`KEY.latents.npy` holds float16 [C, H/f, W/f]: (mean - shift_factor) x scaling_factor of
the latent distribution, what diffusers' trainers feed the denoiser minus the posterior
noise. The shift is the VAE's own (SD3 and Flux VAEs have one; SD 1.x/2.x and SDXL do not:
0), applied here exactly as their trainers apply it, so the cached latents of every family
are the ones its loss would make. `KEY.json` records `latents: {model, scaling_factor,
shift_factor, shape}` so a trainer can tell whether they belong to its base model (shards
made before the shift was applied record no shift_factor). Encoded from the stored JPEG (the
exact pixels a trainer would read), in batches, on a GPU when the step runs in a GPU actor.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np


class LatentEncoder:
    def __init__(self, model: str, device: str | None = None, batch_size: int = 16):
        self.model, self.device, self.batch_size = model, device, batch_size
        self.vae = None

    def setup(self) -> None:
        if self.vae is not None:
            return
        import torch
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(self.model, subfolder="vae")
        except (OSError, ValueError):
            try:
                vae = AutoencoderKL.from_pretrained(self.model)  # a VAE folder itself
            except (OSError, ValueError) as exc:
                raise ValueError(f"--latents {self.model}: no VAE there (a diffusers pipeline folder with vae/, a VAE "
                                 f"folder, or a hub id): {type(exc).__name__}: {str(exc)[:200]}") from None
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.vae = vae.to(self.device, dtype).eval().requires_grad_(False)

    @property
    def shift_factor(self) -> float:
        """The VAE's latent shift (SD3, Flux); 0 for VAEs without one (SD, SDXL: None or absent)."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def info(self, shape: tuple[int, ...]) -> dict[str, Any]:
        return {"model": self.model, "scaling_factor": float(self.vae.config.scaling_factor),
                "shift_factor": self.shift_factor, "shape": list(shape)}

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """H x W x 3 uint8 images (one size per call) -> float16 [C, H/f, W/f] latents."""
        import torch

        self.setup()
        out = []
        dtype = next(self.vae.parameters()).dtype
        for start in range(0, len(images), self.batch_size):
            batch = np.stack(images[start:start + self.batch_size])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device, dtype) / 127.5 - 1
            with torch.no_grad():
                mean = (self.vae.encode(x).latent_dist.mean - self.shift_factor) * self.vae.config.scaling_factor
            out.extend(m for m in mean.float().cpu().numpy().astype(np.float16))
        return out


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
