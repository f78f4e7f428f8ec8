"""Starting Ray for a build: a dead cluster left behind by `ray start` must not be joined."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_embedded_ray_ignores_a_dead_default_cluster():
    """A bare `ray.init()` joins the cluster named in /tmp/ray/ray_current_cluster; when
    that cluster has died (here: an address nothing answers on), it waited minutes for its
    GCS and failed. init_ray starts its own cluster instead, at once."""
    # where `ray start` records its cluster: $RAY_TMPDIR/ray (conftest points it at a temporary folder)
    address_file = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    saved = address_file.read_bytes() if address_file.exists() else None
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text("192.0.2.2:49219")  # TEST-NET-1: never routed, connections hang
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        code = ("import ray; from common.ray_session import init_ray; init_ray(); "
                "print('cpus', ray.cluster_resources().get('CPU'))")
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=90)
    finally:
        if saved is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_bytes(saved)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cpus" in done.stdout and "192.0.2.2" not in done.stderr
