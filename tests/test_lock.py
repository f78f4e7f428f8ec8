"""One build per output folder: a second build (or --overwrite) is refused while a live
build holds the lock; a lock whose holder is gone is taken over with a warning."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from conftest import write_synthetic
from stages.shards.lock import LOCK_NAME, BuildLock, LockedError
from stages.shards.output import Output


@pytest.fixture
def images(tmp_path):
    write_synthetic(tmp_path / "in", 3)
    return tmp_path / "in"


def build(images, out, *extra):
    from pipeline.cli import main

    return main(["build", "--input", str(images), "--output", str(out), "--resolution", "64", "--min-size", "64",
                 "--caption-model", "none", "--executor", "local", "--preview", "0", "--report-samples", "0", *extra])


def write_lock(out, **record):
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"token": "other", "started": time.time(), "heartbeat": time.time(),
                                             **record}))


def test_a_second_build_is_refused_while_the_first_holds_the_folder(images, tmp_path, capsys):
    out = tmp_path / "out"
    assert build(images, out, "--resolution", "64") == 0
    manifest = (out / "manifest.json").read_text()
    holder = BuildLock(Output(str(out))).acquire()  # a live build in this process
    try:
        assert build(images, out, "--resolution", "128", "--overwrite") == 2
        message = capsys.readouterr().err
        assert "being built by another run" in message and f"pid {holder.record['pid']}" in message
        assert socket.gethostname() in message
        assert (out / "manifest.json").read_text() == manifest, "the first build's manifest is untouched"
    finally:
        holder.release()
    assert not (out / LOCK_NAME).exists()
    assert build(images, out, "--resolution", "128", "--overwrite") == 0, "free again once released"
    assert json.loads((out / "manifest.json").read_text())["config"]["resolution"] == 128
    assert not (out / LOCK_NAME).exists(), "a finished build leaves no lock"


def test_a_dead_holder_on_this_host_is_taken_over(images, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "out", host=socket.gethostname(), pid=dead.pid)
    assert build(images, tmp_path / "out") == 0
    assert "taking over the lock" in capsys.readouterr().out


def test_another_hosts_lock_is_respected_until_its_heartbeat_is_stale(images, tmp_path, capsys):
    out = tmp_path / "out"
    write_lock(out, host="elsewhere", pid=1, heartbeat=time.time() - 30)
    assert build(images, out, "--lock-stale-seconds", "600") == 2
    assert "host elsewhere" in capsys.readouterr().err
    assert build(images, out, "--lock-stale-seconds", "10") == 0
    assert "no heartbeat for" in capsys.readouterr().out


def test_the_heartbeat_keeps_a_long_build_fresh(tmp_path):
    lock = BuildLock(Output(str(tmp_path)), stale_seconds=1, heartbeat_seconds=0.1).acquire()
    try:
        first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first
        with pytest.raises(LockedError):
            BuildLock(Output(str(tmp_path))).acquire()
    finally:
        lock.release()
