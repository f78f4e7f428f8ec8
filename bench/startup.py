"""Start-up cost of a small build: wall time of the bundled example build
(`controlforge build --config datasets/example.yaml`), as a user runs it, with the auto
executor (local for small builds) and with Ray forced, in one run so the ratio is fair.

    python bench/startup.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall(*extra: str) -> float:
    out = Path(tempfile.mkdtemp(prefix="cf-startup-"))
    try:
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.cli", "build", "--config", "datasets/example.yaml",
                        "--output", str(out / "example"), *extra], cwd=ROOT, check=True, capture_output=True)
        return time.perf_counter() - began
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    auto = min(wall() for _ in range(2))
    ray = min(wall("--executor", "ray") for _ in range(2))
    print(f"example build, wall seconds (best of 2): auto (local) {auto:.2f}, ray {ray:.2f}; "
          f"ray / auto = {ray / auto:.1f}x; target: auto <= 5 s on 2 cores -> {'met' if auto <= 5 else 'NOT met'}")


if __name__ == "__main__":
    main()
