"""Training throughput on this machine: streaming from shards vs the same batches in memory.

    python bench/train_throughput.py [--steps 40] [--batch 4] [--workers 0 1 2]

Tiny Stable-Diffusion-shaped model from tests/tiny_models.py (random weights) at 64 px
on a CPU: it measures the data path against the compute, not SD 1.5's speed. Prints
steps/s, samples/s and peak RSS per setting and the ratio streaming / in-memory
(target >= 0.95). Our training step already does what diffusers' example does (VAE
and text encoder every step, no compile), so that comparison is the same loop.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    from conftest import write_synthetic
    from tiny_models import make_tiny_sd

    from pipeline.build import run_build
    from pipeline.config import BuildConfig
    from train.config import TrainConfig
    from train.data import expand_shards, make_dataset
    from train.trainer import train

    work = Path(tempfile.mkdtemp(prefix="cf-bench-train-"))
    sd = make_tiny_sd(work / "sd")
    write_synthetic(work / "in", 200, size=(96, 80))
    run_build(BuildConfig(input=[str(work / "in")], output=str(work / "shards"), resolution=64, min_size=64,
                          caption_model="none", samples_per_shard=50, executor="local", preview=0), log=lambda *_: None)

    def cfg(name: str, workers: int = 0) -> TrainConfig:
        return TrainConfig(shards=[str(work / "shards")], pretrained_model=str(sd), output_dir=str(work / name),
                           resolution=64, train_batch_size=args.batch, max_train_steps=args.steps,
                           checkpointing_steps=10**6, num_validation_images=0, report_to="none",
                           dataloader_num_workers=workers, shuffle_buffer=100)

    urls = expand_shards([str(work / "shards")])
    memory = []
    for batch in make_dataset(urls, "canny", 64, args.batch, 0, 100):
        memory.append(batch)
        if len(memory) == args.steps:
            break
    train(cfg("warmup"), log=lambda *_: None, batches=memory[:3])

    rows = []
    start = time.perf_counter()
    train(cfg("memory"), log=lambda *_: None, batches=memory)
    rows.append(("batches in memory", time.perf_counter() - start))
    for workers in args.workers:
        start = time.perf_counter()
        train(cfg(f"stream{workers}", workers), log=lambda *_: None)
        rows.append((f"streaming, {workers} loader workers", time.perf_counter() - start))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base = rows[0][1]
    print(f"\n{args.steps} steps x batch {args.batch} at 64 px, tiny SD, CPU (includes model loading per run)")
    for name, sec in rows:
        print(f"  {name:<32} {args.steps / sec:6.2f} steps/s  {args.steps * args.batch / sec:7.1f} samples/s  "
              f"ratio vs memory {base / sec:.2f}")
    print(f"  peak RSS of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
