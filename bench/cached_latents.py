"""Training steps/s with latents cached at build time (`build --latents`) against encoding
every image with the VAE, on the same shards, in one run (alternating, best of `--repeats`).

    python bench/cached_latents.py [--steps 30] [--batch 16] [--images 512]

Uses the stored circles base (bench/circles_base: trained VAE with a 4x factor, 64 px),
so the VAE's share of a step is that of a real (small) model, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from circles import STORED_BASE, circle_sets, write_circles

    from pipeline.build import run_build
    from pipeline.config import BuildConfig
    from train.config import TrainConfig
    from train.trainer import train

    work = Path(tempfile.mkdtemp(prefix="cf-latents-"))
    circles, _ = circle_sets(args.images, 1, seed=3)
    write_circles(work / "data", circles)
    began = time.perf_counter()
    run_build(BuildConfig(input=[str(work / "data")], output=str(work / "shards"), resolution=64, min_size=64,
                          keep_captions=True, caption_model="none", executor="local", preview=0, report_samples=0,
                          samples_per_shard=256, latents=str(STORED_BASE)), log=lambda *_: None)
    print(f"build with --latents: {args.images} images in {time.perf_counter() - began:.1f} s")

    def rate(cached: bool, run: int) -> float:
        cfg = TrainConfig(shards=[str(work / "shards")], pretrained_model=str(STORED_BASE), resolution=64,
                          output_dir=str(work / f"run-{cached}-{run}"), train_batch_size=args.batch,
                          max_train_steps=args.steps + 5, checkpointing_steps=10_000, validation_steps=10_000,
                          num_validation_images=0, dataloader_num_workers=0, shuffle_buffer=64, report_to="none",
                          cached_latents=cached, flip=False)
        times: list[float] = []
        last = [time.perf_counter()]

        def log(_):
            pass

        from train.families.sd import SD  # the stored base's family

        step = SD.loss

        def timed_step(*a, **k):
            loss = step(*a, **k)
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            return loss

        SD.loss = timed_step
        try:
            train(cfg, log=log)
        finally:
            SD.loss = step
        steady = times[5:]  # after warm-up
        return len(steady) / sum(steady)

    results = {True: [], False: []}
    for run in range(args.repeats):
        for cached in (False, True):
            results[cached].append(rate(cached, run))
    with_cache, without = max(results[True]), max(results[False])
    print(f"batch {args.batch}, 64 px, {args.steps} timed steps, best of {args.repeats}: "
          f"VAE encoder {without:.2f} steps/s, cached latents {with_cache:.2f} steps/s, ratio {with_cache / without:.2f}x")


if __name__ == "__main__":
    main()
