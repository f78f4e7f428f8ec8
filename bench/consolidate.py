"""Driver memory at the end of a build, against the number of samples.

    python bench/consolidate.py [--samples 1000000 3000000 10000000] [--per-shard 1000]

For each size, synthetic shard records (NAME_stats.json as the writer makes them, with
URL sources, BLIP caption sources, pHashes, canny coverage and 2 % rejected rows; no
tars, as no repeat is planted, none is read) are consolidated by `stages.shards.consolidate.finish`
in a fresh process: the peak RSS over that process's baseline is printed, next to the
peak of the same process only loading every record into one list, which is what the
build's end did before (it held every shard's stats at once).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def write_records(out: Path, samples: int, per_shard: int) -> list[str]:
    import numpy as np

    (out / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for number, start in enumerate(range(0, samples, per_shard)):
        count = min(per_shard, samples - start)
        keys = sorted(rng.bytes(8).hex() for _ in range(count))
        rows = range(start, start + count)
        name = f"{number:05d}"
        stats = {"shard": name, "inputs": count + count // 50, "samples": count, "bytes": 1000 * count,
                 "sha256": "0" * 64, "conditions": ["canny"], "rejected": {"http_error": count // 50},
                 "seconds": {"read": 1.0, "decode": 1.0, "annotate:canny": 1.0, "write": 0.1}, "counters": {},
                 "keys": keys, "sources": [f"https://images.example.com/photos/{i:09d}.jpg" for i in rows],
                 "caption_sources": ["BLIP Salesforce/blip-image-captioning-base"] * count,
                 "caption_words": rng.integers(5, 15, count).tolist(),
                 "phashes": [rng.bytes(8).hex() for _ in range(count)],
                 "coverage": {"canny": rng.random(count).round(4).tolist()},
                 "errors": [{"source": f"https://images.example.com/gone/{i:09d}.jpg", "stage": "read",
                             "error": "http_error", "message": "HTTP 404", "shard": name}
                            for i in range(start, start + count // 50)]}
        (out / "shards" / f"{name}_stats.json").write_text(json.dumps(stats))
        (out / "shards" / f"{name}.tar").write_bytes(b"")
        names.append(name)
    return names


def child(folder: str, mode: str) -> None:
    from task_memory import PeakRss, rss_bytes

    from stages.shards import consolidate, manifest as index
    from stages.shards.output import Output

    out = Output(folder)
    names = sorted(index.completed_shards(out))
    baseline = rss_bytes()
    started = time.perf_counter()
    with PeakRss() as peak:
        if mode == "finish":
            result = consolidate.finish(out, names, log=lambda *_: None)
            samples = result["samples"]
        else:
            held = [index.load_stats(out, name) for name in names]
            samples = sum(s["samples"] for s in held)
    print(json.dumps({"samples": samples, "growth": peak.peak - baseline, "seconds": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    mib = 2 ** 20
    print(f"{'samples':>10} {'shards':>7} {'finish: RSS growth MiB':>23} {'s':>6} {'holding every record: MiB':>26} {'s':>6}")
    for samples in args.samples:
        with tempfile.TemporaryDirectory(prefix="cf-bench-end-") as folder:
            names = write_records(Path(folder), samples, args.per_shard)
            rows = {}
            for mode in ("finish", "hold"):
                done = subprocess.run([sys.executable, __file__, "--child", folder, mode], check=True,
                                      capture_output=True, text=True, cwd=ROOT)
                rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
                assert rows[mode]["samples"] == samples, rows[mode]
            print(f"{samples:>10} {len(names):>7} {rows['finish']['growth'] / mib:>23.0f} {rows['finish']['seconds']:>6.0f} "
                  f"{rows['hold']['growth'] / mib:>26.0f} {rows['hold']['seconds']:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
