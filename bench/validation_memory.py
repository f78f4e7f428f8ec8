"""Peak memory of validation vs a training step (issue 25: validation builds its pipeline
from the modules in memory, so its peak is at most 1.1x a training step's).

    python bench/validation_memory.py [--families sd,sdxl,sd3,flux,sd-medium] [--steps 3] [--check]

Per family, one fresh process trains a few steps on a small build (shards with the base's
cached prompt embeddings, so no text encoders are loaded: the lean configuration) and
validates at the last step (2 images, 2 inference steps). A thread samples the process
RSS (psutil) every 2 ms; the phase is marked by wrapping the family's `loss` (a training
step starts), `save_checkpoint` and `train.trainer.run_validation`. Everything is
measured above the RSS just before `train()` is called (after the imports, the diffusers
pipeline class included, so a first import is not counted as validation memory):

    loaded      RSS at the first step's start: the base, the ControlNet, the data loader
    step pk     the highest RSS during the training steps (forward, backward, AdamW)
    val pk      the highest RSS during run_validation (pipeline built, sampled, decoded)
    ratio       val pk / step pk: the target is <= 1.1
    val added   val pk over the RSS as validation starts: what validation itself allocates
    ckpt pk     the highest RSS while the last step's checkpoint is written

On the CPU glibc keeps freed memory, so an earlier phase's leftovers would hide what a
later one allocates: at every phase change the bench calls malloc_trim(0) (the trainer
does not), so each phase starts from what is live. `--check` runs the last family once
more with a validation that loads the base again (a second copy, its weights copied out of
the file mapping as a move to the GPU would) and holds it, to show this measurement would
see one. (A copy left in the safetensors mmap costs little RSS on the CPU: the two maps
share the page cache; on a GPU it is a full second copy. The test,
tests/test_lean_validation.py, refuses any load during validation outright.) `sd-medium`
is an SD-shaped base with random weights made here (a 35 M-parameter UNet, 5 M VAE, at 128
px) where the models, not the libraries, weigh; the tiny bases are tests/tiny_models.py's.
CPU only; GPU figures (per-phase torch.cuda.max_memory_allocated) are still to be
measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

RESOLUTION = {"sd": 64, "sdxl": 64, "sd3": 64, "flux": 64, "sd-medium": 128}
TARGET = 1.1


def make_base(name: str, folder: Path) -> Path:
    import tiny_models

    if name == "sd-medium":  # SD-shaped, bigger than the tests' tiny one (tests/tiny_models.py SD_SIZES)
        return tiny_models.make_tiny_sd(folder, size="medium")
    return getattr(tiny_models, f"make_tiny_{name}")(folder)


def write_inputs(folder: Path, count: int) -> None:
    """Captioned synthetic pictures: a gradient with a coloured block, distinct per index."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(i)
        h, w = 160, 192
        img = np.zeros((h, w, 3), np.float32)
        img[..., 0] = np.linspace(0, 255, w)[None]
        img[..., 1] = np.linspace(0, 255, h)[:, None]
        img[..., 2] = rng.integers(0, 255)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y:y + h // 3, x:x + w // 3] = rng.integers(0, 255, 3)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"p{i:03d}.jpg", quality=90)
        (folder / f"p{i:03d}.txt").write_text(f"a red square on a blue sky {i}" if i % 2 else "a cat")


