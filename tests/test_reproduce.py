"""bench/reproduce.py end to end in its smoke mode: a tiny random-weight SD base, a few
steps, 8 held-out conditions. Plumbing only (layout, resume, refusal), nothing learns
here; tests/test_learns.py checks that training does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def reproduce(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "reproduce.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from tiny_models import make_tiny_sd

    root = tmp_path_factory.mktemp("repro")
    sd = make_tiny_sd(root / "sd")
    proc = reproduce("--smoke", "--base", str(sd), "--output", str(root / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, sd, proc


def test_smoke_run_writes_results_report_and_comparable_samples(smoke):
    root, _, _ = smoke
    out = root / "out"
    results = json.loads((out / "results.json").read_text())
    for key in ("base", "base_no_prompt", "vae_reconstruction", "summary", "seconds", "machine"):
        assert key in results
    seed = results["seeds"]["0"]
    assert sorted(seed["curve"], key=int) == ["2", "4"] and set(seed["guidance"]) >= {
        "paper (CFG resolution weighting)", "both branches", "unconditional branch only", "no CFG (scale 1)"}
    assert set(seed["ablations"]) == {"zero_init", "random_init", "dropout_50_no_prompt", "dropout_0_no_prompt"}
    report = (out / "report.md").read_text()
    assert "## Ablations" in report and "![curve](curve.png)" in report
    for name in ("curve.png", "guidance.png", "contact_sheet.png"):
        assert (out / name).stat().st_size > 1000
    records = {}
    for kind in ("controlnet", "base"):
        folder = out / "samples" / kind
        records[kind] = [json.loads(p.read_text()) for p in sorted(folder.glob("[0-9][0-9][0-9][0-9].json"))]
        assert len(records[kind]) == 8
        assert all((folder / f"{r['index']:04d}.png").exists() and (folder / f"{r['index']:04d}_condition.png").exists()
                   for r in records[kind])
    same = lambda r: (r["source"], r["prompt"], r["seed"])  # noqa: E731
    assert [same(r) for r in records["controlnet"]] == [same(r) for r in records["base"]], \
        "the same held-out conditions, prompts and seeds for both"
    assert records["base"][0]["controlnets"] == [] and records["controlnet"][0]["controlnets"]


def test_a_finished_run_resumes_without_redoing_anything(smoke):
    root, sd, _ = smoke
    before = json.loads((root / "out" / "state.json").read_text())["done"]
    proc = reproduce("--smoke", "--base", str(sd), "--output", str(root / "out"))
    assert proc.returncode == 0 and "resuming the run" in proc.stdout
    assert json.loads((root / "out" / "state.json").read_text())["done"] == before


def test_a_folder_from_another_run_or_with_other_files_is_refused(smoke, tmp_path):
    root, sd, _ = smoke
    other = reproduce("--smoke", "--base", str(sd), "--steps", "6", "--output", str(root / "out"))
    assert other.returncode == 2 and "other settings (steps differ)" in other.stderr
    (tmp_path / "mine.txt").write_text("not a reproduction")
    foreign = reproduce("--smoke", "--base", str(sd), "--output", str(tmp_path))
    assert foreign.returncode == 2 and "holds no reproduce run" in foreign.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"], "nothing written into it"


def test_sigterm_stops_the_worker_processes_too(smoke, tmp_path):
    """A stopped reproduction leaves no worker training on into its folder."""
    import signal
    import time

    import psutil

    _, sd, _ = smoke
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "reproduce.py"), "--smoke", "--base", str(sd),
                             "--output", str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        workers: list = []
        while time.time() < deadline and len(workers) < 2:  # the job pool: spawned workers besides the tracker
            workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                       if "spawn_main" in " ".join(c.cmdline())]
            time.sleep(0.5)
        assert len(workers) >= 2, "the run never started its worker processes"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers outlived the run: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
