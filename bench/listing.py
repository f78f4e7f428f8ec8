"""A long URL list, streamed: time to the first finished shard and the driver's peak
memory for lists of 1M, 5M and 10M rows (one run; the list's length should not matter).

    python bench/listing.py [--rows 1000000 5000000 10000000]

The rows point at a loopback HTTP server that draws a small distinct JPEG for each path.
The build (`controlforge build --input list.txt`, local executor, 100 rows per shard) is
stopped once its first shard is written: what is measured is the start, not the whole run.
"""

from __future__ import annotations

import argparse
import http.server
import io
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Images(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        from PIL import Image

        n = int("".join(ch for ch in self.path if ch.isdigit()) or 0)
        image = Image.new("RGB", (80, 64), ((n * 37) % 256, (n * 91) % 256, (n * 13) % 256))
        image.paste((255 - (n % 256), 40, 90), (n % 40, n % 30, n % 40 + 20, n % 30 + 20))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=85)
        body = buf.getvalue()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def write_list(path: Path, rows: int, base: str) -> None:
    with open(path, "w", buffering=1 << 20) as f:
        for start in range(0, rows, 100_000):
            f.write("".join(f"{base}/{i:09d}.jpg\n" for i in range(start, min(rows, start + 100_000))))


def first_shard(listing: Path, out: Path) -> tuple[float, float]:
    import psutil

    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", "--input", str(listing), "--output",
                             str(out), "--executor", "local", "--resolution", "64", "--min-size", "64",
                             "--caption-model", "none", "--samples-per-shard", "100", "--preview", "0",
                             "--report-samples", "0"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, seconds = 0, None
    try:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, ps.memory_info().rss)
            if seconds is None and (out / "shards" / "00000_stats.json").exists():
                seconds = time.perf_counter() - began
                settle = time.perf_counter() + 2  # a little longer: memory while the next shards stream
            if seconds is not None and time.perf_counter() > settle:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    return seconds, peak / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000, 10_000_000])
    args = parser.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with tempfile.TemporaryDirectory(prefix="cf-listing-") as tmp:
        for rows in args.rows:
            listing = Path(tmp) / f"list-{rows}.txt"
            t0 = time.perf_counter()
            write_list(listing, rows, base)
            made = time.perf_counter() - t0
            seconds, gib = first_shard(listing, Path(tmp) / f"out-{rows}")
            print(f"{rows:>11,} rows ({listing.stat().st_size / 2**20:,.0f} MiB list, written in {made:.0f} s): "
                  f"first shard after {seconds:.1f} s, driver peak RSS {gib:.2f} GiB", flush=True)
            listing.unlink()
    server.shutdown()


if __name__ == "__main__":
    main()
