"""Readers list every kind of input the issue names, and fetch bytes plus what the input carries."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_real_photos, write_synthetic
from http_server import serve
from stages.read.readers import InputError, fetch, list_inputs


def test_folder_is_recursive_sorted_with_sidecar_captions(tmp_path):
    write_real_photos(tmp_path / "a", ["chelsea"], captions=True)
    write_synthetic(tmp_path / "b" / "deeper", 2)
    (tmp_path / "notes.md").write_text("not an image")
    refs = list_inputs([str(tmp_path)])
    assert [r.source for r in refs] == sorted(r.source for r in refs)
    assert len(refs) == 3
    captions = {r.source.rsplit("/", 1)[1]: r.caption for r in refs}
    assert captions == {"chelsea.jpg": "a photo called chelsea", "synth_0000.jpg": None, "synth_0001.jpg": None}


def test_glob_keeps_sidecar_captions(tmp_path):
    write_real_photos(tmp_path / "x", ["coffee", "rocket"], captions=True)
    refs = list_inputs([str(tmp_path / "**" / "*.jpg")])
    assert [r.caption for r in refs] == ["a photo called coffee", "a photo called rocket"]


def test_txt_and_parquet_lists_over_http(tmp_path):
    paths = write_synthetic(tmp_path / "web", 3)
    with serve(tmp_path / "web") as base:
        urls = [f"{base}/{p.name}" for p in paths]
        (tmp_path / "list.txt").write_text(f"# comment\n{urls[0]}\tfirst caption\n{urls[1]}\n\n")
        pq.write_table(pa.table({"url": urls, "caption": ["c0", None, "c2"]}), tmp_path / "list.parquet")
        from_txt = list_inputs([str(tmp_path / "list.txt")])
        from_pq = list_inputs([str(tmp_path / "list.parquet")])
        assert [(r.source, r.caption) for r in from_txt] == [(urls[0], "first caption"), (urls[1], None)]
        assert [r.caption for r in from_pq] == ["c0", None, "c2"]
        assert fetch(from_pq[2]).data == paths[2].read_bytes()


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_img2dataset_tar_keeps_caption_and_fields(tmp_path):
    photo = write_real_photos(tmp_path / "p", ["astronaut"])[0].read_bytes()
    meta = {"url": "http://example.invalid/a.jpg", "status": "success", "sha256": hashlib.sha256(photo).hexdigest()}
    _tar(tmp_path / "00000.tar", [("000000001.jpg", photo), ("000000001.txt", b"an astronaut"),
                                  ("000000001.json", json.dumps(meta).encode()), ("000000002.txt", b"orphan caption")])
    refs = list_inputs([str(tmp_path / "{00000..00000}.tar")])
    assert len(refs) == 1
    got = fetch(refs[0])
    assert got.data == photo and got.caption == "an astronaut" and got.meta["url"] == meta["url"]


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    photos = write_real_photos(tmp_path / "p", ["chelsea", "coffee"])
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in photos], "text": ["cat", "coffee"]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    refs = list_inputs([str(tmp_path / "hf")])
    assert len(refs) == 2
    got = fetch(refs[1], image_column="image", caption_column="text")
    assert got.data == photos[1].read_bytes() and got.caption == "coffee"


def test_missing_or_empty_inputs_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        list_inputs([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        list_inputs([str(tmp_path / "empty")])
    pq.write_table(pa.table({"link": ["x"]}), tmp_path / "l.parquet")
    with pytest.raises(InputError, match="no column 'url'"):
        list_inputs([str(tmp_path / "l.parquet")])
