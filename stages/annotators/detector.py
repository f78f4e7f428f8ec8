"""A deep annotator behind the `image -> condition` contract: weights from one
setting (hub id or folder), loaded once per worker, output fitted to the image."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from .base import Annotator
from .weights import DEFAULT_REPO, resolve_weight_files, torch_device


def fit(detected: Any, image: np.ndarray, mode: str, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """The detector's map at exactly the image's size and channel count.

    controlnet-aux resizes to multiples of 64; conditions must match the stored image."""
    arr = np.asarray(detected)
    if arr.ndim == 3 and mode == "L":
        arr = arr[..., 0]
    elif arr.ndim == 2 and mode == "RGB":
        arr = np.repeat(arr[..., None], 3, axis=2)
    height, width = image.shape[:2]
    if arr.shape[:2] != (height, width):
        arr = cv2.resize(arr, (width, height), interpolation=interpolation)
    return np.ascontiguousarray(arr.astype(np.uint8))


class DetectorAnnotator(Annotator):
    #: weight files the default method needs, relative to the weights folder / repo
    files: ClassVar[tuple[str, ...]] = ()
    uses_model: ClassVar[bool] = True

    def __init__(self, weights: str = DEFAULT_REPO, detect_resolution: int = 512, device: str | None = None,
                 **params: Any):
        super().__init__(weights=weights, detect_resolution=detect_resolution, **params)
        self.weights = weights
        self.detect_resolution = detect_resolution
        self.device = device
        self.model = None

    def required_files(self) -> tuple[str, ...]:
        return self.files

    def check_weights(self) -> None:
        if self.required_files():
            resolve_weight_files(self.weights, self.required_files(), self.name)

    def setup(self) -> None:
        if self.model is not None or not self.required_files():
            return
        folder = resolve_weight_files(self.weights, self.required_files(), self.name)
        model = self.load(folder)
        self.device = torch_device(self.device)
        self.model = model.to(self.device) if hasattr(model, "to") else model

    def load(self, folder: Path) -> Any:
        raise NotImplementedError

    def run(self, image: np.ndarray, **kwargs: Any) -> np.ndarray:
        """Call a controlnet-aux detector on our image at its native size."""
        self.setup()
        return self.model(image, detect_resolution=self.detect_resolution, image_resolution=min(image.shape[:2]),
                          output_type="np", **kwargs)
