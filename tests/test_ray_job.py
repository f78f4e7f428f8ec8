"""`ray job submit --working-dir .` against a head node on loopback runs the example build.

Integration test (marked): it starts `ray start --head --block` as a child process
with its files under the test run's RAY_TMPDIR, and stops it (and only it) at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_ray_job_submit_runs_the_example_on_a_local_head(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = free_port(), free_port()
    # every port of its own: the test session's embedded cluster holds Ray's defaults
    ports = {flag: free_port() for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                            "--runtime-env-agent-port", "--metrics-export-port",
                                            "--ray-client-server-port", "--node-manager-port",
                                            "--object-manager-port")}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = tmp_path / "example"
    try:
        address = f"http://127.0.0.1:{dash_port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, head.stdout.read()
            time.sleep(2)
        for _ in range(60):  # the dashboard answers before its job agent is up: retry that case only
            job = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
                 "python", "pipeline/build.py", "--config", "datasets/example.yaml", "--output", str(out)],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout and "samples written" in job.stdout
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] and manifest["samples"] == 7
        assert (out / "preview.png").exists()

        # `ray job stop` mid-build, then the same submit again resumes where the first stopped
        from conftest import write_synthetic

        write_synthetic(tmp_path / "many", 160, size=(1000, 800))
        big = tmp_path / "big"
        command = ["python", "pipeline/build.py", "--input", str(tmp_path / "many"), "--output", str(big),
                   "--caption-model", "none", "--min-size", "64", "--samples-per-shard", "2", "--preview", "0"]
        first = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait",
                                "--working-dir", ".", "--", *command], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=300)
        assert first.returncode == 0, first.stdout + first.stderr
        job_id = next(w.strip("'\"") for line in first.stdout.splitlines() if "submitted successfully" in line
                      for w in line.split() if w.strip("'\"").startswith("raysubmit_"))
        deadline = time.time() + 300
        while len(list(big.glob("shards/*_stats.json"))) < 1:
            assert time.time() < deadline, "the first job wrote no shard"
            time.sleep(0.2)
        stop = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", address, job_id], env=env,
                              capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        stopped_with = len(list(big.glob("shards/*_stats.json")))
        assert stopped_with < 80, "stopped mid-build"
        again = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
                                *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "already done" in again.stdout and "(0 already done)" not in again.stdout, "it resumed"
        manifest = json.loads((big / "manifest.json").read_text())
        assert manifest["complete"] and manifest["samples"] == 160 and len(manifest["shards"]) == 80
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head takes its processes down with it
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
