"""Build throughput: the Ray pipeline against a bare multiprocessing loop and datasets.map.

    python bench/build_throughput.py --n 1000

All three do the same work on the same N synthetic 683x512 JPEGs (so the 512 px
center crop really re-encodes): decode -> resize/crop -> canny -> encode JPEG + PNG
-> tar. The bare loop is the floor (one process per core, no framework). The
pipeline also hashes every input for its key, checks it, records stats and a
manifest. Printed: images/s of each, the ratios, and the peak memory (RSS summed
over the driver and Ray's workers) of the pipeline at N and at 4N.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RES = 512


def make_images(folder: Path, n: int, size=(683, 512)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    paths = []
    for i in range(n):
        img = base.copy()
        for _ in range(6):
            x, y = rng.integers(0, w - 60), rng.integers(0, h - 60)
            img[y:y + rng.integers(20, 200), x:x + rng.integers(20, 200)] = rng.integers(0, 255, 3)
        img += rng.normal(0, 6, img.shape)
        path = folder / f"img_{i:06d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


# ------------------------------------------------------------------ the floor ---

def process_one(path: str) -> tuple[str, bytes, bytes]:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = RES / min(w, h)
    if scale != 1:
        img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
    left, top = (img.size[0] - RES) // 2, (img.size[1] - RES) // 2
    arr = np.asarray(img.crop((left, top, left + RES, top + RES)))
    edges = cv2.Canny(arr, 100, 200)
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(arr).save(jpg, format="JPEG", quality=95)
    Image.fromarray(edges).save(png, format="PNG", compress_level=1)
    return Path(path).stem, jpg.getvalue(), png.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def bare_worker(args: tuple[list[str], str]) -> int:
    paths, tar_path = args
    with tarfile.open(tar_path, "w") as tar:
        for path in paths:
            key, jpg, png = process_one(path)
            add(tar, f"{key}.jpg", jpg)
            add(tar, f"{key}.canny.png", png)
    return len(paths)


def run_bare(paths: list[Path], out: Path, cores: int, per_shard: int) -> float:
    out.mkdir(parents=True)
    chunks = [([str(p) for p in paths[i:i + per_shard]], str(out / f"{i // per_shard:05d}.tar"))
              for i in range(0, len(paths), per_shard)]
    start = time.perf_counter()
    with mp.get_context("fork").Pool(cores) as pool:
        assert sum(pool.imap_unordered(bare_worker, chunks)) == len(paths)
    return time.perf_counter() - start


# ----------------------------------------------------------- datasets.map ---

def hf_map(row: dict) -> dict:
    key, jpg, png = process_one(row["path"])
    return {"key": key, "jpg": jpg, "png": png}


def run_datasets_map(paths: list[Path], out: Path, cores: int, per_shard: int) -> float:
    import datasets

    datasets.disable_progress_bars()
    out.mkdir(parents=True)
    start = time.perf_counter()
    ds = datasets.Dataset.from_dict({"path": [str(p) for p in paths]})
    ds = ds.map(hf_map, num_proc=cores, remove_columns=["path"], cache_file_name=str(out / "cache.arrow"))
    for shard in range(0, len(ds), per_shard):
        with tarfile.open(out / f"{shard // per_shard:05d}.tar", "w") as tar:
            for row in ds.select(range(shard, min(shard + per_shard, len(ds)))):
                add(tar, f"{row['key']}.jpg", row["jpg"])
                add(tar, f"{row['key']}.canny.png", row["png"])
    return time.perf_counter() - start


# --------------------------------------------------------------- pipeline ---

class PeakRSS:
    """Peak of the summed RSS of this process and every Ray process, sampled."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            total = 0
            for proc in psutil.process_iter(["pid", "name", "cmdline", "memory_info"]):
                try:
                    cmd = " ".join(proc.info["cmdline"] or [])
                    if proc.info["pid"] == me or "ray::" in cmd or "ray::" in (proc.info["name"] or ""):
                        total += proc.info["memory_info"].rss
                except (psutil.NoSuchProcess, TypeError):
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_pipeline(folder: Path, out: Path, per_shard: int) -> tuple[float, int, int]:
    from pipeline.build import run_build
    from pipeline.config import BuildConfig

    cfg = BuildConfig(input=[str(folder)], output=str(out), conditions=["canny"], caption_model="none",
                      samples_per_shard=per_shard, preview=0, min_size=64, executor="ray",  # auto would run the warm-up locally
                      report_samples=0)  # the build alone: the report after it is a fixed cost (<= 1000 thumbnails)
    with PeakRSS() as rss:
        start = time.perf_counter()
        summary = run_build(cfg, log=lambda *_: None)
        seconds = time.perf_counter() - start
    return seconds, summary["samples"], rss.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--samples-per-shard", type=int, default=250,
                        help="small enough that N gives each core several shards")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--skip-memory", action="store_true", help="skip the 4N run")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from pipeline.executors import init_ray

    work = Path(tempfile.mkdtemp(prefix="cf-bench-"))
    n, per = args.n, args.samples_per_shard
    print(f"making {4 * n if not args.skip_memory else n} synthetic 683x512 JPEGs in {work} ...", flush=True)
    all_paths = make_images(work / "in4n", n if args.skip_memory else 4 * n)
    small = work / "in"
    small.mkdir()
    for p in all_paths[:n]:
        os.link(p, small / p.name)
    paths = sorted(small.glob("*.jpg"))

    # the two references first: forking a process that runs a Ray driver is unsafe
    bare = run_bare(paths, work / "out-bare", args.cores, per)
    hf = run_datasets_map(paths, work / "out-hf", args.cores, per)

    t0 = time.perf_counter()
    init_ray()
    ray_init = time.perf_counter() - t0
    warm = work / "warm"
    warm.mkdir()
    for p in paths[:2 * args.cores]:
        os.link(p, warm / p.name)
    run_pipeline(warm, work / "out-warm", 2)  # start Ray's workers before timing
    pipe, samples, rss_n = run_pipeline(small, work / "out-pipe", per)
    assert samples == n, samples
    rows = [("bare loop (mp.Pool)", bare), ("datasets.map(num_proc)", hf), ("controlforge (Ray Data)", pipe)]
    print(f"\nN = {n} images, {args.cores} cores, {per} per shard; ray.init {ray_init:.1f} s (not counted)")
    for name, sec in rows:
        print(f"  {name:<26} {sec:7.2f} s  {n / sec:8.1f} images/s")
    print(f"  pipeline / bare floor      {bare / pipe:.2f}x   (target >= 0.9)")
    print(f"  pipeline / datasets.map    {hf / pipe:.2f}x   (target >= 1.5)")
    if not args.skip_memory:
        pipe4, samples4, rss_4n = run_pipeline(work / "in4n", work / "out-pipe4", per)
        assert samples4 == 4 * n
        print(f"  peak RSS (driver + Ray workers): N {rss_n / 2**20:.0f} MiB, 4N {rss_4n / 2**20:.0f} MiB "
              f"(ratio {rss_4n / rss_n:.2f}); 4N at {4 * n / pipe4:.1f} images/s")
    ray.shutdown()


if __name__ == "__main__":
    main()
