"""Soft edges from TEED (Tiny and Efficient Edge Detector, xavysp/TEED), through
controlnet-aux's TEEDdetector.

Batched like `hed`: `prepare` builds the input controlnet-aux builds (the detect-size
image, raw 0-255 floats, (1, 3, H, W)), the TED network runs once per batch, and each
image's slice of its four side outputs is replayed through controlnet-aux's own call,
which does the rest (sigmoid of the mean, safe steps, resizing).

Weights: 5_model.pth from the hub repo fal-ai/teed (the BIPED checkpoint that
controlnet-aux's README loads: `TEEDdetector.from_pretrained("fal-ai/teed",
filename="5_model.pth")`), or a folder holding that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .base import AnnotatorError, register
from .detector import DetectorAnnotator, aux_resized, aux_tensor, fit
from .weights import resolve_weight_files

TEED_REPO = "fal-ai/teed"


class TEDNetAnnotator(DetectorAnnotator):
    """A controlnet-aux detector around controlnet-aux's TED network (`teed`, `anyline`):
    one checkpoint file, loaded by `detector_class.from_pretrained(folder, filename=...)`."""

    #: the hub repo the default weights come from (named in the missing-weights message)
    hub_repo: ClassVar[str]
    net_path = "model"  # TEEDdetector.model / AnylineDetector.model: the TED network
    # TED takes raw 0-255 pixels, as HED does: fp16's range is not known to hold with real
    # weights, so "auto" stays fp32 (bf16, with fp32's range, can be asked for explicitly)
    half_safe = False

    @staticmethod
    def detector_class():
        raise NotImplementedError

    def _resolved(self) -> Path:
        """The folder the checkpoint is in; a missing file's message names this annotator's hub repo."""
        return resolve_weight_files(self.weights, self.required_files(), self.name, self.hub_repo)

    def checkpoint(self, folder: Path) -> Path:
        """The checkpoint in `folder`. A hub download gives the file's own folder; a local
        folder mirrors the hub repo's layout (a file in a subfolder keeps it there)."""
        relative = self.required_files()[0]
        nested = Path(folder) / relative
        return nested if nested.is_file() else Path(folder) / Path(relative).name

    def check_weights(self) -> None:
        self._resolved()

    def weight_files(self) -> list:
        return [self.checkpoint(self._resolved())]

    def setup(self) -> None:
        if self.model is not None:
            return
        from .weights import torch_device

        model = self.load(self._resolved())
        self.device = torch_device(self.device)
        self.model = model.to(self.device)
        self.model.model.eval()
        self.cast()

    def load(self, folder: Path) -> Any:
        path = self.checkpoint(folder)
        return self.detector_class().from_pretrained(str(path.parent), filename=path.name)

    def prepare(self, image: np.ndarray):
        """controlnet-aux's input to TED: HWC3, resize_image to the detect resolution, raw 0-255 floats."""
        return aux_tensor(aux_resized(image, self.detect_resolution))


@register
class TEED(TEDNetAnnotator):
    name = "teed"
    mode = "L"
    version = "1"
    files = ("5_model.pth",)
    hub_repo = TEED_REPO
    batch_size = 16
    # image by image on a CPU: 8 pictures at 256 px (random weights, the 2-core CPU shared with other
    # jobs, 1 torch thread), one batch of 8 took 1.97x as long as 8 single passes (0.65 s -> 1.28 s):
    # full-resolution activations, as the other conv nets. GPUs take the whole batch
    cpu_batch = 1
    code_licence = "Apache-2.0"  # controlnet-aux; TED itself is MIT (https://github.com/xavysp/TEED, LICENSE)
    # the model card's `license: mit` (https://huggingface.co/fal-ai/teed); the TEED repo the checkpoint
    # comes from (https://github.com/xavysp/TEED, checkpoints/BIPED/5/5_model.pth) is under the MIT licence,
    # Copyright (c) 2022 Xavier Soria Poma (its LICENSE, as copied in
    # https://huggingface.co/spaces/plutosss/ImageProcessing/commit/7bd470afbdf99a3b1a68060d9a0bb6fb81cb5786)
    weights_licence = "MIT"
    weights_source = "https://huggingface.co/fal-ai/teed/blob/main/5_model.pth"

    def __init__(self, safe_steps: int = 2, weights: str = TEED_REPO, **common):
        if not isinstance(safe_steps, (int, np.integer)) or isinstance(safe_steps, bool) or not 0 <= safe_steps <= 255:
            raise AnnotatorError(f"teed safe_steps must be an integer in [0, 255] (0: no quantisation), "
                                 f"got {safe_steps!r}")
        super().__init__(weights=weights, safe_steps=int(safe_steps), **common)
        self.safe_steps = int(safe_steps)

    @staticmethod
    def detector_class():
        from controlnet_aux import TEEDdetector

        return TEEDdetector

    def single(self, image, rng):
        self.setup()
        edges = self.model(image, detect_resolution=self.detect_resolution, safe_steps=self.safe_steps,
                           output_type="np")
        return fit(edges, image, self.mode), {}
