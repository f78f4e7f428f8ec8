"""Joining or starting Ray, the same way for builds and Ray Train."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def init_ray(address: str | None = None) -> None:
    """Join `address` / RAY_ADDRESS / the `ray job submit` cluster, else start an embedded one.

    The embedded one is always new (`address="local"`): a bare `ray.init()` would join the
    last cluster `ray start` made on this machine, and when that one has died it waits for
    its GCS for minutes and fails. To join a running cluster on this machine, pass "auto"."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # workers must import stages/ even when the package is not installed
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