def trim() -> None:
    """Hand the memory glibc holds freed back to the OS (malloc_trim), so that a phase's
    RSS is what is live plus what the phase allocates, not what an earlier one left."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PhasePeaks:
    """RSS sampled every `every` seconds in a thread; the highest value per phase."""

    def __init__(self, every: float = 0.002):
        import psutil

        self.process = psutil.Process()
        self.every, self.phase, self.peaks, self.marks = every, "before", {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self.process.memory_info().rss

    def _sample(self) -> None:
        value, phase = self.rss(), self.phase
        self.peaks[phase] = max(self.peaks.get(phase, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every)

    def enter(self, phase: str) -> None:
        self._sample()  # the moment before the phase counts to the one it ends
        trim()
        self.marks.setdefault(phase, self.rss())
        self.phase = phase
        self._sample()

    def __enter__(self) -> "PhasePeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def child(args: argparse.Namespace) -> None:
    """One family's run, in this fresh process; prints one JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import torch

    import train.trainer as trainer
    from train import families
    from train.config import TrainConfig

    torch.set_num_threads(2)
    family = families.detect(args.base)
    getattr(diffusers, family.PIPELINE)  # imported now: a first import is no validation memory
    cfg = TrainConfig(shards=[args.shards], pretrained_model=args.base, output_dir=args.out,
                      resolution=args.resolution, train_batch_size=args.batch, max_train_steps=args.steps,
                      checkpointing_steps=10_000, validation_steps=args.steps, num_validation_images=args.images,
                      validation_inference_steps=args.inference_steps, dataloader_num_workers=0, shuffle_buffer=4,
                      report_to="none", learning_rate=1e-4, cached_text_embeddings=args.text == "cached")
    peaks = PhasePeaks()
    family_cls = type(family)
    loss, validate, save = family_cls.loss, trainer.run_validation, trainer.save_checkpoint
    seconds = {}

    def step_loss(self, *a, **k):
        peaks.enter("step")
        seconds.setdefault("first_step", time.perf_counter())
        return loss(self, *a, **k)

    def checkpoint(*a, **k):
        peaks.enter("checkpoint")
        try:
            return save(*a, **k)
        finally:
            peaks.enter("after checkpoint")

    def validation(*a, **k):
        peaks.enter("validation")
        started = time.perf_counter()
        try:
            if args.reload:  # the check: a validation that loads the base again, held while it runs; the
                # weights are copied out of the safetensors mmap (as a move to the GPU would), since
                # pages of the same file mapped twice are shared and count in RSS only when touched
                second = families.load(args.base, torch.float32, text=False)
                for module in (second.vae, second.denoiser):
                    for param in module.parameters():
                        param.data = param.data.clone()
            return validate(*a, **k)
        finally:
            seconds["validation"] = time.perf_counter() - started
            peaks.enter("after")

    family_cls.loss, trainer.run_validation, trainer.save_checkpoint = step_loss, validation, checkpoint
    logs: list[str] = []
    baseline = peaks.rss()
    with peaks:
        peaks.enter("load")
        started = time.perf_counter()
        result = trainer.train(cfg, log=logs.append)
    steps_s = (result["step_times"][-1] - seconds["first_step"]) / len(result["step_times"])
    print(json.dumps({"baseline": baseline, "peaks": peaks.peaks, "marks": peaks.marks,
                      "global_step": result["global_step"], "seconds": time.perf_counter() - started,
                      "step_s": steps_s, "validation_s": seconds.get("validation"),
                      "cached_text": any("not loaded" in line for line in logs)}))


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="sd,sdxl,sd3,flux,sd-medium")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=2, help="validation images")
    parser.add_argument("--inference-steps", type=int, default=2)
    parser.add_argument("--text", choices=("cached", "encoded"), default="cached",
                        help="cached: the shards' prompt embeddings (no text encoders); encoded: the text encoders")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--check", action="store_true", help="also run the last family with a validation that loads "
                        "the base again (a second copy), to see that this measurement shows it")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("base", "shards", "out"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--reload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    from pipeline.build import run_build
    from pipeline.config import BuildConfig

    work = Path(tempfile.mkdtemp(prefix="cf-bench-valmem-"))
    write_inputs(work / "in", 6)
    rows = []
    print(f"MiB over the RSS just before train(); ratio = val peak / step peak, target <= {TARGET}; val added: the "
          f"validation peak over the RSS as it starts", flush=True)
    print(f"{'family':17} {'res':>4} {'loaded':>7} {'step pk':>9} {'val pk':>8} {'ratio':>6} {'val added':>9} "
          f"{'ckpt pk':>9} {'step s':>7} {'val s':>6}", flush=True)
    names = args.families.split(",")
    for name, reload in [*((n, False) for n in names), *([(names[-1], True)] if args.check else [])]:
        resolution = RESOLUTION[name]
        base, shards = work / name, work / f"out_{name}"
        if not reload:
            make_base(name, base)
            run_build(BuildConfig(input=[str(work / "in")], output=str(shards), resolution=resolution,
                                  min_size=min(resolution, 128), caption_model="none", keep_captions=True,
                                  executor="local", samples_per_shard=3, preview=0, report_samples=0,
                                  text_embeddings=str(base)), log=lambda *_: None)
        cmd = [sys.executable, __file__, "--child", "--base", str(base), "--shards", str(shards), "--out",
               str(work / f"run_{name}"), "--resolution", str(resolution), "--steps", str(args.steps), "--batch",
               str(args.batch), "--images", str(args.images), "--inference-steps", str(args.inference_steps),
               "--text", args.text, *(["--reload"] if reload else [])]
        label = name + (" +reload" if reload else "")
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            print(f"{label}: the run failed\n{done.stderr[-3000:]}", flush=True)
            continue
        out = json.loads(done.stdout.strip().splitlines()[-1])
        base_rss, peaks, marks = out["baseline"], out["peaks"], out["marks"]
        loaded = marks["step"] - base_rss
        step = peaks["step"] - base_rss
        val = peaks["validation"] - base_rss
        ckpt = peaks.get("checkpoint", base_rss) - base_rss
        added = peaks["validation"] - marks["validation"]
        ratio = val / step
        rows.append({"family": label, "resolution": resolution, "baseline_mib": base_rss / 2 ** 20,
                     "loaded_mib": loaded / 2 ** 20, "step_peak_mib": step / 2 ** 20, "validation_peak_mib": val / 2 ** 20,
                     "validation_added_mib": added / 2 ** 20,
                     "checkpoint_peak_mib": ckpt / 2 ** 20, "ratio": ratio, "step_s": out["step_s"],
                     "validation_s": out["validation_s"], "cached_text": out["cached_text"], "text": args.text})
        print(f"{label:17} {resolution:>4} {mib(loaded):>7} {mib(step):>9} {mib(val):>8} {ratio:>6.2f} {mib(added):>9} "
              f"{mib(ckpt):>9} "
              f"{out['step_s']:>7.2f} {out['validation_s']:>6.2f}" + ("" if ratio <= TARGET else "   > target"),
              flush=True)
    print(f"baseline RSS (imports done, before train()): "
          + ", ".join(f"{r['family']} {r['baseline_mib']:.0f} MiB" for r in rows)
          + f"; text: {args.text}" + (" (no text encoders loaded)" if all(r["cached_text"] for r in rows) else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
