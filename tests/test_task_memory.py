"""Bounded task memory: condition maps go from the annotator to a local spool one
sample at a time; what crosses between tasks is the shard's JPEGs, never its maps.

These tests count bytes (pickled sizes, tracemalloc's traced peak), not time; the
figures with 1 and 9 conditions are in bench/task_memory.py."""

from __future__ import annotations

import io
import pickle
import tarfile
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from conftest import write_synthetic


def _noise_inputs(folder, count: int, size: int = 256) -> None:
    """Noise pictures: dense canny edges, so every condition map is a large PNG."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"n{i:03d}.png")


def _writer_peak(tmp_path, count: int) -> tuple[int, dict]:
    """tracemalloc's traced peak while the writer task annotates and writes `count` samples."""
    from pipeline.config import BuildConfig
    from stages.read.readers import list_inputs
    from stages.work import plan_shards
    from pipeline.plan import make_steps

    _noise_inputs(tmp_path / f"in{count}", count)
    cfg = BuildConfig(input=[str(tmp_path / f"in{count}")], output=str(tmp_path / f"out{count}"),
                      conditions=["canny"], resolution=256, min_size=64, caption_model="none")
    read, write = make_steps(cfg)
    work = read(plan_shards(list_inputs(cfg.input), 100)[0])
    assert len(work.samples) == count and all(not s.conditions for s in work.samples)
    tracemalloc.start()
    try:
        stats = write(work)
        return tracemalloc.get_traced_memory()[1], stats
    finally:
        tracemalloc.stop()


def test_writer_peak_does_not_grow_with_shard_size(tmp_path):
    """AnnotateAndWrite annotates each sample and spools it before the next, and streams the
    tar from the spool: its traced peak is one sample's working set, the same for 6 and
    for 24 samples. (Holding the maps and building the tar in memory, as the writer did
    before, grows with the shard: 24 noise samples are over 2 MB of JPEGs and maps.)"""
    small, _ = _writer_peak(tmp_path, 6)
    large, stats = _writer_peak(tmp_path, 24)
    assert stats["samples"] == 24 and stats["bytes"] > 2_000_000
    assert large < 1.3 * small, f"traced peak {small} B for 6 samples, {large} B for 24: it grows with the shard"
    assert large < stats["bytes"] / 4


@pytest.mark.parametrize("annotator_gpus", [0.0, 0.5])
def test_conditions_never_cross_a_task_boundary(tmp_path, tiny_blip, annotator_gpus):
    """With an actor step in the plan (the captioner), the shard that crosses to it and
    back carries JPEGs and captions only; the maps appear in the writer task, which with
    GPUs is the actor holding the network annotators (mlsd here; run on this CPU)."""
    from pipeline.config import BuildConfig
    from pipeline.executors import _group, run_steps
    from stages.read.readers import list_inputs
    from stages.work import plan_shards
    from pipeline.plan import Placement, make_steps

    write_synthetic(tmp_path / "in", 4)
    cfg = BuildConfig(input=[str(tmp_path / "in")], output=str(tmp_path / "out"), conditions=["canny", "mlsd"],
                      min_size=64, caption_model=str(tiny_blip), caption_max_tokens=4,
                      annotator_params={"mlsd": {"method": "hough"}})
    groups = _group(make_steps(cfg, Placement(captioning=True, annotator_gpus=annotator_gpus)))
    assert [[type(s).__name__ for s in g] for g in groups] == [["ReadDecode"], ["Caption"], ["AnnotateAndWrite"]]
    assert groups[-1][0].actor == (annotator_gpus > 0)
    work = plan_shards(list_inputs(cfg.input), 10)[0]
    crossed = []
    for group in groups[:-1]:
        work = pickle.loads(pickle.dumps(run_steps(group, work)))
        crossed.append(work)
    jpeg_bytes = sum(len(s.jpg) for s in work.samples)
    for shard in crossed:
        assert len(shard.samples) == 4 and not any(s.conditions for s in shard.samples)
        assert len(pickle.dumps(shard)) < jpeg_bytes + 20_000
    assert all(s.caption for s in work.samples)
    stats = run_steps(groups[-1], work)
    with tarfile.open(tmp_path / "out" / "shards" / "00000.tar") as tar:
        names = [m.name for m in tar]
        first = tar.extractfile(names[0]).read()
    assert stats["samples"] == 4 and sum(n.endswith((".canny.png", ".mlsd.png")) for n in names) == 8
    assert Image.open(io.BytesIO(first)).format == "JPEG"


def test_spool_round_trip_and_refuses_a_repeated_key():
    from stages.shards.spool import SampleSpool

    with SampleSpool() as spool:
        spool.add("b", [("b.jpg", b"\xff" * 10), ("b.txt", b"two")])
        spool.add("a", [("a.jpg", b"\x00" * 3)])
        assert spool.keys() == ["b", "a"]
        assert list(spool.members("b")) == [("b.jpg", b"\xff" * 10), ("b.txt", b"two")]
        assert list(spool.members("a")) == [("a.jpg", b"\x00" * 3)]
        try:
            spool.add("a", [])
        except ValueError as exc:
            assert "already" in str(exc)
        else:
            raise AssertionError("a repeated key was accepted")


def test_gpu_writer_spools_each_chunk_before_annotating_the_next(tmp_path, monkeypatch):
    """With GPUs the writer actor runs the network annotators a chunk (their batch) at a
    time and spools that chunk before the next: maps of one chunk at most in memory."""
    from pipeline.config import BuildConfig
    from stages.shards import writer
    from stages.read.readers import list_inputs
    from stages.work import plan_shards
    from pipeline.plan import Placement, make_steps

    write_synthetic(tmp_path / "in", 20, size=(96, 80))
    cfg = BuildConfig(input=[str(tmp_path / "in")], output=str(tmp_path / "out"), conditions=["canny", "mlsd"],
                      resolution=64, min_size=64, caption_model="none",
                      annotator_params={"mlsd": {"method": "hough", "batch_size": 8}})
    read, write = make_steps(cfg, Placement(annotator_gpus=0.5))
    assert write.actor and list(write.gpu.annotators) == ["mlsd"] and write.gpu.chunk_size == 8
    events = []
    annotate_chunk = write.gpu.annotate_chunk
    monkeypatch.setattr(write.gpu, "annotate_chunk",
                        lambda work, samples: events.append(len(samples)) or annotate_chunk(work, samples))
    add = writer.ShardWriter.add
    monkeypatch.setattr(writer.ShardWriter, "add", lambda self, sample: events.append("add") or add(self, sample))
    stats = write(read(plan_shards(list_inputs(cfg.input), 100)[0]))
    assert stats["samples"] == 20
    assert events == [8, *["add"] * 8, 8, *["add"] * 8, 4, *["add"] * 4]
