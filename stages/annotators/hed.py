"""Soft boundaries: HED (ControlNet's Apache-2 re-implementation) or PiDiNet, from controlnet-aux."""

from __future__ import annotations

import numpy as np

from .base import AnnotatorError, register
from .detector import DetectorAnnotator, aux_resized, aux_tensor, fit

FILES = {"hed": ("ControlNetHED.pth",), "pidinet": ("table5_pidinet.pth",)}


@register
class HED(DetectorAnnotator):
    name = "hed"
    mode = "L"
    batch_size = 16
    net_path = "netNetwork"  # HEDdetector and PidiNetDetector alike
    # ControlNet 1.1's HED re-implementation and model are Apache-2.0 (the header of controlnet_aux/hed/__init__.py)
    weights_licence = "Apache-2.0"
    weights_source = "https://huggingface.co/lllyasviel/Annotators/blob/main/ControlNetHED.pth"

    def __init__(self, method: str = "hed", safe: bool = False, **common):
        if method not in FILES:
            raise AnnotatorError(f"{self.name} method must be one of {sorted(FILES)}, got {method!r}")
        super().__init__(method=method, safe=safe, **common)
        self.method, self.safe = method, safe

    def required_files(self):
        return FILES[self.method]

    def load(self, folder):
        from controlnet_aux import HEDdetector, PidiNetDetector

        return (HEDdetector if self.method == "hed" else PidiNetDetector).from_pretrained(str(folder))

    def declared_weights(self):
        if self.method == "pidinet":  # no licence file in hellozhuo/pidinet that we could confirm
            return "unknown", "https://huggingface.co/lllyasviel/Annotators/blob/main/table5_pidinet.pth"
        return super().declared_weights()

    def alternative(self):
        return "hed with method: hed (Apache-2.0)" if self.method == "pidinet" else None

    def soft_edges(self, image: np.ndarray) -> np.ndarray:
        return fit(self.run(image, safe=self.safe), image, "L")

    def single(self, image, rng):
        return self.soft_edges(image), {}

    def prepare(self, image):
        small = aux_resized(image, self.detect_resolution)
        if self.method == "hed":
            return aux_tensor(small.copy())
        return aux_tensor(small[:, :, ::-1].copy()) / 255.0  # PiDiNet: BGR in [0, 1]

    @property
    def autocast(self):  # PiDiNet builds fp32 kernels inside its forward: weights stay fp32
        return self.method == "pidinet"

    @property
    def half_safe(self):  # HED takes raw 0-255 pixels: fp16's range is not known to hold with real weights
        return self.method != "hed"
