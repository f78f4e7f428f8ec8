"""Standard lineart: controlnet-aux's LineartStandardDetector, a network-free line drawing
(how far each pixel is darker than its Gaussian-blurred surround, normalised by the
median). No weights, nothing random.

The settings keep controlnet-aux's own names, `guassian_sigma` (sic) and
`intensity_threshold`, so a value can be copied between the two."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .base import Annotator, AnnotatorError, register
from .detector import fit


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def quietly(call, *args, **kwargs):
    """controlnet-aux takes the median of the pixels above the threshold; on a flat image
    there are none: numpy warns 'Mean of empty slice' and the code falls back to 16."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        warnings.filterwarnings("ignore", "Parameter `min_size` is deprecated", FutureWarning)  # anyline, skimage
        return call(*args, **kwargs)


def check_lineart_params(name: str, guassian_sigma: Any, intensity_threshold: Any) -> None:
    if not _is_number(guassian_sigma) or not guassian_sigma > 0:
        raise AnnotatorError(f"{name} guassian_sigma must be a number > 0, got {guassian_sigma!r}")
    if not _is_number(intensity_threshold) or not 0 <= intensity_threshold <= 255:
        raise AnnotatorError(f"{name} intensity_threshold must be a number in [0, 255], got {intensity_threshold!r}")


@register
class LineartStandard(Annotator):
    name = "lineart_standard"
    mode = "L"
    version = "1"
    batch_size = 16
    code_licence = "Apache-2.0"  # controlnet-aux; no weights

    def __init__(self, guassian_sigma: float = 6.0, intensity_threshold: float = 8, detect_resolution: int = 512):
        check_lineart_params(self.name, guassian_sigma, intensity_threshold)
        if not isinstance(detect_resolution, (int, np.integer)) or isinstance(detect_resolution, bool) \
                or detect_resolution < 64:
            raise AnnotatorError(f"{self.name} detect_resolution must be an integer >= 64, got {detect_resolution!r}")
        super().__init__(guassian_sigma=guassian_sigma, intensity_threshold=intensity_threshold,
                         detect_resolution=int(detect_resolution))
        self.detector = None

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        if self.detector is None:
            from controlnet_aux import LineartStandardDetector

            self.detector = LineartStandardDetector()
        lines = quietly(self.detector, image, guassian_sigma=float(self.params["guassian_sigma"]),
                        intensity_threshold=self.params["intensity_threshold"],
                        detect_resolution=self.params["detect_resolution"], output_type="np")
        return fit(lines, image, self.mode), {}
