"""bench/train_gpu_memory.py, the big-base GPU bench, checked where no GPU is: the real
architectures have their published sizes (built on the meta device, no memory), and the
script's own path runs on a CPU with a tiny base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "train_gpu_memory.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_the_real_shapes_have_their_published_sizes():
    """Billions of parameters: SDXL's UNet 2.57, SD3-medium's transformer 2.03, Flux-dev's
    11.90, T5-XXL's encoder 4.76, OpenCLIP bigG with projection 0.695, CLIP-L 0.123."""
    done = run("--count", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = {row["family"]: row for row in map(json.loads, done.stdout.strip().splitlines())}
    assert counts["sdxl"]["unet"] == pytest.approx(2.567, abs=0.01)
    assert counts["sd3"]["transformer"] == pytest.approx(2.028, abs=0.01)
    assert counts["flux"]["transformer"] == pytest.approx(11.90, abs=0.02)
    assert counts["sd3"]["text_encoder_3"] == counts["flux"]["text_encoder_2"] == pytest.approx(4.762, abs=0.01)
    assert counts["sdxl"]["text_encoder_2"] == pytest.approx(0.695, abs=0.005)
    assert counts["flux"]["text_encoder"] == pytest.approx(0.123, abs=0.002)


def test_the_bench_runs_its_settings_on_a_tiny_base(tmp_path):
    out = tmp_path / "rows.json"
    done = run("--tiny", "--family", "sd3", "--only", "cached embeddings", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["setting"], r["batch"]) for r in rows] == [("cached embeddings", 1), ("cached embeddings", 2)]
    assert all(r.get("steps_s", 0) > 0 and "error" not in r for r in rows), rows
