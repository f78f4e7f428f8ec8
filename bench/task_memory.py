"""Peak memory of one shard task with 1 and with 9 conditions, at two shard sizes.

    python bench/task_memory.py [--samples 4,16] [--resolution 512] [--detect-resolution 256]

Each case runs in a fresh process: the annotators are loaded and warmed on a one-sample
shard first, then the RSS baseline is taken and a sampler thread records the peak RSS
while the shard task (read, decode, annotate, write: the CPU plan, no captioner) runs.
Printed per case: the peak over the baseline, the shard's tar size, and what the shard
weighs when it crosses to an actor (pickled after the read step, as Ray would send it to
the captioner). Besides RSS (which includes the networks' working memory, a few hundred
MB that comes and goes), tracemalloc's traced peak counts Python and NumPy allocations,
where samples, maps and tar bytes live. The per-sample slope between the two shard sizes is what grows with the
shard; its ratio between 9 and 1 conditions says whether it also grows with conditions.

Network annotators have their real architectures with RANDOM weights (as in
bench/annotators.py; seg uses a tiny UperNet): their maps are noise-like, so larger PNGs
than real ones, which only makes a held-in-memory shard look worse.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

NINE = ["canny", "mlsd", "hed", "scribble", "openpose", "seg", "depth", "normal", "lineart"]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def write_inputs(folder: Path, count: int) -> None:
    """Real photos (skimage), each copy shifted a little so every input is a new picture."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = np.asarray(Image.fromarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()).convert("RGB"))
        photo = np.roll(photo, 7 * (i // len(PHOTOS)), axis=1)
        Image.fromarray(photo).resize((640, 640)).save(folder / f"p{i:03d}.jpg", quality=92)


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from pipeline.config import BuildConfig
    from pipeline.executors import run_steps
    from stages.read.readers import list_inputs
    from stages.work import plan_shards
    from pipeline.plan import make_steps
    from stages.annotators import create

    torch.set_num_threads(2)
    conditions = args.conditions.split(",")
    common = {"weights": args.weights, "detect_resolution": args.detect_resolution}
    params = {name: dict(common) for name in conditions if name not in ("canny", "seg")}
    if "seg" in conditions:
        params["seg"] = {"weights": args.seg}

    def config(folder: str, out: str) -> BuildConfig:
        return BuildConfig(input=[folder], output=out, conditions=conditions, resolution=args.resolution,
                           min_size=64, caption_model="none", annotator_params=params)

    warm = config(args.warm, args.out + "-warm")
    annotators = create(warm.conditions, warm.annotator_params)
    run_steps(make_steps(warm, annotators=annotators), plan_shards(list_inputs([args.warm]), 100)[0])  # load, warm
    cfg = config(args.inputs, args.out)
    steps = make_steps(cfg, annotators=annotators)  # the same (warm) annotators, writing to this case's output
    work = plan_shards(list_inputs([args.inputs]), 1000)[0]
    crossing = len(pickle.dumps(steps[0](pickle.loads(pickle.dumps(work)))))
    baseline = rss_bytes()
    tracemalloc.start()
    with PeakRss() as peak:
        stats = run_steps(steps, work)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"samples": stats["samples"], "baseline": baseline, "peak": peak.peak, "traced": traced,
                      "tar": stats["bytes"], "crossing": crossing}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="8,64", help="two shard sizes, comma-separated")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--detect-resolution", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("conditions", "weights", "seg", "warm", "inputs", "out"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from annotator_weights import KINDS, write_random_weights
    from tiny_models import make_tiny_upernet

    small, large = (int(n) for n in args.samples.split(","))
    work = Path(tempfile.mkdtemp(prefix="cf-bench-mem-"))
    print(f"random weights and {large} inputs in {work} ...", flush=True)
    for kind in KINDS:
        write_random_weights(kind, work / "aux")
    seg = make_tiny_upernet(work / "upernet")
    write_inputs(work / "warm", 1)
    for n in (small, large):
        write_inputs(work / f"in{n}", n)
    rows = {}
    for conditions in (["canny"], NINE):
        for n in (small, large):
            command = [sys.executable, __file__, "--child", "--conditions", ",".join(conditions),
                       "--weights", str(work / "aux"), "--seg", str(seg), "--warm", str(work / "warm"),
                       "--inputs", str(work / f"in{n}"), "--out", str(work / f"out-{len(conditions)}-{n}"),
                       "--resolution", str(args.resolution), "--detect-resolution", str(args.detect_resolution)]
            start = time.perf_counter()
            done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
            rows[len(conditions), n] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {len(conditions)} condition(s), {n} samples: {time.perf_counter() - start:.0f} s", flush=True)

    mib = 2 ** 20
    print(f"\n{args.resolution} px stored, networks at {args.detect_resolution} px; MiB")
    print(f"{'conditions':>10} {'samples':>7} {'RSS peak over baseline':>23} {'traced peak':>11} {'shard tar':>9} "
          f"{'crosses to an actor':>20}")
    for (conds, n), row in rows.items():
        print(f"{conds:>10} {n:>7} {(row['peak'] - row['baseline']) / mib:>23.1f} {row['traced'] / mib:>11.1f} "
              f"{row['tar'] / mib:>9.1f} {row['crossing'] / mib:>20.1f}")
    print("\nper extra sample (slope between the two shard sizes), MiB")
    slopes = {}
    for conds in (1, len(NINE)):
        a, b = rows[conds, small], rows[conds, large]
        for row in (a, b):
            row["growth"] = row["peak"] - row["baseline"]
        s = slopes[conds] = {key: (b[key] - a[key]) / (large - small) / mib
                             for key in ("growth", "traced", "tar", "crossing")}
        print(f"{conds:>2} condition(s): RSS peak {s['growth']:.3f}, traced peak {s['traced']:.3f}, "
              f"tar {s['tar']:.3f}, crossing {s['crossing']:.3f}")
    print("\nratio of the slopes, 9 / 1 conditions: " + ", ".join(
        f"{label} {slopes[9][key] / slopes[1][key]:.2f}x" if abs(slopes[1][key]) > 1e-3 else f"{label} n/a (flat)"
        for key, label in (("growth", "RSS peak"), ("traced", "traced peak"), ("tar", "tar"), ("crossing", "crossing"))))


if __name__ == "__main__":
    main()
