"""Milliseconds per 512 px image for every annotator, on this machine's CPU (or GPU).

    python bench/annotators.py [--size 512] [--repeats 3] [--only hed,depth]

Network annotators use their real architectures with RANDOM weights (written to a
temporary folder by tests/annotator_weights.py; seg's UperNet is built at
ConvNeXt-small size from a config): as slow as the real weights, with meaningless
output. Each row: one warm-up call (not timed), then the median of --repeats calls.
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


def cases(weights: Path, seg: Path, size: int) -> dict[str, tuple[str, dict]]:
    common = {"weights": str(weights), "detect_resolution": size}
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
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
    image = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((args.size, args.size)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\n{args.size} px, device {device}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'annotator':<30} {'ms / image':>10}")
    for label, (name, params) in cases(work / "aux", seg, args.size).items():
        if only and not any(label.startswith(o) for o in only):
            continue
        annotator = create([name], {name: params} if params else {})[name]
        annotator.setup()
        rng = np.random.default_rng(0)
        annotator(image, rng)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            annotator(image, rng)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        print(f"{label:<30} {statistics.median(times) * 1e3:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
