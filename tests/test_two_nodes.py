"""A build across two Ray nodes on loopback (a head and a second raylet, one CPU each), with
the second node killed mid-build: the build finishes, `verify` is clean, and every input
is accounted for exactly once (a sample or a rejection, no key twice).

Integration test (marked): it starts `ray start --head --block` and `ray start --address
... --block` as children in their own process sessions and stops them at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import write_synthetic
from test_ray_job import BIN, REPO, free_port


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _nodes(env: dict, address: str) -> int:
    code = ("import ray; ray.init(address=%r, log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))" % address)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else 0


def _start_node(args: list[str], env: dict, address: str, nodes: int):
    """`ray start` with fresh ports for every flag that ends in -port (up to 3 tries);
    the running process once the cluster has `nodes` live nodes, else None."""
    for _ in range(3):
        process = _start([a if not a.endswith("-port") else f"{a}={free_port()}" for a in args], env)
        deadline = time.time() + 120
        while process.poll() is None and _nodes(env, address) < nodes and time.time() < deadline:
            time.sleep(1)
        if process.poll() is None and _nodes(env, address) >= nodes:
            return process
        _stop(process)
    return None


@pytest.mark.integration
def test_a_build_survives_losing_a_node(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head, second, build, address = None, None, None, ""
    try:
        # a port picked free can be taken before Ray binds it: each start is tried 3 times on new ports
        ports = ("--node-manager-port", "--object-manager-port", "--runtime-env-agent-port", "--metrics-export-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")
        port = free_port()
        address = f"127.0.0.1:{port}"
        head = _start_node(["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
                            "--include-dashboard=false", *ports, "--ray-client-server-port"], env, address, 1)
        assert head is not None, "the head did not start (3 tries)"
        second = _start_node([f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1", *ports],
                             env, address, 2)
        assert second is not None, "the second node did not join (3 tries)"
        deadline = time.time() + 120

        inputs = write_synthetic(tmp_path / "in", 60, size=(400, 300))
        (tmp_path / "in" / "broken.jpg").write_bytes(b"not a picture")
        out = tmp_path / "out"
        build = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", "--input", str(tmp_path / "in"),
                                  "--output", str(out), "--executor", "ray", "--ray-address", address,
                                  "--caption-model", "none", "--min-size", "64", "--resolution", "128",
                                  "--samples-per-shard", "2", "--preview", "0", "--report-samples", "0"],
                                 cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while len(list(out.glob("shards/*_stats.json"))) < 3:
            assert build.poll() is None, build.stdout.read()[-3000:]
            assert time.time() < deadline + 300, "no shard finished"
            time.sleep(0.1)
        # node loss mid-build: SIGKILL, as a machine that dies, so its raylet and workers go at once
        # with whatever they were doing (a SIGTERM drains for seconds: the build could finish meanwhile)
        finished_at_loss = len(list(out.glob("shards/*_stats.json")))
        assert build.poll() is None and finished_at_loss < 31, "the node was lost while shards were still to do"
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
        log, _ = build.communicate(timeout=600)
        assert build.returncode == 0, log[-3000:]
    finally:
        if build is not None and build.poll() is None:
            build.kill()
        for proc in (second, head):
            if proc is not None:
                _stop(proc)

    from pipeline.verify import verify

    assert verify(str(out), log=lambda *_: None) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    keys = []
    for entry in manifest["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar})
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == manifest["samples"] == len(inputs), "nothing lost, nothing twice"
    assert [Path(e["source"]).name for e in errors] == ["broken.jpg"], "every input accounted for once"
