"""Straight lines ("Hough" in the paper): M-LSD from controlnet-aux, or OpenCV's
probabilistic Hough transform as a classical, weight-free method."""

from __future__ import annotations

import cv2
import numpy as np

from .base import AnnotatorError, register
from .detector import DetectorAnnotator, aux_resized, fit


def hough_lines(image: np.ndarray, threshold: int = 80, min_line_length: int = 30, max_line_gap: int = 10) -> tuple[np.ndarray, int]:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, 50, 150)
    lines = cv2.HoughLinesP(edges, 1, np.pi / 180, threshold, minLineLength=min_line_length, maxLineGap=max_line_gap)
    out = np.zeros(gray.shape, np.uint8)
    lines = np.zeros((0, 4), np.int32) if lines is None else lines.reshape(-1, 4)
    for x1, y1, x2, y2 in lines:
        cv2.line(out, (int(x1), int(y1)), (int(x2), int(y2)), 255, 1)
    return out, len(lines)


@register
class MLSD(DetectorAnnotator):
    name = "mlsd"
    mode = "L"
    files = ("mlsd_large_512_fp32.pth",)
    batch_size = 32
    net_path = "model"
    weights_licence = "Apache-2.0"  # navervision/mlsd
    weights_source = "https://huggingface.co/lllyasviel/Annotators/blob/main/mlsd_large_512_fp32.pth"

    def __init__(self, method: str = "mlsd", score_threshold: float = 0.1, distance_threshold: float = 0.1,
                 hough_threshold: int = 80, min_line_length: int = 30, max_line_gap: int = 10, **common):
        if method not in ("mlsd", "hough"):
            raise AnnotatorError(f"mlsd method must be 'mlsd' or 'hough', got {method!r}")
        super().__init__(method=method, score_threshold=score_threshold, distance_threshold=distance_threshold,
                         **common)
        self.method = method
        self.hough = (hough_threshold, min_line_length, max_line_gap)

    def required_files(self):
        return () if self.method == "hough" else self.files

    def load(self, folder):
        from controlnet_aux import MLSDdetector

        return MLSDdetector.from_pretrained(str(folder))

    def single(self, image, rng):
        if self.method == "hough":
            lines, count = hough_lines(image, *self.hough)
            return lines, {"lines": count}
        out = self.run(image, thr_v=self.params["score_threshold"], thr_d=self.params["distance_threshold"])
        return fit(out, image, self.mode), {}

    def annotate_batch(self, images, rngs):
        if self.method == "hough":
            return [self.single(image, rng) for image, rng in zip(images, rngs)]
        return super().annotate_batch(images, rngs)

    def prepare(self, image):
        """controlnet-aux's mlsd pred_lines: RGB + a ones channel at the detect size, in [-1, 1]."""
        import torch

        small = aux_resized(image, self.detect_resolution)
        height, width = small.shape[:2]
        stacked = np.concatenate([cv2.resize(small, (width, height), interpolation=cv2.INTER_AREA),
                                  np.ones([height, width, 1])], axis=-1)
        batch = np.expand_dims(stacked.transpose((2, 0, 1)), axis=0).astype("float32")
        return torch.from_numpy((batch / 127.5) - 1.0).float()
