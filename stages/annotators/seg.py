"""Semantic segmentation in the ADE20K palette the public seg ControlNets were trained
on (UperNet through transformers; default openmmlab/upernet-convnext-small)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from .base import register
from .detector import DetectorAnnotator
from .hub_models import load_model

DEFAULT_SEG_MODEL = "openmmlab/upernet-convnext-small"


@functools.cache
def ade20k_palette() -> np.ndarray:
    data = json.loads((Path(__file__).with_name("ade20k_palette.json")).read_text())
    return np.asarray(data["palette"], np.uint8)


def colorize(class_ids: np.ndarray) -> np.ndarray:
    palette = ade20k_palette()
    return palette[np.clip(class_ids, 0, len(palette) - 1)]


@register
class Segmentation(DetectorAnnotator):
    name = "seg"
    mode = "RGB"

    weights_licence = "MIT"  # the model card of openmmlab/upernet-convnext-small
    weights_source = "https://huggingface.co/" + DEFAULT_SEG_MODEL

    def __init__(self, weights: str = DEFAULT_SEG_MODEL, **common):
        super().__init__(weights=weights, **common)
        self.processor = None

    def check_weights(self):
        from .hub_models import check

        check(self.weights, self.name)

    def weights_setting(self):
        return self.weights

    def weight_files(self):
        from .hub_models import model_files

        return model_files(self.weights)

    def setup(self):
        from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

        load_model(self, AutoImageProcessor, UperNetForSemanticSegmentation)

    def annotate_batch(self, images, rngs):
        """One forward pass for the batch: UperNet takes batches as they are."""
        import torch

        self.setup()
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        if self.resolved_precision() != "fp32":
            inputs["pixel_values"] = inputs["pixel_values"].to(self.torch_dtype())
        with torch.inference_mode():
            outputs = self.model(**inputs)
        outputs.logits = outputs.logits.float()  # post-processing in fp32 whatever the precision
        maps = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[im.shape[:2] for im in images])
        results = []
        for ids in maps:
            ids = ids.cpu().numpy()
            results.append((colorize(ids), {"classes": int(len(np.unique(ids)))}))
        return results

    def __call__(self, image, rng):
        return self.annotate_batch([image], [rng])[0]
