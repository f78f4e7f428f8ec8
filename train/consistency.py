"""Consistency fine-tuning, as ControlNet++ (Li et al., ECCV 2024) does it: besides the
diffusion loss, the model's one-step prediction of the clean image, from a lightly noised
latent (t below `--consistency-max-timestep`, where that prediction is sharp), is decoded
by the frozen VAE, re-annotated by a differentiable counterpart of the condition's
annotator, and compared with the condition. Gradients flow through the VAE decoder and
the annotator into the ControlNet.

Canny's counterpart is the step before Canny's thresholds: the Sobel gradient magnitude of
the slightly blurred grey image (Kornia), squashed to [0, 1] by m / (m + s), which does not
saturate as tanh does. Canny's own non-maximum suppression and hysteresis are left out:
they pass no gradient where an edge is missing, which is where the loss must push. Both
maps are blurred a little before the squared error, so an edge one pixel off costs less
than a missing one, as the 2 px edge F1 that scores the samples tolerates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: conditions with a differentiable counterpart here
CONDITIONS = ("canny",)
EDGE_SCALE = 0.05  # Sobel magnitude (of a [0, 1] image) mapped to 0.5; a step of 1 maps to about 0.9
BLUR_SIGMA = 1.0  # px, both maps, before the squared error


def soft_edges(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] images in [0, 1] -> [B, 1, H, W] soft edge maps in [0, 1]: the Sobel
    magnitude of the grey image blurred as Canny blurs it, m / (m + EDGE_SCALE)."""
    import kornia

    grey = kornia.filters.gaussian_blur2d(kornia.color.rgb_to_grayscale(images), (5, 5), (1.0, 1.0))
    magnitude = kornia.filters.sobel(grey)
    return magnitude / (magnitude + EDGE_SCALE)


def blurred(maps: torch.Tensor) -> torch.Tensor:
    import kornia

    return kornia.filters.gaussian_blur2d(maps, (5, 5), (BLUR_SIGMA, BLUR_SIGMA))


def predicted_clean(scheduler, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The one-step estimate of the clean latents x0 from x_t and the denoiser's output
    (epsilon or v prediction), with the training scheduler's alphas."""
    alphas = scheduler.alphas_cumprod.to(noisy.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
    noisy, prediction = noisy.float(), prediction.float()
    if scheduler.config.prediction_type == "v_prediction":
        return alphas.sqrt() * noisy - (1 - alphas).sqrt() * prediction
    return (noisy - (1 - alphas).sqrt() * prediction) / alphas.sqrt()


def low_timesteps(batch: int, max_timestep: int, device) -> torch.Tensor:
    """t drawn uniformly below `max_timestep` (ControlNet++: 200 of 1000)."""
    return torch.randint(0, max_timestep, (batch,), device=device).long()


def edge_loss(vae, clean_latents: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """Squared error between the soft edges of the decoded latents and the condition (the
    batch's conditioning_pixel_values, [B, 3, H, W] in [0, 1]), both blurred."""
    decoded = vae.decode((clean_latents / vae.config.scaling_factor).to(next(vae.parameters()).dtype)).sample
    images = ((decoded.float() + 1) / 2).clamp(0, 1)
    target = conditions.float().mean(1, keepdim=True)
    return F.mse_loss(blurred(soft_edges(images)), blurred(target))
