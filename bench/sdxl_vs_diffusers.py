"""controlforge's SDXL training against diffusers' `examples/controlnet/train_controlnet_sdxl.py`
on the same tiny SDXL base (random weights, tests/tiny_models.py) and the same images, in
one run: steps/s of the training loop, peak RSS (the process and its loader workers) and
the ratio of each to diffusers'. Steps/s are timed alike for both, from each loop's own
progress bar made to print every step's elapsed time (TQDM_BAR_FORMAT), over the steps
after `--warmup`: the rate of the median step (what the loop costs when it has the CPU,
steady on a busy machine) and the mean rate (stalls included). `--repeats N` runs every
setting N times, in turns, and pools the steps. (An earlier version compared diffusers'
last smoothed tqdm rate with controlforge's whole-run average, first steps included, which
favoured diffusers.)

    python bench/sdxl_vs_diffusers.py --diffusers-script PATH/TO/diffusers/examples/controlnet/train_controlnet_sdxl.py

diffusers' script is not shipped here: pass a checkout's copy (it needs `datasets` and
tensorboard). Both run on this machine's CPU at 64 px with batch 4 and prompt dropout 0.
controlforge runs four ways: its defaults (loader workers from the cores:
train/data.py default_loader_workers), 0 and 2 loader workers given explicitly, and on a
build made with `--latents BASE --text-embeddings BASE` (cached VAE latents and prompt
embeddings: no VAE encoder and no text encoders in the loop; flips are then off). What
differs from diffusers is the loop (diffusers encodes every prompt once before training and
loads its data with `datasets`; controlforge streams shards, and encodes each step's
prompts unless the shards hold their embeddings), not the model. Targets: the defaults at
>= 1.0x diffusers' steps/s, the cached build at >= 1.2x.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


#: every training progress bar (diffusers' "Steps", controlforge's "train") prints each step with its
#: elapsed time to the millisecond: both loops are timed the same way, from the outside
BAR_ENV = {"TQDM_BAR_FORMAT": "{desc}|{n}/{total}|{elapsed_s:.3f}s", "TQDM_MININTERVAL": "0"}
BAR_LINE = re.compile(r"(?:Steps|train)\|(\d+)/(\d+)\|(\d+\.\d+)s")


def step_times(out: str, steps: int, warmup: int) -> list[float]:
    """Seconds of each training step after the first `warmup` (lazy initialisation, loader
    workers starting: left out alike for every loop), from the bar's per-step lines."""
    first: dict[int, float] = {}
    for n, total, elapsed in BAR_LINE.findall(out.replace("\r", "\n")):
        if int(total) == steps:
            first.setdefault(int(n), float(elapsed))
    if any(n not in first for n in range(warmup, steps + 1)):
        raise RuntimeError(f"the progress bar did not show every step {warmup}..{steps}:\n{out[-2000:]}")
    return [first[n] - first[n - 1] for n in range(warmup + 1, steps + 1)]


