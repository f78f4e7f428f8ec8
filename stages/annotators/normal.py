"""Surface normals: NormalBAE from controlnet-aux, or "from depth", the paper's first
recipe (Sobel gradients of a MiDaS depth map, background flattened), which needs
no model beyond the depth one."""

from __future__ import annotations

import cv2
import numpy as np

from .base import AnnotatorError, register
from .depth import DepthModel
from .detector import DetectorAnnotator, aux_resized, aux_tensor, fit


def normal_from_depth(depth: np.ndarray, bg_threshold: float = 0.1, strength: float = np.pi * 2.0) -> np.ndarray:
    """Relative depth (larger = nearer) -> RGB normal map; pixels in the farthest
    `bg_threshold` of the depth range get a flat normal, as in the paper."""
    d = depth.astype(np.float32)
    gx = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3)
    span = float(d.max() - d.min())
    background = (d - d.min()) / span < bg_threshold if span > 0 else np.ones(d.shape, bool)
    gx[background] = 0
    gy[background] = 0
    normal = np.stack([gx, gy, np.full_like(gx, strength)], axis=2)
    normal /= np.linalg.norm(normal, axis=2, keepdims=True)
    return (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)


@register
class Normal(DetectorAnnotator):
    name = "normal"
    mode = "RGB"
    batch_size = 8
    net_path = "model"
    weights_licence = "MIT"  # baegwangbin/surface_normal_uncertainty, LICENSE
    weights_source = "https://huggingface.co/lllyasviel/Annotators/blob/main/scannet.pt"

    def __init__(self, method: str = "bae", bg_threshold: float = 0.1, depth: dict | None = None, **common):
        if method not in ("bae", "from_depth"):
            raise AnnotatorError(f"normal method must be 'bae' or 'from_depth', got {method!r}")
        super().__init__(method=method, **common)
        self.method, self.bg_threshold = method, bg_threshold
        if method == "from_depth":
            self.params.update(bg_threshold=bg_threshold, depth=depth or {})
            self.depth_model = DepthModel(**(depth or {}))

    def required_files(self):
        return ("scannet.pt",) if self.method == "bae" else ()

    def check_weights(self):
        if self.method == "from_depth":
            self.depth_model.check_weights()
        else:
            super().check_weights()

    def weights_setting(self):
        return self.depth_model.weights_setting() if self.method == "from_depth" else super().weights_setting()

    def weight_files(self):
        return self.depth_model.weight_files() if self.method == "from_depth" else super().weight_files()

    def declared_weights(self):
        return self.depth_model.declared_weights() if self.method == "from_depth" else super().declared_weights()

    def setup(self):
        if self.method == "from_depth":
            self.depth_model.setup()
        else:
            super().setup()

    def set_precision(self, precision):
        if self.method == "from_depth":
            self.depth_model.set_precision(precision)
        super().set_precision(precision)

    def resolved_precision(self):
        return self.depth_model.resolved_precision() if self.method == "from_depth" else super().resolved_precision()

    def load(self, folder):
        from controlnet_aux import NormalBaeDetector

        return NormalBaeDetector.from_pretrained(str(folder))

    def single(self, image, rng):
        if self.method == "from_depth":
            return normal_from_depth(self.depth_model.depth(image), self.bg_threshold), {}
        return fit(self.run(image), image, self.mode), {}

    def annotate_batch(self, images, rngs):
        if self.method == "from_depth":
            depths = self.depth_model.annotate_batch(images, rngs)
            return [(normal_from_depth(depth, self.bg_threshold), {}) for depth, _ in depths]
        return super().annotate_batch(images, rngs)

    def prepare(self, image):
        """NormalBaeDetector's input: [0, 1] RGB at the detect size, ImageNet-normalised by its own transform."""
        return self.model.norm(aux_tensor(aux_resized(image, self.detect_resolution)) / 255.0)
