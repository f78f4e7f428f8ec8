"""Segment Anything: every mask SAM finds from a grid of point prompts, each filled with a
random colour on black (the map the SAM ControlNet was trained on: controlnet-aux's
SamDetector.show_anns draws the same way, largest mask first so small ones stay visible).

The model is transformers' `SamModel` with its `SamProcessor`; the default weights are
SlimSAM-50 (a pruned, distilled SAM ViT-B, 112 MB, Apache-2.0); `facebook/sam-vit-base`
or any SAM checkpoint transformers loads can be named instead.

Why not transformers' `mask-generation` pipeline: it runs the image encoder inside its
preprocess step, one image at a time, and cannot take embeddings computed for a batch.
So the automatic mask generation is written out here (the pipeline's steps, with a single
crop layer, as its defaults do):

1. the image encoder once per batch of images (`SamModel.get_image_embeddings` on the
   stacked, padded pixel values: the expensive part);
2. per image, a `points_per_side`^2 grid of point prompts, `points_per_batch` at a time,
   through the prompt encoder and mask decoder (3 masks per point);
3. masks with predicted IoU <= `pred_iou_thresh` dropped (before upscaling, to save time
   and memory: the filter is per mask, so the result is the pipeline's), the rest upscaled
   to the image's size (`SamImageProcessor.post_process_masks`), those with stability
   score <= `stability_score_thresh` dropped, binarised at logit 0; empty masks and masks
   under `min_mask_area` pixels dropped;
4. duplicates removed by box NMS (`torchvision.ops.batched_nms`, IoU `crops_nms_thresh`);
5. drawn largest first, one colour per mask from the sample's rng (3 draws in [0, 255),
   as controlnet-aux's `np.random.randint(255)`), on a black canvas of the image's size.

A threshold of 0 turns that filter off, as in the pipeline. The image processor resizes to
the model's input size (1024 on the long side for SAM), so `detect_resolution` is recorded
but not used; masks are upscaled straight to the image's own size (no resize of the map).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import AnnotatorError, register
from .detector import DetectorAnnotator
from .hub_models import load_model

DEFAULT_SAM_MODEL = "nielsr/slimsam-50-uniform"
#: masks binarised at this logit (SAM's mask_threshold) and the stability score's offset
MASK_THRESHOLD = 0.0
STABILITY_OFFSET = 1.0
#: low-resolution masks upscaled to the image at a time (bounds memory: 32 x 1024^2 floats = 128 MB)
UPSCALE_CHUNK = 32


@register
class SegmentAnything(DetectorAnnotator):
    name = "sam"
    mode = "RGB"
    version = "1"
    batch_size = 8
    # One image per encoder pass on a CPU. Measured (random weights, tiny 2-layer SAM at 256 px input,
    # 4 images, shared 2-core CPU, noisy): the encoder on a batch of 4 took 0.47 s against 1.0 s for 4
    # single passes, but the whole annotation 4.5 s against 4.7 s, as the per-image point-grid decoding
    # and mask post-processing dominate; and SAM's global attention builds its relative-position bias
    # as a (batch, heads, 4096, 4096) float tensor at 1024 px, 0.8 GB an image, so a CPU batch of 8
    # would hold 6.4 GB for a few percent. GPUs take the whole batch
    cpu_batch = 1
    # conservative: "auto" keeps fp32 on CUDA. The masks are logits thresholded at 0 with a
    # +-1 stability offset and fp16 has not been checked against fp32 on the real weights;
    # fp16 / bf16 can still be asked for explicitly
    half_safe = False
    code_licence = "Apache-2.0"  # transformers (and this file); controlnet-aux's SAM code is not used
    # the model card of nielsr/slimsam-50-uniform: `license: apache-2.0` (SlimSAM, github.com/czg1225/SlimSAM,
    # pruned and distilled from SAM ViT-B, itself Apache-2.0: https://huggingface.co/facebook/sam-vit-base)
    weights_licence = "Apache-2.0"
    weights_source = "https://huggingface.co/" + DEFAULT_SAM_MODEL

    def __init__(self, weights: str = DEFAULT_SAM_MODEL, points_per_side: int = 32, pred_iou_thresh: float = 0.88,
                 stability_score_thresh: float = 0.95, min_mask_area: int = 0, crops_nms_thresh: float = 0.7,
                 points_per_batch: int = 64, **common: Any):
        if not isinstance(weights, str) or not weights:
            raise AnnotatorError(f"{self.name} weights must be a hub id or a folder, got {weights!r}")
        for key, value, low in (("points_per_side", points_per_side, 1), ("min_mask_area", min_mask_area, 0),
                                ("points_per_batch", points_per_batch, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise AnnotatorError(f"{self.name} {key} must be an integer >= {low}, got {value!r}")
        for key, value in (("pred_iou_thresh", pred_iou_thresh), ("stability_score_thresh", stability_score_thresh),
                           ("crops_nms_thresh", crops_nms_thresh)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise AnnotatorError(f"{self.name} {key} must be a number in [0, 1], got {value!r}")
        super().__init__(weights=weights, points_per_side=points_per_side, pred_iou_thresh=float(pred_iou_thresh),
                         stability_score_thresh=float(stability_score_thresh), min_mask_area=min_mask_area,
                         crops_nms_thresh=float(crops_nms_thresh), points_per_batch=points_per_batch, **common)
        self.points_per_side = points_per_side
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.min_mask_area = min_mask_area
        self.crops_nms_thresh = float(crops_nms_thresh)
        self.points_per_batch = points_per_batch
        self.processor = None

    # -- weights -----------------------------------------------------------------------------

    def weights_setting(self):
        return self.weights

    def weight_files(self):
        from .hub_models import model_files

        return model_files(self.weights)

    def check_weights(self):
        from .hub_models import check

        check(self.weights, self.name)

    def setup(self):
        from transformers import SamModel, SamProcessor

        load_model(self, SamProcessor, SamModel)

    # -- the map -----------------------------------------------------------------------------

    def __call__(self, image, rng):
        return self.annotate_batch([image], [rng])[0]

    def single(self, image, rng):
        return self(image, rng)

    def annotate_batch(self, images, rngs):
        """The image encoder once per batch (per `cpu_batch` images on a CPU), then each
        image's point grid through the decoder on its own embedding. Inputs are built one
        image at a time and stacked (SAM pads every image to the same square), so a batch
        sees exactly the pixels a single call sees."""
        import torch

        from .weights import torch_device

        self.setup()
        if not images:
            return []
        on_cpu = torch.device(torch_device(self.device)).type == "cpu"
        step = (self.cpu_batch if on_cpu else None) or len(images)
        results = []
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            inputs = [self.processor(images=np.ascontiguousarray(image), return_tensors="pt") for image in chunk]
            pixels = torch.cat([item["pixel_values"] for item in inputs]).to(self.device, self.torch_dtype())
            with torch.inference_mode():
                embeddings = self.model.get_image_embeddings(pixels)
            for row, image in enumerate(chunk):
                resized = tuple(int(v) for v in inputs[row]["reshaped_input_sizes"][0])
                masks = self.masks(embeddings[row:row + 1], image.shape[:2], resized)
                results.append((draw(masks, image.shape[:2], rngs[start + row]), {"masks": len(masks)}))
        return results

    def point_grid(self, resized: tuple[int, int]):
        """The points_per_side^2 grid (cell centres) in the resized image's pixels, as the
        pipeline's `generate_crop_boxes` builds it for one crop: (N, 2) as (x, y)."""
        import torch

        n = self.points_per_side
        offset = 1 / (2 * n)
        side = torch.linspace(offset, 1 - offset, n)
        points = torch.stack([side[None, :].expand(n, n), side[:, None].expand(n, n)], dim=-1).reshape(-1, 2)
        return points * torch.tensor([resized[1], resized[0]], dtype=torch.float32)

    def decode(self, embedding, points):
        """The prompt encoder and mask decoder on one image's embedding for a batch of
        points (P, 2): low-resolution mask logits (P * 3, h, w) and predicted IoUs (P * 3,),
        float32, on the model's device."""
        import torch

        points = points.to(self.device)
        labels = torch.ones(points.shape[0], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(image_embeddings=embedding, input_points=points[None, :, None, :],
                             input_labels=labels[None, :, None], multimask_output=True)
        return out.pred_masks[0].flatten(0, 1).float(), out.iou_scores[0].flatten().float()

    def masks(self, embedding, size: tuple[int, int], resized: tuple[int, int]) -> list[np.ndarray]:
        """Boolean masks at `size` (height, width), after the filters and NMS, largest first."""
        import torch
        from torchvision.ops import batched_nms

        height, width = size
        kept_masks, kept_scores, kept_boxes = [], [], []
        grid = self.point_grid(resized)
        for start in range(0, len(grid), self.points_per_batch):
            logits, scores = self.decode(embedding, grid[start:start + self.points_per_batch])
            if self.pred_iou_thresh > 0:
                keep = scores > self.pred_iou_thresh
                logits, scores = logits[keep], scores[keep]
            for first in range(0, len(logits), UPSCALE_CHUNK):
                low = logits[first:first + UPSCALE_CHUNK]
                with torch.inference_mode():
                    up = self.processor.post_process_masks([low[:, None]], [[height, width]], [list(resized)],
                                                           binarize=False)[0][:, 0]
                part_scores = scores[first:first + UPSCALE_CHUNK]
                if self.stability_score_thresh > 0:
                    keep = stability_score(up) > self.stability_score_thresh
                    up, part_scores = up[keep], part_scores[keep]
                binary = up > MASK_THRESHOLD
                area = mask_area(binary)
                keep = (area > 0) & (area >= self.min_mask_area)
                binary, part_scores = binary[keep], part_scores[keep]
                kept_masks.append(binary)
                kept_scores.append(part_scores)
                kept_boxes.append(mask_boxes(binary))
        if not kept_masks or not sum(len(m) for m in kept_masks):
            return []
        binary, scores, boxes = torch.cat(kept_masks), torch.cat(kept_scores), torch.cat(kept_boxes)
        keep = batched_nms(boxes.float(), scores, torch.zeros_like(scores, dtype=torch.long), self.crops_nms_thresh)
        binary = binary[keep].cpu().numpy()
        areas = binary.reshape(len(binary), -1).sum(1)
        order = np.argsort(-areas, kind="stable")  # largest first; ties keep NMS's score order
        return [binary[i] for i in order]


def mask_area(binary):
    """Pixels in each mask (N, H, W) (summed by rows in int16 then int32: several times faster
    on a CPU than a plain bool sum, as transformers' stability score does)."""
    import torch

    return binary.sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)


