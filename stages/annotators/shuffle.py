"""Content shuffle (ControlNet 1.1 `shuffle`): the image warped by a smooth random flow
field, drawn with controlnet-aux's ContentShuffleDetector. No weights.

controlnet-aux draws its noise from numpy's legacy global generator (`np.random.uniform`
in `controlnet_aux.util.make_noise_disk`). To make the map a function of the sample's own
seeded rng, a 32-bit seed is drawn from that rng, the global generator is set to it for
the duration of the call (under a lock, its previous state restored afterwards), and the
seed is recorded in the sample's json: a rebuild draws the same map, and the map can be
redrawn from the json alone.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np

from .base import Annotator, AnnotatorError, register
from .detector import fit

_GLOBAL_NUMPY = threading.Lock()


@contextlib.contextmanager
def global_numpy_seed(seed: int):
    """numpy's legacy global generator seeded with `seed` inside the block, restored after.
    The lock keeps two annotators in one process from interleaving; code outside that
    draws from np.random meanwhile would shift the draw, so nothing else here does."""
    with _GLOBAL_NUMPY:
        saved = np.random.get_state()
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(saved)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@register
class Shuffle(Annotator):
    """`f` is the noise cell size in detect-resolution pixels (controlnet-aux's default 256):
    an int, or a [min, max] range drawn per image."""

    name = "shuffle"
    mode = "RGB"
    version = "1"
    batch_size = 8
    code_licence = "Apache-2.0"  # controlnet-aux (ContentShuffleDetector); no weights

    def __init__(self, detect_resolution: int = 512, f: int | tuple[int, int] | list[int] = 256):
        if not _is_int(detect_resolution) or detect_resolution < 64:
            raise AnnotatorError(f"shuffle detect_resolution must be an integer >= 64, got {detect_resolution!r}")
        bounds = (f, f) if _is_int(f) else tuple(f) if isinstance(f, (list, tuple)) else ()
        if len(bounds) != 2 or not all(_is_int(b) and b >= 1 for b in bounds) or bounds[0] > bounds[1]:
            raise AnnotatorError(f"shuffle f must be a positive integer or a [min, max] range of them, got {f!r}")
        super().__init__(detect_resolution=int(detect_resolution), f=int(f) if _is_int(f) else [int(b) for b in bounds])
        self.detect_resolution = int(detect_resolution)
        self.f_range = (int(bounds[0]), int(bounds[1]))
        self.detector = None

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        if self.detector is None:
            from controlnet_aux import ContentShuffleDetector

            self.detector = ContentShuffleDetector()
        f = self.f_range[0] if self.f_range[0] == self.f_range[1] else int(rng.integers(self.f_range[0],
                                                                                       self.f_range[1] + 1))
        seed = int(rng.integers(0, 2**32))
        with global_numpy_seed(seed):
            shuffled = self.detector(image, f=f, detect_resolution=self.detect_resolution,
                                     image_resolution=min(image.shape[:2]), output_type="np")
        return fit(shuffled, image, self.mode), {"seed": seed, "f": f}
