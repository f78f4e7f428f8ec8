"""Canny edges with thresholds drawn per image, as the ControlNet paper trains them."""

from __future__ import annotations

import cv2
import numpy as np

from .base import Annotator, AnnotatorError, register


@register
class Canny(Annotator):
    name = "canny"
    mode = "L"

    def __init__(self, low_threshold: tuple[int, int] = (50, 150), high_threshold: tuple[int, int] = (150, 250)):
        low, high = tuple(low_threshold), tuple(high_threshold)
        if len(low) != 2 or len(high) != 2 or low[0] > low[1] or high[0] > high[1] or min(low + high) < 0:
            raise AnnotatorError(f"canny thresholds must be [min, max] ranges, got low={low} high={high}")
        super().__init__(low_threshold=list(low), high_threshold=list(high))
        self.low, self.high = low, high

    def __call__(self, image: np.ndarray, rng: np.random.Generator):
        low = int(rng.integers(self.low[0], self.low[1] + 1))
        high = int(rng.integers(self.high[0], self.high[1] + 1))
        low, high = min(low, high), max(low, high)
        edges = cv2.Canny(image, low, high)
        return edges, {"low_threshold": low, "high_threshold": high}