def stability_score(logits):
    """IoU of the mask binarised at +offset with the mask at -offset (SAM's stability score)."""
    inner = mask_area(logits > MASK_THRESHOLD + STABILITY_OFFSET)
    outer = mask_area(logits > MASK_THRESHOLD - STABILITY_OFFSET)
    return inner / outer.clamp(min=1)


def mask_boxes(binary):
    """XYXY boxes (inclusive pixel bounds, as transformers' `_batched_mask_to_box`) of non-empty masks (N, H, W)."""
    import torch

    rows, cols = binary.amax(2), binary.amax(1)  # amax: faster than any() on a CPU
    height, width = binary.shape[1:]
    ys, xs = torch.arange(height, device=binary.device), torch.arange(width, device=binary.device)
    top = torch.where(rows, ys, height).min(1).values
    bottom = torch.where(rows, ys, -1).max(1).values
    left = torch.where(cols, xs, width).min(1).values
    right = torch.where(cols, xs, -1).max(1).values
    return torch.stack([left, top, right, bottom], dim=1)


def draw(masks: list[np.ndarray], size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Each mask (in the order given: largest first) in a colour from `rng` on black."""
    canvas = np.zeros((*size, 3), np.uint8)
    for mask in masks:
        canvas[mask] = rng.integers(0, 255, 3).astype(np.uint8)
    return canvas
