"""Streamed listing: a URL list is read in batches and handed to the stages as it is
read, in file order; a resume skips finished shards by their markers without holding
the list; a changed list is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_synthetic
from stages.read.listing import is_streamed, open_listing


def test_only_a_single_list_file_is_streamed():
    assert is_streamed(["urls.txt"]) and is_streamed(["s3://b/list.parquet"]) and is_streamed(["x.tsv"])
    assert not is_streamed(["photos/"]) and not is_streamed(["a.txt", "b.txt"]) and not is_streamed(["d/{0..3}.tar"])


@pytest.mark.parametrize("fmt", ["txt", "csv", "tsv", "parquet", "jsonl"])
def test_rows_come_in_file_order_shard_by_shard_without_reading_ahead(tmp_path, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"http://example.invalid/{i:05d}.jpg" for i in range(250)][::-1]  # not sorted: file order counts
    path = tmp_path / f"list.{fmt}"
    if fmt == "txt":
        path.write_text("# a comment\n" + "\n".join(f"{u}\tcaption {i}" for i, u in enumerate(urls)) + "\n")
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text(f"url{sep}caption\n" + "".join(f"{u}{sep}caption {i}\n" for i, u in enumerate(urls)))
    elif fmt == "parquet":
        pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(250)]}), path, row_group_size=64)
    else:
        path.write_text("".join(json.dumps({"url": u, "caption": f"caption {i}"}) + "\n" for i, u in enumerate(urls)))
    listing = open_listing([str(path)], "url", "caption", samples_per_shard=100, peek=10)
    assert listing.streamed and listing.read == 0 and len(listing.first) == 10, "only a peek before work starts"
    works = iter(listing.works)
    first = next(works)
    assert [r.source for r in first.inputs] == urls[:100] and listing.read == 100 and listing.planned == ["00000"]
    assert first.inputs[3].caption == "caption 3"
    rest = list(works)
    assert [len(w.inputs) for w in rest] == [100, 50] and listing.count == 250


def test_a_streamed_build_resumes_by_markers_and_refuses_a_changed_list(tmp_path):
    from pipeline.build import BuildError, run_build
    from pipeline.config import BuildConfig

    paths = write_synthetic(tmp_path / "in", 9)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in reversed(paths)) + "\n")

    def cfg(**kw):
        return BuildConfig(input=[str(listing)], output=str(tmp_path / "out"), resolution=64, min_size=64,
                           caption_model="none", executor="local", samples_per_shard=4, preview=0, report_samples=0,
                           **kw)

    run_build(cfg(), log=lambda *_: None)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"] == 9 and manifest["samples"] == 9 and len(manifest["shards"]) == 3
    first_shard = json.loads((tmp_path / "out" / "shards" / "00000_stats.json").read_text())
    assert {Path(s).name for s in first_shard["sources"]} == {p.name for p in paths[-4:]}, \
        "shard 0 holds the list's first rows"
    (tmp_path / "out" / "shards" / "00001.tar").unlink()
    (tmp_path / "out" / "shards" / "00001_stats.json").unlink()
    logs: list[str] = []
    run_build(cfg(), log=logs.append)
    assert any("(2 shards already done)" in line for line in logs)
    assert [line for line in logs if line.startswith("  shard")] == ["  shard 00001: 4 samples, 0 rejected [3]"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["samples"] == 9
    listing.write_text(listing.read_text() + f"{paths[0]}\n")
    with pytest.raises(BuildError, match="inputs changed"):
        run_build(cfg(), log=lambda *_: None)
