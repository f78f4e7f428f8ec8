"""Random weights for the teed, anyline and depth_anything annotators, written offline.

TEED and Anyline (MTEED) checkpoints are controlnet-aux's own TED network, seeded (one
layer scaled up, see write_ted_weights), saved as a plain state_dict under the file name
(and, for Anyline, the subfolder) their hub repos use, which is what `TEEDdetector` /
`AnylineDetector.from_pretrained` load. The
Depth Anything model is a DepthAnythingForDepthEstimation built from a tiny config (a
tiny Dinov2 backbone) and saved with a DPTImageProcessor, as the real -hf repos hold.

Random weights check plumbing (file names, layouts, shapes, dtypes, batching), never the
quality of a map. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

#: file layout of each kind, relative to the weights folder (as in the hub repos)
FILES = {"teed": "5_model.pth", "anyline": "Anyline/MTEED.pth"}


def write_ted_weights(kind: str, folder) -> Path:
    """Random TED weights at FILES[kind] under `folder` (kind: teed | anyline)."""
    import torch
    from controlnet_aux.teed.ted import TED

    path = Path(folder) / FILES[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0 if kind == "teed" else 1)
    state = TED().state_dict()
    # Seeded TED outputs are within +-0.5: after the sigmoid and safe_step every pixel is 127,
    # a flat map that would hide a wrong batch. The deepest side output, 20x louder, spreads
    # the edges over 0 / 127 / 255.
    state["up_block_3.features.5.weight"] *= 20
    torch.save(state, path)
    return Path(folder)


def make_tiny_depth_anything(folder, small: bool = False, size: int = 56) -> Path:
    """A DepthAnythingForDepthEstimation with a tiny Dinov2 backbone (or, with `small`, the
    Depth-Anything-V2-Small architecture: for timing only), random weights, plus a
    DPTImageProcessor like the real one's (aspect kept, multiples of 14, bicubic)."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    folder = Path(folder)
    if small:  # the -Small-hf config: ViT-S/14 backbone, layers 3/6/9/12 into a 64-wide DPT head
        backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                                image_size=518, patch_size=14, out_indices=[3, 6, 9, 12], reshape_hidden_states=False,
                                layerscale_value=1.0)
        config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384,
                                     neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, head_hidden_size=32)
        size = 518
    else:
        backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                                image_size=size, patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
        config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                                     neck_hidden_sizes=[8, 16, 24, 32], fusion_hidden_size=16, head_hidden_size=8)
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).eval().save_pretrained(folder)
    DPTImageProcessor(size={"height": size, "width": size}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
                      ).save_pretrained(folder)
    return folder
