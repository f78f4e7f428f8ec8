"""`controlforge publish`: a build as a Hugging Face dataset with diffusers' columns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import write_real_photos
from pipeline.build import run_build
from pipeline.config import BuildConfig
from pipeline.publish import PublishError, publish


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("pub")
    write_real_photos(root / "in", ["astronaut", "chelsea", "coffee", "rocket"], captions=True)
    (root / "in" / "broken.jpg").write_bytes(b"not a jpeg")
    out = root / "out"
    run_build(BuildConfig(input=[str(root / "in")], output=str(out), conditions=["canny", "mlsd"],
                          annotator_params={"mlsd": {"method": "hough"}}, caption_model="none", min_size=64,
                          samples_per_shard=2, executor="local", preview=4), log=lambda *_: None)
    return out


def test_publish_to_a_folder_loads_with_diffusers_columns(build, tmp_path):
    import datasets

    target = publish(str(build), to=str(tmp_path / "hf"), val_fraction=0.3, seed=1, log=lambda *_: None)
    card = (target / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert [c["config_name"] for c in meta["configs"]] == ["canny", "mlsd"]
    assert meta["configs"][0].get("default") is True and meta["license"] == "other"
    manifest = json.loads((build / "manifest.json").read_text())
    loaded = datasets.load_dataset(str(target), "canny")
    assert sum(len(split) for split in loaded.values()) == manifest["samples"] == 4
    assert set(loaded) == {"train", "validation"}, "0.3 of 4 samples lands some in validation"
    train = loaded["train"]
    assert {"image", "conditioning_image", "text", "mlsd", "key", "source", "metadata"} <= set(train.column_names)
    for row in train:
        stem = row["source"].rsplit("/", 1)[1][:-4]
        assert row["text"] == f"a photo called {stem}"
        assert row["image"].size == row["conditioning_image"].size == (512, 512)
        assert row["conditioning_image"].mode == "L"
        assert json.loads(row["metadata"])["conditions"]["canny"]["params"]["seed"] > 0
    mlsd = datasets.load_dataset(str(target), "mlsd", split="train")
    first_canny, first_mlsd = train.sort("key")[0], mlsd.sort("key")[0]
    assert np.array_equal(np.asarray(first_mlsd["conditioning_image"]), np.asarray(first_canny["mlsd"]))
    assert f"| train | {len(train)} |" in card and "| not_an_image | 1 |" in card
    assert (target / "preview.png").exists() and "![preview](preview.png)" in card


def test_push_commits_in_batches_retries_resumes_and_never_writes_the_token(build, tmp_path, monkeypatch):
    """Everything up to the upload call: a local Hub server is out of reach here, so
    HfApi's calls are recorded instead of sent (and the first upload fails once)."""
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_secret_sentinel_token")
    monkeypatch.setattr("time.sleep", lambda s: None)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo_id, **kw: ["canny/train-00000.parquet"])

    def upload_folder(self, **kw):
        calls.append(("upload", kw))
        if len([c for c in calls if c[0] == "upload"]) == 1:
            raise OSError("connection reset")

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    from pipeline.publish import push

    target = publish(str(build), to=str(tmp_path / "export"), log=lambda *_: None)
    push(target, "someone/cf-test", files_per_commit=3, log=lambda *_: None)
    assert calls[0] == ("create", "someone/cf-test", {"repo_type": "dataset", "private": False, "exist_ok": True})
    uploads = [c[1] for c in calls if c[0] == "upload"]
    assert uploads[0]["allow_patterns"] == uploads[1]["allow_patterns"], "the failed commit was retried"
    sent = [f for u in uploads[1:] for f in u["allow_patterns"]]
    assert all(len(u["allow_patterns"]) <= 3 for u in uploads)
    assert "canny/train-00000.parquet" not in sent, "files already in the repo are skipped (resume)"
    expected = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert sorted(sent) == [f for f in expected if f != "canny/train-00000.parquet"]
    for path in target.rglob("*"):
        if path.is_file():
            assert b"hf_secret_sentinel_token" not in path.read_bytes()


def test_publish_errors_are_clear(build, tmp_path):
    with pytest.raises(PublishError, match="--to DIR"):
        publish(str(build))
    with pytest.raises(PublishError, match="not in this build"):
        publish(str(build), to=str(tmp_path / "x"), condition="depth", log=lambda *_: None)
    with pytest.raises(PublishError, match="no manifest"):
        publish(str(tmp_path), to=str(tmp_path / "y"))


def test_export_on_ray_writes_the_same_files(build, tmp_path, ray_session):
    local = publish(str(build), to=str(tmp_path / "local"), val_fraction=0.3, seed=1, log=lambda *_: None)
    parallel = publish(str(build), to=str(tmp_path / "ray"), val_fraction=0.3, seed=1, use_ray=True,
                       log=lambda *_: None)
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.parquet"))
    assert names and names == sorted(p.relative_to(parallel).as_posix() for p in parallel.rglob("*.parquet"))
    for name in names:
        assert (local / name).read_bytes() == (parallel / name).read_bytes()
    assert (local / "README.md").read_text() == (parallel / "README.md").read_text()
