"""Colour grid (T2I-Adapter's colour condition, "color" in its repo and in the public colour
adapters): the image shrunk to a coarse grid with area averaging, then enlarged again
with nearest-neighbour, so each cell holds its region's mean colour. It carries colour
and rough layout, no shapes: a condition to compose with a shape condition such as
canny. OpenCV only, no weights; deterministic (the sample's rng is not used).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from .base import Annotator, AnnotatorError, register


@register
class ColorGrid(Annotator):
    """`cells`: grid cells along the image's shorter side (T2I-Adapter shrinks 512 px by
    64, i.e. 8 cells); the longer side gets as many square cells as fit, at least one."""

    name = "color_grid"
    mode = "RGB"
    version = "1"
    batch_size = 32
    code_licence = "Apache-2.0"  # OpenCV; no weights

    def __init__(self, cells: int = 8):
        if not isinstance(cells, int) or isinstance(cells, bool) or cells < 1:
            raise AnnotatorError(f"color_grid cells must be an integer >= 1, got {cells!r}")
        super().__init__(cells=cells)
        self.cells = cells

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        height, width = image.shape[:2]
        cell = max(1.0, min(height, width) / self.cells)
        grid = (max(1, round(width / cell)), max(1, round(height / cell)))  # (columns, rows)
        small = cv2.resize(image, grid, interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST), {}
