"""`controlforge verify` passes good builds and names shard, key and problem on broken ones."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_synthetic
from pipeline.build import run_build
from pipeline.config import BuildConfig
from pipeline.verify import verify


@pytest.fixture
def good_build(tmp_path) -> Path:
    write_synthetic(tmp_path / "in", 6)
    out = tmp_path / "out"
    run_build(BuildConfig(input=[str(tmp_path / "in")], output=str(out), caption_model="none", min_size=64,
                          samples_per_shard=3, executor="local", preview=0), log=lambda *_: None)
    return out


def run_verify(out, repair=False) -> tuple[int, str]:
    lines: list[str] = []
    code = verify(str(out), repair=repair, log=lines.append)
    return code, "\n".join(lines)


def rewrite_tar(path: Path, edit) -> None:
    """Rebuild a shard with `edit(members) -> members` applied to its (name, bytes) list."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in edit(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def first_key(path: Path) -> str:
    with tarfile.open(path) as tar:
        return tar.getnames()[0].split(".")[0]


def test_good_build_passes(good_build):
    code, text = run_verify(good_build)
    assert code == 0 and "2 shards, 6 samples checked: all good" in text


def test_truncated_tar(good_build):
    shard = good_build / "shards" / "00001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    code, text = run_verify(good_build)
    assert code == 1 and "FAIL shards/00001.tar: " in text and "truncated" in text


def test_flipped_byte(good_build):
    shard = good_build / "shards" / "00000.tar"
    data = bytearray(shard.read_bytes())
    data[3000] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, text = run_verify(good_build)
    assert code == 1 and "shards/00000.tar: sha256 differs from the manifest" in text


def test_sample_missing_a_condition(good_build):
    shard = good_build / "shards" / "00000.tar"
    key = first_key(shard)
    rewrite_tar(shard, lambda ms: [(n, d) for n, d in ms if n != f"{key}.canny.png"])
    code, text = run_verify(good_build)
    assert code == 1 and f"shards/00000.tar: key {key}: missing canny.png" in text


def test_duplicate_key_across_shards(good_build):
    key = first_key(good_build / "shards" / "00000.tar")
    with tarfile.open(good_build / "shards" / "00000.tar") as tar:
        copy = [(m.name, tar.extractfile(m).read()) for m in tar if m.name.startswith(key)]
    rewrite_tar(good_build / "shards" / "00001.tar", lambda ms: copy + ms)
    code, text = run_verify(good_build)
    assert code == 1 and f"shards/00001.tar: key {key}: also in shards/00000.tar" in text


def test_condition_of_the_wrong_size(good_build):
    shard = good_build / "shards" / "00001.tar"
    key = first_key(shard)
    buf = io.BytesIO()
    Image.new("L", (100, 80)).save(buf, "PNG")
    rewrite_tar(shard, lambda ms: [(n, buf.getvalue() if n == f"{key}.canny.png" else d) for n, d in ms])
    code, text = run_verify(good_build)
    assert code == 1 and f"key {key}: canny.png is 100x80, image is 512x512" in text


def test_repair_then_rebuild_gives_a_good_build(good_build, tmp_path):
    shard = good_build / "shards" / "00001.tar"
    original = shard.read_bytes()
    shard.write_bytes(original[:4000])
    code, text = run_verify(good_build, repair=True)
    assert code == 1 and "1 shard(s) to rebuild" in text and "shards/00001.tar" in text
    manifest = json.loads((good_build / "manifest.json").read_text())
    assert [e["name"] for e in manifest["shards"]] == ["shards/00000.tar"]
    run_build(BuildConfig(**manifest["config"]), log=lambda *_: None)
    assert shard.read_bytes() == original
    assert run_verify(good_build)[0] == 0


def test_builds_to_fsspec_urls_pass_verify(tmp_path):
    write_synthetic(tmp_path / "in", 4)
    for url in ("memory://cf-test/build", f"file://{tmp_path}/file-url-build"):
        run_build(BuildConfig(input=[str(tmp_path / "in")], output=url, caption_model="none", min_size=64,
                              samples_per_shard=2, executor="local", preview=2), log=lambda *_: None)
        code, text = run_verify(url)
        assert code == 0 and "4 samples checked: all good" in text, text
    import fsspec

    fs = fsspec.filesystem("memory")
    assert not [p for p in fs.find("/cf-test") if ".tmp-" in p], "no temporaries left in the object store"
    assert fs.exists("/cf-test/build/preview.png") and fs.exists("/cf-test/build/shards/00001_stats.json")


def test_verify_reads_the_completion_markers_of_an_unfinished_build(good_build):
    manifest_path = good_build / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "shards": [], "complete": False}))  # as if killed mid-build
    code, text = run_verify(good_build)
    assert code == 0 and "2 shards, 6 samples checked: all good" in text
    (good_build / "shards" / "00001_stats.json").unlink()  # no marker: not finished, not checked
    code, text = run_verify(good_build)
    assert "1 shards, 3 samples checked" in text
