"""S3 for real: a moto S3 server on loopback (started here), s3fs with its endpoint from
FSSPEC_S3_ENDPOINT_URL. A build to S3 killed mid-way and resumed, verify, publish from S3,
training that streams its shards from S3, the output lock on S3, and the stale listing
that used to crash resumes."""

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

from conftest import write_synthetic

REPO = Path(__file__).resolve().parent.parent
BUCKET = "controlforge-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server for this module; the environment points s3fs and boto at it."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for the subprocesses (fsspec reads FSSPEC_* when it is imported)
    import fsspec.config
    import s3fs

    saved_conf = dict(fsspec.config.conf.get("s3", {}))
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint  # this process imported fsspec already
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "moto server did not start"
                time.sleep(0.2)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        fsspec.config.conf["s3"] = saved_conf
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3in")
    write_synthetic(root / "in", 24, size=(500, 400))
    for i in range(24):
        (root / "in" / f"synth_{i:04d}.txt").write_text(f"picture {i}")
    return root


def build_args(inputs, output):
    return ["build", "--input", str(inputs / "in"), "--output", output, "--executor", "local", "--caption-model",
            "none", "--keep-captions", "--min-size", "64", "--resolution", "64", "--samples-per-shard", "2",
            "--preview", "0", "--report-samples", "4"]


@pytest.fixture(scope="module")
def s3_build(s3, inputs):
    """Built to S3 by a process killed with SIGKILL after a few shards, then resumed here."""
    from pipeline.cli import main

    url = f"s3://{BUCKET}/build"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *build_args(inputs, url)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    markers = []
    while time.time() < deadline and len(markers) < 3 and proc.poll() is None:
        s3.invalidate_cache()
        markers = s3.glob(f"{BUCKET}/build/shards/*_stats.json")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    s3.invalidate_cache()
    assert 0 < len(s3.glob(f"{BUCKET}/build/shards/*_stats.json")) < 12, "killed mid-build"
    assert s3.exists(f"{BUCKET}/build/.controlforge.lock"), "the killed build's lock is left behind"
    assert main(build_args(inputs, url)) == 0, "resumed (the dead holder's lock taken over)"
    return url


def test_a_killed_build_on_s3_resumes_to_the_uninterrupted_result(s3, s3_build, inputs, tmp_path):
    from pipeline.cli import main
    from pipeline.verify import verify

    assert main(build_args(inputs, str(tmp_path / "local"))) == 0
    s3.invalidate_cache()
    remote = sorted(s3.glob(f"{BUCKET}/build/shards/*.tar"))
    local = sorted((tmp_path / "local" / "shards").glob("*.tar"))
    assert [Path(p).name for p in remote] == [p.name for p in local] and len(local) == 12
    assert all(s3.cat_file(r) == p.read_bytes() for r, p in zip(remote, local)), "byte-identical shards"
    manifest = json.loads(s3.cat_file(f"{BUCKET}/build/manifest.json"))
    assert manifest["complete"] and manifest["samples"] == 24
    assert not s3.exists(f"{BUCKET}/build/.controlforge.lock"), "released at the end"
    assert s3.exists(f"{BUCKET}/build/report.html")
    assert verify(s3_build, log=lambda *_: None) == 0


def test_publish_from_s3(s3_build, tmp_path):
    from pipeline.publish import publish

    target = publish(s3_build, to=str(tmp_path / "pub"), val_fraction=0.0, log=lambda *_: None)
    card = (target / "README.md").read_text()
    assert "| train | 24 |" in card and "- input: sidecar .txt files: 24 samples" in card


def test_training_streams_its_shards_from_s3(s3_build, tmp_path):
    from tiny_models import make_tiny_sd
    from train.config import TrainConfig
    from train.data import expand_shards
    from train.trainer import train

    assert len(expand_shards([s3_build])) == 12 and expand_shards([s3_build])[0].startswith("s3://")
    cfg = TrainConfig(shards=[s3_build], pretrained_model=str(make_tiny_sd(tmp_path / "sd")),
                      output_dir=str(tmp_path / "run"), resolution=64, train_batch_size=2, max_train_steps=2,
                      checkpointing_steps=100, validation_steps=100, num_validation_images=0,
                      dataloader_num_workers=0, shuffle_buffer=4, report_to="none")
    assert train(cfg, log=lambda *_: None)["global_step"] == 2


def test_a_fresh_listing_after_another_process_wrote(s3):
    """The crash: a listing cached before another writer's marker appeared."""
    import s3fs

    from stages.shards import manifest as index
    from stages.shards.output import Output

    out = Output(f"s3://{BUCKET}/stale")
    other = s3fs.S3FileSystem(skip_instance_cache=True)
    other.pipe_file(f"{BUCKET}/stale/shards/00000.tar", b"x")
    other.pipe_file(f"{BUCKET}/stale/shards/00000_stats.json", json.dumps({"shard": "00000"}).encode())
    assert index.completed_shards(out) == {"00000"}  # this listing is now cached by s3fs
    other.pipe_file(f"{BUCKET}/stale/shards/00001.tar", b"x")
    other.pipe_file(f"{BUCKET}/stale/shards/00001_stats.json", json.dumps({"shard": "00001"}).encode())
    assert index.completed_shards(out) == {"00000", "00001"}
    assert index.load_stats(out, "00001") == {"shard": "00001"}


def test_the_output_lock_on_s3(s3):
    from stages.shards.lock import BuildLock, LockedError
    from stages.shards.output import Output

    out = Output(f"s3://{BUCKET}/locked")
    first = BuildLock(out).acquire()
    try:
        with pytest.raises(LockedError, match="being built by another run"):
            BuildLock(Output(f"s3://{BUCKET}/locked")).acquire()
    finally:
        first.release()
    BuildLock(out).acquire().release()
