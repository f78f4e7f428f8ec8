"""Human-like scribbles synthesised from soft boundaries, as the ControlNet paper
trains its scribble model: random non-maximum suppression, random threshold,
random masking of strokes and random thickening; all drawn from the sample's
seed and recorded in its json."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from .base import AnnotatorError, register
from .detector import DetectorAnnotator
from .hed import HED

_LINE_KERNELS = [np.array(k, np.uint8) for k in (
    [[0, 0, 0], [1, 1, 1], [0, 0, 0]],
    [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
    [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
)]


def thin_edges(soft: np.ndarray, sigma: float) -> np.ndarray:
    """Non-maximum suppression: keep a pixel only where it is the maximum along some direction."""
    blurred = cv2.GaussianBlur(soft.astype(np.float32), (0, 0), sigma)
    kept = np.zeros_like(blurred)
    for kernel in _LINE_KERNELS:
        np.putmask(kept, cv2.dilate(blurred, kernel) == blurred, blurred)
    return kept


def synthesize_scribble(soft: np.ndarray, rng: np.random.Generator, sigma=(1.5, 3.5), threshold=(64, 160),
                        mask_fraction=(0.0, 0.5), thickness=(1, 3)) -> tuple[np.ndarray, dict[str, Any]]:
    """Soft edge map (uint8) -> binary scribble (0/255 uint8) and the parameters drawn."""
    s = float(rng.uniform(*sigma))
    t = float(rng.uniform(*threshold))
    p = float(rng.uniform(*mask_fraction))
    k = int(rng.integers(thickness[0], thickness[1] + 1))
    strokes = (thin_edges(soft, s) > t).astype(np.uint8)
    count, labels = cv2.connectedComponents(strokes, connectivity=8)
    drop = np.concatenate([[True], rng.random(count - 1) < p])  # label 0 is the background
    scribble = np.where(drop[labels], 0, 255).astype(np.uint8)
    if k > 1:
        scribble = cv2.dilate(scribble, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    used = {"sigma": round(s, 4), "threshold": round(t, 2), "mask_fraction": round(p, 4), "thickness": k,
            "strokes": int(count - 1), "strokes_kept": int((~drop).sum())}
    return scribble, used


@register
class Scribble(DetectorAnnotator):
    """Soft edges from `HED` (batched there), then strokes drawn per image from its own rng."""

    name = "scribble"
    mode = "L"
    batch_size = HED.batch_size

    def __init__(self, method: str = "hed", sigma=(1.5, 3.5), threshold=(64, 160), mask_fraction=(0.0, 0.5),
                 thickness=(1, 3), **common):
        for label, rng in (("sigma", sigma), ("threshold", threshold), ("mask_fraction", mask_fraction),
                           ("thickness", thickness)):
            if len(rng) != 2 or rng[0] > rng[1]:
                raise AnnotatorError(f"scribble {label} must be a [min, max] range, got {rng}")
        super().__init__(method=method, sigma=list(sigma), threshold=list(threshold),
                         mask_fraction=list(mask_fraction), thickness=list(thickness), **common)
        self.edges = HED(method=method, **common)
        self.ranges = dict(sigma=tuple(sigma), threshold=tuple(threshold), mask_fraction=tuple(mask_fraction),
                           thickness=tuple(thickness))

    def required_files(self):
        return self.edges.required_files()

    def check_weights(self):
        self.edges.check_weights()

    def weights_setting(self):
        return self.edges.weights_setting()

    def weight_files(self):
        return self.edges.weight_files()

    def declared_weights(self):
        return self.edges.declared_weights()

    def alternative(self):
        return self.edges.alternative() and "scribble with method: hed (Apache-2.0)"

    def setup(self):
        self.edges.setup()

    def set_precision(self, precision):
        self.edges.set_precision(precision)

    def resolved_precision(self):
        return self.edges.resolved_precision()

    def single(self, image, rng):
        return synthesize_scribble(self.edges.soft_edges(image), rng, **self.ranges)

    def annotate_batch(self, images, rngs):
        soft = self.edges.annotate_batch(images, rngs)
        return [synthesize_scribble(edges, rng, **self.ranges) for (edges, _), rng in zip(soft, rngs)]
