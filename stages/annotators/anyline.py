"""Anyline (TheMistoAI's line preprocessor for MistoLine), through controlnet-aux's
AnylineDetector: MTEED soft edges (TED with MistoLine's weights) combined with a
standard-lineart layer (the `lineart_standard` computation, with Anyline's defaults
guassian_sigma 2.0, intensity_threshold 3), small specks removed.

Batched like `teed`: only the TED network sees the batch (`prepare` builds the input
controlnet-aux builds, raw 0-255 floats at the detect size); each image's slice of its
side outputs is then replayed through AnylineDetector's own call, which computes the
lineart layer, the mask and the combination for that image alone (they are per-image
numpy work with no network, so there is nothing to batch there).

Defaults follow controlnet-aux / Anyline: detect_resolution 1280 (Anyline's processing
resolution; images smaller than that are upscaled first). Set it lower for speed.

Weights: Anyline/MTEED.pth in the hub repo TheMistoAI/MistoLine, or a folder laid out as
that repo is (FOLDER/Anyline/MTEED.pth, as `huggingface-cli download TheMistoAI/MistoLine
Anyline/MTEED.pth --local-dir FOLDER` leaves it).
"""

from __future__ import annotations

import numpy as np

from .base import register
from .detector import fit
from .lineart_standard import check_lineart_params, quietly
from .teed import TEDNetAnnotator

MISTOLINE_REPO = "TheMistoAI/MistoLine"


@register
class Anyline(TEDNetAnnotator):
    name = "anyline"
    mode = "L"
    version = "1"
    files = ("Anyline/MTEED.pth",)
    hub_repo = MISTOLINE_REPO
    batch_size = 8
    # image by image on a CPU: 8 pictures at 256 px (random weights, the 2-core CPU shared with other
    # jobs, 1 torch thread), one batch of 8 took 1.57x as long as 8 single passes (0.89 s -> 1.40 s),
    # as for teed. GPUs take the whole batch
    cpu_batch = 1
    code_licence = "Apache-2.0"  # controlnet-aux (its anyline module follows TheMistoAI/ComfyUI-Anyline)
    # MistoLine's model card declares `license: openrail++` (CreativeML Open RAIL++-M; no SPDX id) for the
    # repo that holds Anyline/MTEED.pth: https://huggingface.co/TheMistoAI/MistoLine (README.md front matter)
    weights_licence = "openrail++ (https://huggingface.co/TheMistoAI/MistoLine)"
    weights_source = "https://huggingface.co/TheMistoAI/MistoLine/blob/main/Anyline/MTEED.pth"
    # Open RAIL++-M carries use-based restrictions; TEED's own weights are MIT
    permissive_alternative = "teed"

    def __init__(self, guassian_sigma: float = 2.0, intensity_threshold: float = 3, weights: str = MISTOLINE_REPO,
                 detect_resolution: int = 1280, **common):
        check_lineart_params(self.name, guassian_sigma, intensity_threshold)
        super().__init__(weights=weights, detect_resolution=detect_resolution, guassian_sigma=guassian_sigma,
                         intensity_threshold=intensity_threshold, **common)
        self.guassian_sigma, self.intensity_threshold = float(guassian_sigma), intensity_threshold

    @staticmethod
    def detector_class():
        from controlnet_aux import AnylineDetector

        return AnylineDetector

    def single(self, image, rng):
        self.setup()
        lines = quietly(self.model, image, detect_resolution=self.detect_resolution,
                        guassian_sigma=self.guassian_sigma, intensity_threshold=self.intensity_threshold,
                        output_type="np")
        return fit(lines, image, self.mode), {}
