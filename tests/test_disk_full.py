"""A full disk (ENOSPC, EDQUOT) is a clear stop (issue 23): `controlforge build` prints one
line (the path, the free space there, the shards done, "rerun the same command to
resume"), exits 3 (common.disk_full.DISK_FULL_EXIT), and shows no traceback unless
--debug; nothing under a final name is half written, and the rerun after space is freed
finishes byte-identical to an uninterrupted build.

The disk fills three ways: a patched `open` in stages/shards/output.py (the one place
output files are opened; its writes fail like a full disk's), a real tmpfs a few shards
big (needs root: CI and this machine run the tests as root; a failed mount fails the
test, it is not skipped), and on Ray a real RayTaskError from a worker.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_synthetic
from pipeline.build import main
from pipeline.verify import verify

REPO = Path(__file__).resolve().parent.parent
RERUN = "rerun the same command to resume"


def _load_digest():
    spec = importlib.util.spec_from_file_location("output_digest", REPO / "bench" / "output_digest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.digest  # each tar hashed whole; json without timing, version and path fields


digest = _load_digest()


def build_args(inputs: Path, out: Path, *extra: str, executor: str = "local") -> list[str]:
    return ["--input", str(inputs), "--output", str(out), "--executor", executor, "--caption-model", "none",
            "--min-size", "64", "--samples-per-shard", "2", "--preview", "0", "--report-samples", "0", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """16 inputs -> 8 shards of 2, built without a fault: (inputs, output)."""
    root = tmp_path_factory.mktemp("disk-full-ref")
    write_synthetic(root / "in", 16)
    assert main(build_args(root / "in", root / "out")) == 0
    return root / "in", root / "out"


def assert_nothing_half_named(out: Path, reference: Path) -> int:
    """No temporaries; every tar under its final name is whole (the reference's bytes); every
    completion marker has its tar; a verify of the stopped build is clean. Returns the
    number of finished shards (completion markers)."""
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "a temporary was left behind"
    assert not (out / ".controlforge.lock").exists(), "the lock is released"
    for tar in (out / "shards").glob("*.tar"):
        assert tar.read_bytes() == (reference / "shards" / tar.name).read_bytes(), f"{tar.name} is not whole"
    markers = sorted((out / "shards").glob("*_stats.json"))
    for marker in markers:
        assert (out / "shards" / marker.name.replace("_stats.json", ".tar")).exists()
        json.loads(marker.read_text())  # whole json
    json.loads((out / "manifest.json").read_text())
    assert verify(str(out), log=lambda *_: None) == 0
    return len(markers)


def assert_one_line(err: str, out: Path, done: int | None, planned: int | None = 8) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    ours = [line for line in lines if "disk full" in line]
    assert len(ours) == 1, err
    line = ours[0]
    assert "Traceback" not in err and "During handling" not in err, err
    assert str(out.resolve()) in line, line
    assert " free" in line and any(unit in line for unit in ("bytes", "KiB", "MiB", "GiB", "TiB")), line
    if done is not None:
        assert (f"{done} of {planned} shards done" if planned else f"{done} shards done") in line, line
    assert RERUN in line, line
    return line


def assert_same_as(out: Path, reference: Path, executor: str = "local") -> None:
    """verify is clean and the output is the reference's: the same tar bytes, the same json
    minus timing, version and path fields (and the executor the manifest records)."""
    assert verify(str(out), log=lambda *_: None) == 0
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    found, expected = digest(out), digest(reference)
    if executor != "local":
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["config"]["executor"] == executor
        found.pop("manifest.json")
        expected.pop("manifest.json")
        ref_manifest = json.loads((reference / "manifest.json").read_text())
        for m in (manifest, ref_manifest):
            for k in ("versions", "config"):
                m.pop(k)
        assert manifest == ref_manifest
    assert found == expected, {k: (found.get(k), expected.get(k)) for k in set(found) | set(expected)
                               if found.get(k) != expected.get(k)}


# -- the message and the cause chain -------------------------------------------------------------------------------

def test_find_disk_full_walks_the_cause_chain():
    from common.disk_full import DISK_FULL_EXIT, find_disk_full

    assert DISK_FULL_EXIT == 3
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert find_disk_full(full) is full
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/q/file")
    assert find_disk_full(quota) is quota
    assert find_disk_full(OSError(errno.EACCES, "Permission denied")) is None
    assert find_disk_full(ValueError("nothing here")) is None
    assert find_disk_full(None) is None

    try:  # what a full disk gives today: the close's OSError while handling the write's
        try:
            raise full
        except OSError:
            raise RuntimeError("close failed too")
    except RuntimeError as exc:
        assert find_disk_full(exc) is full
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = quota
    assert find_disk_full(wrapped) is quota

    class Wrapper(Exception):  # Ray's RayTaskError keeps the worker's exception as `.cause`
        def __init__(self, cause):
            super().__init__("a task failed")
            self.cause = cause

    assert find_disk_full(Wrapper(Wrapper(full))) is full

    text = RuntimeError("ray::Map()\n  File \"w.py\", line 3\nOSError: [Errno 28] No space left on device: "
                        "'/data/out/shards/00003.tar.tmp-1a2b3c4d'\n")  # the cause lost, its text kept
    found = find_disk_full(text)
    assert found is not None and found.errno == errno.ENOSPC
    assert found.filename == "/data/out/shards/00003.tar.tmp-1a2b3c4d"
    found = find_disk_full(RuntimeError(f"OSError: [Errno {errno.EDQUOT}] Disk quota exceeded"))
    assert found is not None and found.errno == errno.EDQUOT

    loop = RuntimeError("a")
    loop.__context__ = RuntimeError("b")
    loop.__context__.__context__ = loop
    assert find_disk_full(loop) is None  # a cycle ends


def test_disk_full_message_names_the_path_free_space_and_what_to_do(tmp_path):
    import shutil

    from common.disk_full import disk_full_message, full_path, human_bytes

    assert human_bytes(512) == "512 bytes" and human_bytes(3 * 1024 ** 2 + 512 * 1024) == "3.5 MiB"
    line = disk_full_message(tmp_path, "3 of 8 shards done")
    assert "\n" not in line and str(tmp_path) in line and "3 of 8 shards done" in line and RERUN in line
    assert f"{human_bytes(shutil.disk_usage(tmp_path).free)[:1]}" in line and " free" in line
    gone = tmp_path / "not" / "yet" / "made.tar.tmp-0"  # the free space of the nearest folder that exists
    assert " free" in disk_full_message(gone, "0 shards done")
    quota = disk_full_message(tmp_path, "1 step done", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert "quota" in quota.lower()

    named = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.tmp"))
    assert full_path(named, [REPO]) == str(tmp_path / "x.tmp"), "the file the error names"
    assert full_path(OSError(errno.ENOSPC, "No space"), [tmp_path, REPO]) == str(tmp_path), "same disk: the first"


# -- a full disk in this process (executor local): the writes of one shard fail ---------------------------------------

class FullDisk:
    """`open` for stages/shards/output.py: after `shards_fit` shard tars, the disk is full for
    every file written (`what`: the tar, or its stats, the completion marker), the way a real
    full disk fails: some bytes land in the temporary, then write() raises ENOSPC."""

    def __init__(self, shards_fit: int, what: str):
        self.shards_fit, self.what, self.tars = shards_fit, what, 0

    def open(self, path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)
        name = os.path.basename(str(path))
        if ".tar.tmp-" in name:
            self.tars += 1
        if self.full(name) and any(c in mode for c in "wa"):
            return _Filling(handle)
        return handle

    def full(self, name: str) -> bool:
        if self.what == "tar":
            return self.tars > self.shards_fit
        return self.tars > self.shards_fit + 1 or (self.tars == self.shards_fit + 1 and "_stats.json" in name)


class _Filling:
    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        self.handle.write(bytes(data)[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


@pytest.mark.parametrize("what", ["tar", "stats"])
def test_a_full_disk_stops_the_build_with_one_line_and_the_rerun_resumes(tmp_path, capsys, monkeypatch, reference,
                                                                          what):
    import stages.shards.output as output_module

    inputs, ref_out = reference
    out = tmp_path / "out"
    monkeypatch.setattr(output_module, "open", FullDisk(3, what).open, raising=False)
    code = main(build_args(inputs, out))
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert_one_line(captured.err, out, done=3)
    assert captured.err.strip().count("\n") == 0, "stderr is that one line"
    assert assert_nothing_half_named(out, ref_out) == 3

    monkeypatch.undo()  # space freed: the same command again
    assert main(build_args(inputs, out)) == 0
    assert "3 already done" in capsys.readouterr().out
    assert_same_as(out, ref_out)


def test_debug_shows_the_traceback_too(tmp_path, capsys, monkeypatch, reference):
    import stages.shards.output as output_module

    inputs, ref_out = reference
    monkeypatch.setattr(output_module, "open", FullDisk(1, "tar").open, raising=False)
    code = main(build_args(inputs, tmp_path / "out", "--debug"))
    err = capsys.readouterr().err
    assert code == 3
    assert "Traceback" in err and "No space left on device" in err
    last = err.strip().splitlines()[-1]
    assert "disk full" in last and "1 of 8 shards done" in last and RERUN in last


# -- a real full disk: a tmpfs a few shards big ---------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(folder: Path, size: int):
    """A tmpfs of `size` bytes mounted on folder, unmounted at the end. Needs root (CI and
    this machine run the tests as root): anything else fails here, loudly."""
    assert os.geteuid() == 0, "mounting a tmpfs needs root; the patched tests above check the same without one"
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"could not mount a tmpfs on {folder}: {done.stderr.strip()}"
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def resize(folder: Path, size: str) -> None:
    done = subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def room_for(reference: Path, shards: float) -> int:
    """Bytes of tmpfs (whole pages) that hold the lock, the manifest and `shards` shards."""
    page = os.sysconf("SC_PAGE_SIZE")

    def pages(n: int) -> int:
        return -(-n // page) * page

    tar = pages((reference / "shards" / "00000.tar").stat().st_size)
    stats = pages((reference / "shards" / "00000_stats.json").stat().st_size)
    return pages(1) + pages((reference / "manifest.json").stat().st_size) + int(shards * (tar + stats))


def test_a_real_full_tmpfs_stops_the_cli_with_one_line_and_resumes_once_space_is_freed(tmp_path, reference):
    inputs, ref_out = reference
    with tmpfs(tmp_path / "disk", room_for(ref_out, 3.5)) as disk:
        out = disk / "out"
        command = [sys.executable, "-m", "pipeline.cli", "build", *build_args(inputs, out)]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 3, proc.stderr
        done = assert_nothing_half_named(out, ref_out)
        assert 1 <= done < 8
        line = assert_one_line(proc.stderr, out, done=done)
        assert proc.stderr.strip() == line, "stderr is that one line"

        resize(disk, "64m")  # space freed
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert f"{done} already done" in proc.stdout
        assert_same_as(out, ref_out)


# -- on Ray: the worker's OSError comes back wrapped --------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_errors(ray_session):
    """Real errors from a Ray task and from a Ray Data map whose function hit ENOSPC."""
    ray = ray_session

    def _raise_disk_full(*_):  # defined here: pickled by value, workers cannot import this module
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    found = {}
    try:
        ray.get(ray.remote(_raise_disk_full).remote())
    except Exception as exc:
        found["task"] = exc
    try:
        for _ in ray.data.from_items([{"a": 1}]).map(_raise_disk_full).iter_rows():
            pass
    except Exception as exc:
        found["data"] = exc
    assert set(found) == {"task", "data"}, found
    return found


def test_find_disk_full_in_real_ray_errors(ray_errors):
    from common.disk_full import find_disk_full

    for kind, exc in ray_errors.items():
        assert type(exc).__module__.startswith("ray"), type(exc)
        found = find_disk_full(exc)
        assert found is not None and found.errno == errno.ENOSPC, (kind, exc)


@pytest.mark.parametrize("kind", ["task", "data"])
def test_the_cli_turns_a_disk_full_ray_error_into_the_one_line(tmp_path, capsys, monkeypatch, reference, ray_errors,
                                                               kind):
    import pipeline.build as build

    def fail(*_, **__):
        raise ray_errors[kind]
        yield  # a generator, like run_ray_windows

    inputs, _ = reference
    out = tmp_path / "out"
    monkeypatch.setattr(build, "run_ray_windows", fail)
    code = build.main(build_args(inputs, out, executor="ray"))
    err = capsys.readouterr().err
    assert code == 3, err
    assert_one_line(err, out, done=0)


def test_a_real_full_tmpfs_on_the_ray_executor(tmp_path, capfd, reference, ray_session):
    inputs, ref_out = reference
    with tmpfs(tmp_path / "disk", room_for(ref_out, 3.5)) as disk:
        out = disk / "out"
        # two shard tasks at a time, whatever the machine: more writers at once than the disk
        # has room for shards could fill it before any shard is whole
        per_task = max(1.0, float(ray_session.cluster_resources().get("CPU", 2)) / 2)
        args = build_args(inputs, out, "--num-cpus", str(per_task), executor="ray")
        code = main(args)
        err = capfd.readouterr().err
        assert code == 3, err
        line = assert_one_line(err, out, done=None)
        assert "of 8 shards done" in line
        assert 1 <= assert_nothing_half_named(out, ref_out) < 8

        resize(disk, "64m")
        assert main(args) == 0
        assert_same_as(out, ref_out, executor="ray")
