"""A build's shards load in place, without copying, through the four usual loaders,
locally and over http (a loopback server)."""

from __future__ import annotations

import json

import pytest

from conftest import write_synthetic
from http_server import serve
from pipeline.build import run_build
from pipeline.config import BuildConfig


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    write_synthetic(root / "in", 5)
    out = root / "out"
    run_build(BuildConfig(input=[str(root / "in")], output=str(out), caption_model="none", min_size=64,
                          samples_per_shard=3, executor="local", preview=0), log=lambda *_: None)
    keys = set()
    for entry in json.loads((out / "manifest.json").read_text())["shards"]:
        import tarfile

        with tarfile.open(out / entry["name"]) as tar:
            keys |= {n.split(".")[0] for n in tar.getnames()}
    return out, keys


@pytest.fixture(scope="module")
def served(build):
    out, keys = build
    with serve(out) as base:
        yield base, keys


def test_webdataset_over_http(served):
    import webdataset as wds

    base, keys = served
    rows = list(wds.WebDataset(f"{base}/shards/{{00000..00001}}.tar", shardshuffle=False).decode("pil"))
    assert {r["__key__"] for r in rows} == keys and rows[0]["canny.png"].size == rows[0]["jpg"].size


def test_wids_random_access_with_the_generated_index(build, served, tmp_path):
    import wids

    out, keys = build
    base, _ = served
    local = wids.ShardListDataset(str(out / "wids-index.json"), cache_dir=str(tmp_path / "c1"))
    assert len(local) == len(keys)
    assert local[len(keys) - 1]["__key__"] in keys and local[0][".txt"] is not None
    remote = wids.ShardListDataset(f"{base}/wids-index.json", cache_dir=str(tmp_path / "c2"))
    assert {remote[i]["__key__"] for i in range(len(remote))} == keys


def test_datasets_streaming_over_http(served):
    import datasets

    base, keys = served
    stream = datasets.load_dataset("webdataset", data_files={"train": [f"{base}/shards/00000.tar",
                                                                       f"{base}/shards/00001.tar"]},
                                   split="train", streaming=True)
    rows = list(stream)
    assert {r["__key__"] for r in rows} == keys and rows[0]["canny.png"].mode == "L"


def test_ray_data_read_webdataset_over_http(served, ray_session):
    from fsspec.implementations.http import HTTPFileSystem
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    base, keys = served
    rows = ray_session.data.read_webdataset(
        [f"{base}/shards/00000.tar", f"{base}/shards/00001.tar"],
        filesystem=PyFileSystem(FSSpecHandler(HTTPFileSystem()))).take_all()
    assert {r["__key__"] for r in rows} == keys