def run(command: list[str], cwd: Path, steps: int, warmup: int) -> tuple[list[float], float, str]:
    """(each step's seconds after the warm-up steps, peak RSS GiB of the process and its children, output)."""
    import psutil

    began = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **BAR_ENV})
    ps, peak, chunks = psutil.Process(proc.pid), 0, []
    import threading

    def read():
        for line in proc.stdout:
            chunks.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True)))
        except Exception:
            pass
        time.sleep(0.05)
    reader.join()
    out = "".join(chunks)
    if proc.returncode:
        raise RuntimeError(f"{command[:3]} failed after {time.perf_counter() - began:.0f} s:\n{out[-3000:]}")
    return step_times(out, steps, warmup), peak / 2**30, out


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if len(ordered) % 2 else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers-script", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of steps/s (both loops)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setting, in turns (median steps/s, "
                        "highest peak RSS): steadier figures on a busy machine")
    args = parser.parse_args()

    from conftest import write_synthetic
    from tiny_models import make_tiny_sdxl

    from pipeline.build import run_build
    from pipeline.config import BuildConfig
    from pipeline.publish import publish

    work = Path(tempfile.mkdtemp(prefix="cf-sdxl-cmp-"))
    print(f"work folder (models, builds, each run's output in log-TURN-SETTING.txt): {work}", file=sys.stderr)
    base = make_tiny_sdxl(work / "sdxl")
    write_synthetic(work / "in", 64)
    for i in range(64):
        (work / "in" / f"synth_{i:04d}.txt").write_text(f"a synthetic picture number {i}")
    build = dict(input=[str(work / "in")], resolution=64, min_size=64, caption_model="none", keep_captions=True,
                 executor="local", preview=0, report_samples=0)
    run_build(BuildConfig(output=str(work / "build"), **build), log=lambda *_: None)
    run_build(BuildConfig(output=str(work / "build-cached"), latents=str(base), text_embeddings=str(base), **build),
              log=lambda *_: None)
    published = publish(str(work / "build"), to=str(work / "hf"), val_fraction=0.0, log=lambda *_: None)

    def diffusers_run(name: str) -> list[str]:
        return [sys.executable, args.diffusers_script, "--pretrained_model_name_or_path", str(base),
                "--dataset_name", str(published), "--dataset_config_name", "canny", "--resolution", "64",
                "--train_batch_size", str(args.batch), "--max_train_steps", str(args.steps), "--learning_rate", "1e-5",
                "--output_dir", str(work / name), "--checkpointing_steps", "100000", "--seed", "0",
                "--report_to", "tensorboard"]

    def ours(name: str, shards: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "pipeline.cli", "train", "--shards", str(work / shards),
                "--pretrained-model", str(base), "--resolution", "64", "--train-batch-size", str(args.batch),
                "--max-train-steps", str(args.steps), "--learning-rate", "1e-5", "--output-dir", str(work / name),
                "--checkpointing-steps", "100000", "--num-validation-images", "0", "--report-to", "none",
                "--prompt-dropout", "0", *extra]

    settings = {  # label: (command, cwd)
        "diffusers": (diffusers_run, work),
        "default": (lambda name: ours(name, "build"), ROOT),
        "0 workers": (lambda name: ours(name, "build", "--dataloader-num-workers", "0"), ROOT),
        "2 workers": (lambda name: ours(name, "build", "--dataloader-num-workers", "2"), ROOT),
        "cached": (lambda name: ours(name, "build-cached"), ROOT),
    }
    times: dict[str, list[list[float]]] = {label: [] for label in settings}  # per run, each step's seconds
    peaks: dict[str, float] = dict.fromkeys(settings, 0.0)
    outputs: dict[str, str] = {}
    for turn in range(args.repeats):
        for i, (label, (command, cwd)) in enumerate(settings.items()):
            steps, rss, out = run(command(f"out-{turn}-{i}"), cwd, args.steps, args.warmup)
            times[label].append(steps)
            peaks[label] = max(peaks[label], rss)
            outputs[label] = out
            (work / f"log-{turn}-{i}.txt").write_text(out)
            print(f"  [{turn + 1}/{args.repeats}] {label}: {1 / median(steps):.2f} steps/s (median step), "
                  f"{len(steps) / sum(steps):.2f} (mean), {rss:.2f} GiB", file=sys.stderr)

    cached_log = outputs["cached"]
    for expected in ("using cached latents", "using cached prompt embeddings"):
        if expected not in cached_log:
            raise RuntimeError(f"the cached run did not log {expected!r}:\n{cached_log[-3000:]}")
    auto = re.search(r"loader workers: (\d+) \(([^)]*)\)", outputs["default"])
    labels = {
        "diffusers": "diffusers `train_controlnet_sdxl.py` (0 loader workers, its default)",
        "default": f"controlforge, defaults ({auto.group(1)} loader workers: {auto.group(2).split(':')[0]})"
                   if auto else "controlforge, defaults",
        "0 workers": "controlforge, --dataloader-num-workers 0",
        "2 workers": "controlforge, --dataloader-num-workers 2",
        "cached": "controlforge, defaults, cached latents + prompt embeddings",
    }
    def typical(label: str) -> float:  # steps/s of the median step, all runs pooled
        return 1 / median([t for run_times in times[label] for t in run_times])

    def mean(label: str) -> float:  # steps/s over all steps, all runs: stalls included
        return sum(len(r) for r in times[label]) / sum(sum(r) for r in times[label])

    theirs_rate, theirs_rss = typical("diffusers"), peaks["diffusers"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\ntiny SDXL, 64 px, batch {args.batch}, {args.steps} steps, prompt dropout 0, CPU ({cores} cores), "
          f"{args.repeats} run(s) each in turns; steps {args.warmup + 1}-{args.steps} of every run timed. "
          f"steps/s: of the median step (what the loop costs when it has the CPU); mean: all steps, stalls "
          f"from other work on the machine included; peak RSS of the process and its loader workers:\n")
    print("| | steps/s | mean steps/s | peak RSS GiB | vs diffusers (median step) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for label, name in labels.items():
        rate, rss = typical(label), peaks[label]
        ratio = "" if label == "diffusers" else f"{rate / theirs_rate:.2f}x speed, {rss / theirs_rss:.2f}x memory"
        print(f"| {name} | {rate:.2f} | {mean(label):.2f} | {rss:.2f} | {ratio} |")
    default_ratio, cached_ratio = typical("default") / theirs_rate, typical("cached") / theirs_rate
    print(f"\ntargets: defaults >= 1.0x diffusers' steps/s: {default_ratio:.2f}x "
          f"({'met' if default_ratio >= 1.0 else 'not met'}); cached >= 1.2x: {cached_ratio:.2f}x "
          f"({'met' if cached_ratio >= 1.2 else 'not met'})")

if __name__ == "__main__":
    main()
