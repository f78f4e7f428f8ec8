"""Depth Anything V2 relative depth: `depth` with method "transformers" and the Small
model by default (transformers' DepthAnythingForDepthEstimation, loaded through
AutoModelForDepthEstimation and its AutoImageProcessor, as depth.py loads any
transformers depth model). Normalised per image; 8-bit by default, 16-bit PNG with
`bits: 16`. Batched as `depth` is (the processor's pixels stacked by shape).

The input size is the image processor's (Small: 518 on the short side, aspect kept,
multiples of 14); `detect_resolution` is recorded but not used, as for `depth` with
method "transformers".
"""

from __future__ import annotations

from .base import AnnotatorError, register
from .depth import Depth

DEPTH_ANYTHING_SMALL = "depth-anything/Depth-Anything-V2-Small-hf"


@register
class DepthAnything(Depth):
    name = "depth_anything"
    mode = "L"
    version = "1"
    batch_size = 8
    # image by image on a CPU (depth batches there): the processor sizes every picture to 518 px
    # (37x37 = 1369 tokens), and with the Small architecture (random weights, 8 pictures, the 2-core
    # CPU shared with other jobs, 1 torch thread) one batch of 8 took 1.53x as long as 8 single
    # passes (16.1 s -> 24.6 s; the attention maps of 8 images leave the caches). With 2 threads the
    # batch came out at 0.45x, but there the single passes were slowed by thread contention on the
    # busy machine (50 s for 8, 3x the 1-thread figure): not a figure to trust. GPUs take the batch
    cpu_batch = 1
    code_licence = "Apache-2.0"  # transformers
    # Small: Apache-2.0 (model card `license: apache-2.0`,
    # https://huggingface.co/depth-anything/Depth-Anything-V2-Small-hf). NOT the larger ones:
    # Depth-Anything-V2-Base-hf and -Large-hf are CC-BY-NC-4.0 (non-commercial;
    # https://huggingface.co/depth-anything/Depth-Anything-V2-Large-hf), recorded from their own
    # model cards when they are the weights setting (licences.weights_licence)
    weights_licence = "Apache-2.0"
    weights_source = "https://huggingface.co/" + DEPTH_ANYTHING_SMALL

    def __init__(self, bits: int = 8, weights: str = DEPTH_ANYTHING_SMALL, **common):
        if "method" in common and common["method"] != "transformers":
            raise AnnotatorError(f"{self.name} runs through transformers only (method 'transformers'), "
                                 f"got method {common['method']!r}; for MiDaS use the depth condition")
        common.pop("method", None)
        if bits not in (8, 16) or isinstance(bits, bool):
            raise AnnotatorError(f"{self.name} bits must be 8 or 16, got {bits!r}")
        if not isinstance(weights, str) or not weights:
            raise AnnotatorError(f"{self.name} weights must be a hub id or a folder, got {weights!r}")
        super().__init__(bits=bits, method="transformers", weights=weights, **common)

