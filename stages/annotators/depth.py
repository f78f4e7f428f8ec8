"""Monocular depth: MiDaS (DPT-hybrid) from controlnet-aux as the paper used, or any
transformers depth model (DPT, Depth Anything). Normalised per image; 8-bit by
default, 16-bit PNG with `bits: 16`."""

from __future__ import annotations

import numpy as np

from .base import AnnotatorError, register
from .detector import DetectorAnnotator
from .hub_models import load_model

DEFAULT_TRANSFORMERS_DEPTH = "Intel/dpt-hybrid-midas"


class DepthModel(DetectorAnnotator):
    """Relative depth as float (larger = nearer), shared by `depth` and `normal` from depth."""

    name = "depth"
    mode = "L"
    batch_size = 8
    cpu_batch = None  # ViT matmuls: batch 8 ran at 0.88x the time of 8 single passes on a 2-core CPU
    #: the transformers default (method: transformers); MiDaS's own file is declared in declared_weights
    weights_licence = "Apache-2.0"
    weights_source = "https://huggingface.co/" + DEFAULT_TRANSFORMERS_DEPTH

    def __init__(self, method: str = "midas", weights: str | None = None, **common):
        if method not in ("midas", "transformers"):
            raise AnnotatorError(f"{self.name} method must be 'midas' or 'transformers', got {method!r}")
        if weights is None:
            weights = DEFAULT_TRANSFORMERS_DEPTH if method == "transformers" else "lllyasviel/Annotators"
        super().__init__(method=method, weights=weights, **common)
        self.method = method
        self.processor = None
        self.net_path = "model" if method == "midas" else ""  # MiDaSInference on MidasDetector; the HF model

    def required_files(self):
        return ("dpt_hybrid-midas-501f0c75.pt",) if self.method == "midas" else ()

    def weights_setting(self):
        return self.weights

    def weight_files(self):
        if self.method == "midas":
            return super().weight_files()
        from .hub_models import model_files

        return model_files(self.weights)

    def declared_weights(self):
        if self.method == "midas":
            return "MIT", "https://huggingface.co/lllyasviel/Annotators/blob/main/dpt_hybrid-midas-501f0c75.pt"  # isl-org/MiDaS
        return super().declared_weights()

    def check_weights(self):
        if self.method == "midas":
            return super().check_weights()
        from .hub_models import check

        check(self.weights, self.name)

    def setup(self):
        if self.method == "midas":
            return super().setup()
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        load_model(self, AutoImageProcessor, AutoModelForDepthEstimation)

    def load(self, folder):
        from controlnet_aux import MidasDetector

        return MidasDetector.from_pretrained(str(folder))

    def depth(self, image: np.ndarray) -> np.ndarray:
        import torch

        self.setup()
        with torch.inference_mode():
            out = self.forward(self.prepare(image).to(self.device, self.torch_dtype()))[0].float().cpu().numpy()
        return _fitted(out, image)

    def single(self, image, rng):
        return self.depth(image), {}

    def prepare(self, image):
        """The network's input: MiDaS in [-1, 1] at the detect size, or the HF processor's pixels."""
        import torch

        if self.method == "midas":
            from controlnet_aux.util import resize_image

            small = resize_image(image, self.detect_resolution)
            return torch.from_numpy(small.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        return self.processor(images=image, return_tensors="pt")["pixel_values"]

    def forward(self, batch):
        if self.method == "midas":
            return self.network()(batch)
        return self.model(pixel_values=batch).predicted_depth

    def finish(self, output, image, prepared, rng):
        """As `depth` after its network call (no replay: the call is ours, not controlnet-aux's)."""
        return _fitted(output[0].numpy(), image), {}


def _fitted(depth: np.ndarray, image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.resize(depth.astype(np.float32), image.shape[1::-1], interpolation=cv2.INTER_CUBIC)


def normalise(depth: np.ndarray, bits: int = 8) -> np.ndarray:
    lo, hi = float(depth.min()), float(depth.max())
    unit = (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
    top = 65535 if bits == 16 else 255
    return (unit * top + 0.5).astype(np.uint16 if bits == 16 else np.uint8)


@register
class Depth(DepthModel):
    name = "depth"

    def __init__(self, bits: int = 8, **common):
        if bits not in (8, 16):
            raise AnnotatorError(f"depth bits must be 8 or 16, got {bits}")
        super().__init__(**common)
        self.params["bits"] = bits
        self.bits = bits
        self.dtype = np.uint16 if bits == 16 else np.uint8

    def single(self, image, rng):
        return normalise(self.depth(image), self.bits), {}

    def finish(self, output, image, prepared, rng):
        return normalise(super().finish(output, image, prepared, rng)[0], self.bits), {}
