"""Milliseconds per 512 px image for every annotator, on this machine's CPU (or GPU),
and what batching buys: the time of one `annotate_batch` call on --batch images over
the time of the same images one by one through `__call__` (below 1: batching is faster).

    python bench/annotators.py [--size 512] [--repeats 3] [--batch 8] [--only hed,depth]

Network annotators use their real architectures with RANDOM weights (written to a
temporary folder by tests/annotator_weights.py; seg's UperNet is built at
ConvNeXt-small size from a config): as slow as the real weights, with meaningless
output. Each row: one warm-up call (not timed), then the median of --repeats calls; the
ratio: one warm-up batched call, then the fastest of --repeats batched calls over the fastest
of --repeats one-by-one runs (the fastest: on a shared machine other work only adds time).
On a CPU most conv nets run image by image even in a batched call (their `cpu_batch`), so
their ratio is about 1; the GPU takes the whole batch in one forward pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def upernet_convnext_small(folder: Path) -> Path:
    """openmmlab/upernet-convnext-small's architecture, random weights."""
    import torch
    from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    torch.manual_seed(0)
    UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, num_labels=150)).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 512, "width": 512}).save_pretrained(folder)
    return folder


def cases(weights: Path, seg: Path, size: int, extra: dict[str, Path] | None = None) -> dict[str, tuple[str, dict]]:
    common = {"weights": str(weights), "detect_resolution": size}
    extra = extra or {}
    return {
        "canny": ("canny", {}),
        "mlsd (M-LSD)": ("mlsd", common),
        "mlsd (hough)": ("mlsd", {"method": "hough"}),
        "hed": ("hed", common),
        "hed (pidinet)": ("hed", {**common, "method": "pidinet"}),
        "scribble (hed)": ("scribble", common),
        "openpose (body)": ("openpose", common),
        "openpose (body+hands+face)": ("openpose", {**common, "hands": True, "face": True}),
        "seg (UperNet ConvNeXt-S)": ("seg", {"weights": str(seg)}),
        "depth (MiDaS DPT-hybrid)": ("depth", common),
        "normal (NormalBAE)": ("normal", common),
        "normal (from depth)": ("normal", {"method": "from_depth", "depth": common}),
        "lineart": ("lineart", common),
        "lineart (coarse)": ("lineart", {**common, "coarse": True}),
        "lineart_anime": ("lineart_anime", common),
        "lineart_standard": ("lineart_standard", {"detect_resolution": size}),
        "shuffle": ("shuffle", {"detect_resolution": size}),
        "face_mesh (real weights)": ("face_mesh", {"detect_resolution": size}),
        "teed": ("teed", {"weights": str(extra.get("ted", weights)), "detect_resolution": size}),
        "anyline (detect 512)": ("anyline", {"weights": str(extra.get("ted", weights)), "detect_resolution": size}),
        "depth_anything (V2 Small)": ("depth_anything", {"weights": str(extra.get("depth_anything", weights))}),
        # tiny stand-in ONNX networks (tests/test_dwpose.py): times the code around DWPose's networks only
        "dwpose (stand-in networks)": ("dwpose", {"weights": str(extra.get("dwpose", weights)),
                                                  "detect_resolution": size}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="images per batched call for the ratio column")
    parser.add_argument("--only", default="", help="comma-separated row prefixes to run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import skimage.data
    import torch
    from PIL import Image

    from annotator_weights import KINDS, write_random_weights
    from stages.annotators import create

    work = Path(tempfile.mkdtemp(prefix="cf-bench-ann-"))
    only = [o for o in args.only.split(",") if o]
    print(f"writing random weights to {work} ...", flush=True)
    for kind in KINDS:
        write_random_weights(kind, work / "aux")
    seg = upernet_convnext_small(work / "upernet") if not only or any(o.startswith("seg") for o in only) else work
    from new_annotator_weights import make_tiny_depth_anything, write_ted_weights
    from test_dwpose import write_weights as write_dwpose_stand_ins

    for kind in ("teed", "anyline"):
        write_ted_weights(kind, work / "ted")
    write_dwpose_stand_ins(work / "dwpose")
    extra = {"ted": work / "ted", "dwpose": work / "dwpose",
             "depth_anything": make_tiny_depth_anything(work / "depth_anything", small=True)}
    photos = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "hubble_deep_field", "immunohistochemistry")
    images = [np.asarray(Image.fromarray(getattr(skimage.data, photos[i % len(photos)])()).convert("RGB")
                         .resize((args.size, args.size)).rotate(90 * (i // len(photos)))) for i in range(args.batch)]
    image = images[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\n{args.size} px, device {device}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'annotator':<30} {'ms / image':>10} {f'batch {args.batch} / 1-by-1':>18}")
    for label, (name, params) in cases(work / "aux", seg, args.size, extra).items():
        if only and not any(label.startswith(o) for o in only):
            continue
        annotator = create([name], {name: params} if params else {})[name]
        annotator.setup()
        rng = np.random.default_rng(0)
        annotator(image, rng)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def timed(run) -> float:
            start = time.perf_counter()
            run()
            sync()
            return time.perf_counter() - start

        single = statistics.median(timed(lambda: annotator(image, rng)) for _ in range(args.repeats))
        rngs = [np.random.default_rng(i) for i in range(len(images))]
        annotator.annotate_batch(images, rngs)
        batched = min(timed(lambda: annotator.annotate_batch(images, rngs)) for _ in range(args.repeats))
        one_by_one = min(timed(lambda: [annotator(im, r) for im, r in zip(images, rngs)]) for _ in range(args.repeats))
        print(f"{label:<30} {single * 1e3:>10.1f} {batched / one_by_one:>18.2f}", flush=True)


if __name__ == "__main__":
    main()
