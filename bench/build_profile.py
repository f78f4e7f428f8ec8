"""Where a sample's time goes in a CPU build, against the bare loop's work on the same images.

    python bench/build_profile.py [--n 300]

One process, no Ray (the local executor, which runs the same steps): canny at 512 px
on N synthetic 683x512 JPEGs (so the crop re-encodes), profiled with cProfile; each
row is the cumulative time of one function per sample. The bare loop
(bench/build_throughput.py's process_one + tar, same images) is timed in the same run.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

#: (row, file suffix, function name) of the functions a sample passes through
ROWS = [
    ("read the input bytes", "stages/read/readers.py", "fetch"),
    ("sha256 of the input (the key)", "~", "<built-in method _hashlib.openssl_sha256>"),
    ("decode + resize + crop", "stages/transform/decode.py", "decode_and_resize"),
    ("encode the stored JPEG", "stages/transform/decode.py", "encode_jpeg"),
    ("decode the stored JPEG again (annotators see it)", "stages/transform/decode.py", "decode_rgb"),
    ("canny (seeded thresholds)", "stages/annotators/canny.py", "__call__"),
    ("encode the PNG map", "stages/transform/decode.py", "encode_png"),
    ("coverage of the map", "stages/transform/decode.py", "coverage"),
    ("sample json", "stages/shards/writer.py", "sample_json"),
    ("spool to local disk", "stages/shards/spool.py", "add"),
    ("tar from the spool + stats", "stages/shards/writer.py", "finish"),
]


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    return sum(row[3] for (path, _, func), row in stats.stats.items()
               if func == name and (suffix == "~" or path.endswith(suffix)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    from build_throughput import add, make_images, process_one

    from pipeline.config import BuildConfig
    from pipeline.executors import run_local
    from pipeline.plan import make_steps
    from stages.read.readers import list_inputs
    from stages.work import plan_shards

    work = Path(tempfile.mkdtemp(prefix="cf-profile-"))
    paths = make_images(work / "in", args.n)
    cfg = BuildConfig(input=[str(work / "in")], output=str(work / "out"), conditions=["canny"],
                      caption_model="none", samples_per_shard=100, executor="local")
    steps = make_steps(cfg)
    works = plan_shards(list_inputs(cfg.input), 100)
    list(run_local(steps, plan_shards(list_inputs(cfg.input), 100)[:1]))  # warm-up (imports, first calls)
    shutil.rmtree(work / "out")

    start = time.perf_counter()
    with tarfile.open(work / "bare.tar", "w") as tar:
        for path in paths:
            key, jpg, png = process_one(str(path))
            add(tar, f"{key}.jpg", jpg)
            add(tar, f"{key}.canny.png", png)
    bare = (time.perf_counter() - start) / args.n

    start = time.perf_counter()
    list(run_local(steps, works))
    plain = (time.perf_counter() - start) / args.n
    shutil.rmtree(work / "out")
    profile = cProfile.Profile()
    profile.enable()
    list(run_local(steps, works))
    profile.disable()
    stats = pstats.Stats(profile)
    total = cumulative(stats, "pipeline/executors.py", "run_local")

    print(f"\n{args.n} images, 512 px canny, one process; ms per sample (cProfile inflates calls, so the "
          f"rows are read as shares of the profiled total)")
    print("| step | ms / sample (profiled) | share |")
    print("| --- | ---: | ---: |")
    seen = 0.0
    for label, suffix, name in ROWS:
        seconds = cumulative(stats, suffix, name)
        seen += seconds
        print(f"| {label} | {1e3 * seconds / args.n:.2f} | {seconds / total:.0%} |")
    print(f"| everything else | {1e3 * (total - seen) / args.n:.2f} | {(total - seen) / total:.0%} |")
    print(f"\nunprofiled: pipeline {1e3 * plain:.2f} ms / sample, bare loop {1e3 * bare:.2f} ms / sample "
          f"-> pipeline at {bare / plain:.2f}x the bare loop's speed in one process")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
