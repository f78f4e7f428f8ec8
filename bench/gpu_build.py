"""Images per GPU-second: the build's real workload (network annotators + BLIP) end to end.

    python bench/gpu_build.py                 # one GPU, 512 px, real-sized networks, random weights
    python bench/gpu_build.py --tiny          # the same script on a CPU with tiny models (CI runs this)
    python bench/gpu_build.py --n 512 --executor ray --out out/gpu-bench

Inputs: N pictures (skimage.data photos cropped at different offsets, and synthetic
scenes), each distinct. Networks: the real controlnet-aux / transformers architectures
(MiDaS DPT-hybrid, HED, PiDiNet, MLSD, OpenPose, NormalBAE, lineart, UperNet
ConvNeXt-small, BLIP-base; and in the per-model table TEED, Anyline's MTEED and Depth
Anything V2 Small) with RANDOM weights built offline: as slow as the real ones,
with meaningless maps. BLIP's random weights are made to emit `--caption-tokens` tokens
(min_new_tokens), so generation costs what a real caption does.

Prints, and writes to OUT/gpu_build.json:
  1. per annotator and BLIP: images/s at batch 1, 8 and 32, in fp32 and fp16 (bf16 on a CPU);
  2. whole builds: (a) canny + depth + BLIP, (b) the nine conditions + BLIP: images/s for
     the build, GPU utilisation sampled every 0.2 s (nvidia-smi), peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

NINE = ["canny", "mlsd", "hed", "scribble", "openpose", "seg", "depth", "normal", "lineart"]
NETWORKS = ["depth", "hed", "scribble", "mlsd", "openpose", "seg", "normal", "lineart"]
#: newer network annotators, timed per model only (their real-size random-weight stand-ins
#: exist here; sam and dwpose need real-size networks this bench cannot build offline)
NEWER = ["teed", "anyline", "depth_anything"]


# ------------------------------------------------------------------ inputs and models ---

def make_inputs(folder: Path, n: int, size: int) -> Path:
    """N distinct JPEGs a little larger than `size` (so the build crops): photos at shifted
    crops, then synthetic scenes."""
    import skimage.data
    from PIL import Image

    from conftest import synthetic_image

    folder.mkdir(parents=True, exist_ok=True)
    photos = [np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
              for name in ("astronaut", "coffee", "chelsea", "rocket")]
    side = int(size * 1.25)
    for i in range(n):
        if i % 2 == 0:
            photo = photos[(i // 2) % len(photos)]
            h, w = photo.shape[:2]
            crop = photo[(i * 7) % max(1, h // 8):, (i * 13) % max(1, w // 8):]
            image = Image.fromarray(crop).resize((side, side))
        else:
            image = synthetic_image(i, size=(side, side))
        image.save(folder / f"{i:05d}.jpg", quality=92)
    return folder


def blip_base_shaped(folder: Path, tokens: int) -> Path:
    """BLIP-base's architecture (ViT-B/16 at 384 px, BERT-base decoder, 30524 tokens) with
    random weights, made to generate `tokens` tokens."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *[f"w{i}" for i in range(30524 - 6)]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    config = BlipConfig(text_config=dict(vocab_size=len(vocab), pad_token_id=0, bos_token_id=5, sep_token_id=3,
                                         eos_token_id=3),
                        vision_config=dict(image_size=384, patch_size=16))
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    model.generation_config.min_new_tokens = tokens
    model.save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


def make_models(work: Path, tiny: bool, tokens: int) -> dict[str, str]:
    from annotator_weights import KINDS, write_random_weights
    from new_annotator_weights import make_tiny_depth_anything, write_ted_weights

    for kind in KINDS:
        write_random_weights(kind, work / "aux")
    for kind in ("teed", "anyline"):
        write_ted_weights(kind, work / "ted")
    newer = {"ted": str(work / "ted"),
             "depth_anything": str(make_tiny_depth_anything(work / "depth_anything", small=not tiny))}
    if tiny:
        from tiny_models import make_tiny_blip, make_tiny_upernet

        return {"aux": str(work / "aux"), "seg": str(make_tiny_upernet(work / "upernet")),
                "blip": str(make_tiny_blip(work / "blip")), **newer}
    from annotators import upernet_convnext_small

    return {"aux": str(work / "aux"), "seg": str(upernet_convnext_small(work / "upernet")),
            "blip": str(blip_base_shaped(work / "blip", tokens)), **newer}


def annotator_params(models: dict[str, str], detect: int) -> dict[str, dict]:
    common = {"weights": models["aux"], "detect_resolution": detect}
    ted = {"weights": models["ted"], "detect_resolution": detect}
    return {**{name: dict(common) for name in NETWORKS if name != "seg"}, "seg": {"weights": models["seg"]},
            "teed": ted, "anyline": dict(ted), "depth_anything": {"weights": models["depth_anything"]}}


# ------------------------------------------------------------------ GPU sampling ---

class GpuSampler:
    """GPU utilisation (%) and memory used (MiB) every `period` s, from nvidia-smi, in a thread."""

    def __init__(self, period: float = 0.2):
        self.period, self.util, self.memory = period, [], []
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout.split(",")
                self.util.append(float(out[0]))
                self.memory.append(float(out[1]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()

    def summary(self, skip: float = 0.0) -> dict:
        """Mean utilisation and busy share (util > 0) after the first `skip` share of samples (warm-up)."""
        util = self.util[int(len(self.util) * skip):]
        if not util:
            return {"gpu_util_mean": None, "gpu_busy_share": None, "gpu_memory_peak_mib": None}
        return {"gpu_util_mean": round(statistics.fmean(util), 1),
                "gpu_busy_share": round(sum(u > 0 for u in util) / len(util), 3),
                "gpu_memory_peak_mib": max(self.memory) if self.memory else None}


# ------------------------------------------------------------------ 1. per annotator ---

def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed_calls(call, chunk, device, repeats) -> float:
    """Images/s of `call(chunk)`: one untimed warm-up call, then `repeats` timed ones."""
    call(chunk)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        call(chunk)
    sync(device)
    return repeats * len(chunk) / (time.perf_counter() - start)


def load_model(name, models, params, precision, device, tokens):
    """One loaded annotator (or BLIP) per precision: batch sizes are then its calls' lengths."""
    if name == "blip":
        from stages.models.captioner import BlipCaptioner

        captioner = BlipCaptioner(models["blip"], device, max_new_tokens=tokens, num_beams=3, batch_size=1024,
                                  precision=precision)
        return lambda chunk: captioner(chunk)
    from stages.annotators import create

    annotator = create([name], {name: params[name]})[name]
    annotator.set_precision(precision)
    annotator.setup()
    rngs = [np.random.default_rng(i) for i in range(1024)]
    return lambda chunk: annotator.annotate_batch(chunk, rngs[:len(chunk)])


def per_model_table(models, args, device, images) -> list[dict]:
    import torch

    params = annotator_params(models, args.detect_resolution)
    rows = []
    names = [n for n in NETWORKS + NEWER + ["blip"] if not args.only or n in args.only]
    for name in names:
        for precision in args.precisions:
            call = load_model(name, models, params, precision, device, args.caption_tokens)
            for batch in args.batches:
                chunk = (images * (batch // len(images) + 1))[:batch]
                row = {"model": name, "precision": precision, "batch": batch}
                try:
                    row["images_per_s"] = round(timed_calls(call, chunk, device, args.repeats), 2)
                except Exception as exc:  # e.g. out of memory at batch 32: recorded, not fatal
                    row.update(images_per_s=None, error=f"{type(exc).__name__}: {str(exc)[:120]}")
                if device.startswith("cuda"):
                    row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    torch.cuda.reset_peak_memory_stats()
                rows.append(row)
                print(f"  {name:<10} {precision:<5} batch {batch:>3}: "
                      f"{row['images_per_s'] if row['images_per_s'] is not None else row['error']} images/s",
                      flush=True)
            del call
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ 2. whole builds ---

def whole_build(label, conditions, inputs, out, models, args) -> dict:
    import torch

    from pipeline.build import run_build
    from pipeline.config import BuildConfig

    params = annotator_params(models, args.detect_resolution)
    cfg = BuildConfig(input=[str(inputs)], output=str(out), conditions=conditions, resolution=args.resolution,
                      min_size=min(args.resolution, 64), caption_model=models["blip"],
                      caption_max_tokens=args.caption_tokens, caption_batch_size=args.caption_batch,
                      samples_per_shard=args.samples_per_shard, executor=args.executor, preview=0,
                      report_samples=0, overwrite=True, annotator_dtype=args.build_precision,
                      annotator_params={n: params[n] for n in conditions if n in params})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with GpuSampler() as gpu:
        start = time.perf_counter()
        summary = run_build(cfg, log=lambda *_: None)
        wall = time.perf_counter() - start
    result = {"build": label, "conditions": conditions, "samples": summary["samples"], "wall_s": round(wall, 2),
              "images_per_s": round(summary["samples"] / wall, 2), **gpu.summary(skip=0.1)}
    if torch.cuda.is_available():
        result["driver_peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"  {label}: {result}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny models, 4 small images: plumbing only")
    parser.add_argument("--n", type=int, default=256, help="pictures per whole build")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--detect-resolution", type=int, default=512)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--precisions", default=None, help="default fp32,fp16 on CUDA, fp32,bf16 on a CPU")
    parser.add_argument("--build-precision", default="auto", help="--annotator-dtype of the whole builds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--caption-tokens", type=int, default=20)
    parser.add_argument("--caption-batch", type=int, default=32)
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--executor", default="local", choices=["local", "ray"])
    parser.add_argument("--only", default="", help="comma-separated models for the per-model table (blip too)")
    parser.add_argument("--skip-builds", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("out/gpu-bench"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.n, args.resolution, args.detect_resolution = min(args.n, 4), 96, 64
        args.batches, args.repeats, args.caption_tokens, args.samples_per_shard = "1,4", 1, 4, 4
    args.batches = [int(b) for b in args.batches.split(",")]
    args.precisions = (args.precisions or ("fp32,fp16" if device == "cuda" else "fp32,bf16")).split(",")
    args.only = [o for o in args.only.split(",") if o]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"device {device}{' (' + torch.cuda.get_device_name(0) + ')' if device == 'cuda' else ''}, "
          f"{args.resolution} px, detect {args.detect_resolution}, {'tiny models' if args.tiny else 'real-size nets'}"
          ", random weights", flush=True)
    models = make_models(args.out / "models", args.tiny, args.caption_tokens)
    inputs = make_inputs(args.out / "inputs", args.n, args.resolution)
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB").resize((args.resolution, args.resolution)))
              for p in sorted(inputs.iterdir())[:4]]
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "tiny": args.tiny,
              "resolution": args.resolution, "detect_resolution": args.detect_resolution}
    print("1. per model: images/s", flush=True)
    report["per_model"] = per_model_table(models, args, device, images)
    report["builds"] = []
    if not args.skip_builds:
        print("2. whole builds", flush=True)
        report["builds"].append(whole_build("canny+depth+BLIP", ["canny", "depth"], inputs, args.out / "build-a",
                                            models, args))
        report["builds"].append(whole_build("nine+BLIP", NINE, inputs, args.out / "build-b", models, args))
    (args.out / "gpu_build.json").write_text(json.dumps(report, indent=1))
    print_tables(report)
    return 0


def print_tables(report: dict) -> None:
    rows = report["per_model"]
    batches = sorted({r["batch"] for r in rows})
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    print(f"\nimages/s on {report['device']} ({report['resolution']} px), random weights")
    print("| model | " + " | ".join(f"{p} b{b}" for p in precisions for b in batches) + " |")
    print("| --- |" + " ---: |" * (len(precisions) * len(batches)))
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for p in precisions:
            for b in batches:
                hit = next((r for r in rows if (r["model"], r["precision"], r["batch"]) == (model, p, b)), None)
                cells.append("-" if hit is None or hit["images_per_s"] is None else f"{hit['images_per_s']:.1f}")
        print(f"| {model} | " + " | ".join(cells) + " |")
    for build in report["builds"]:
        print(f"| build {build['build']} | {build['images_per_s']} images/s | GPU busy {build['gpu_busy_share']} "
              f"| util {build['gpu_util_mean']} % | peak {build['gpu_memory_peak_mib']} MiB |")


if __name__ == "__main__":
    sys.exit(main())
