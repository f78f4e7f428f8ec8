"""Quality gates: empty condition maps and near-duplicate pictures are rejected with their
reasons, counted, and never cost the good samples around them."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageEnhance

from conftest import write_synthetic
from stages.transform.near_duplicates import find, phash


def _near_copy(src: Path, dst: Path, brighter: float = 1.0) -> None:
    image = Image.open(src).convert("RGB")
    image = image.resize((round(image.width * 0.97), round(image.height * 0.97)))
    if brighter != 1.0:
        image = ImageEnhance.Brightness(image).enhance(brighter)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=70)
    dst.write_bytes(buf.getvalue())


def build(folder: Path, out: Path, **extra):
    from pipeline.build import run_build
    from pipeline.config import BuildConfig

    run_build(BuildConfig(input=[str(folder)], output=str(out), resolution=64, min_size=64, caption_model="none",
                          executor="local", samples_per_shard=3, preview=0, report_samples=0, **extra),
              log=lambda *_: None)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()] \
        if (out / "errors.jsonl").exists() else []
    return json.loads((out / "manifest.json").read_text()), {Path(e["source"]).name: e for e in errors}


def test_find_keeps_the_first_and_compares_only_candidates():
    items = [("a", "ffff0000ffff0000"), ("b", "ffff0000ffff0001"), ("c", "0000ffff0000ffff"), ("d", "ffff0000ffff0003")]
    assert find(items, 2) == {"b": ("a", 1), "d": ("a", 2)}
    assert find(items, 0) == {}
    assert find(list(reversed(items)), 2) == {"b": ("d", 1), "a": ("d", 2)}, "order decides which one stays"


def test_blank_edges_and_near_copies_are_rejected_with_reasons(tmp_path):
    folder = tmp_path / "in"
    photos = write_synthetic(folder, 6, size=(160, 128))
    for i, colour in enumerate(("white", (40, 90, 160))):
        Image.new("RGB", (160, 128), colour).save(folder / f"blank_{i}.jpg")
    _near_copy(photos[0], folder / "zz_copy_of_0.jpg")
    _near_copy(photos[3], folder / "zz_copy_of_3.jpg", brighter=1.05)
    assert (int(phash(__import__("numpy").asarray(Image.open(photos[0]).convert("RGB"))), 16) ^ int(phash(
        __import__("numpy").asarray(Image.open(folder / "zz_copy_of_0.jpg").convert("RGB"))), 16)).bit_count() <= 6

    manifest, errors = build(folder, tmp_path / "out", min_condition_coverage=0.002, near_duplicates=6)
    assert manifest["samples"] == 6, "the six distinct photos stay"
    assert {name: e["error"] for name, e in errors.items()} == {
        "blank_0.jpg": "empty_condition", "blank_1.jpg": "empty_condition",
        "zz_copy_of_0.jpg": "near_duplicate", "zz_copy_of_3.jpg": "near_duplicate"}
    assert "canny:" in errors["blank_0.jpg"]["message"] and errors["blank_0.jpg"]["stage"] == "annotate:canny"
    kept_sources = {}
    for stats_path in sorted((tmp_path / "out" / "shards").glob("*_stats.json")):
        stats = json.loads(stats_path.read_text())
        kept_sources.update(dict(zip(stats["keys"], (Path(s).name for s in stats["sources"]))))
        assert len(stats["phashes"]) == stats["samples"] == len(stats["keys"])
    assert kept_sources[errors["zz_copy_of_0.jpg"]["kept"]] == photos[0].name
    assert kept_sources[errors["zz_copy_of_3.jpg"]["kept"]] == photos[3].name
    assert "synth_0000.jpg" in errors["zz_copy_of_0.jpg"]["message"], "the message names the kept image"
    total = sum(json.loads(p.read_text())["rejected"].get("near_duplicate", 0)
                for p in (tmp_path / "out" / "shards").glob("*_stats.json"))
    assert total == 2, "counted in the shard stats"

    again, errors_again = build(folder, tmp_path / "again", min_condition_coverage=0.002, near_duplicates=6)
    assert again["shards"] == manifest["shards"] and errors_again.keys() == errors.keys(), "deterministic"


def test_gates_are_off_by_default(tmp_path):
    folder = tmp_path / "in"
    photos = write_synthetic(folder, 3, size=(160, 128))
    Image.new("RGB", (160, 128), "white").save(folder / "blank.jpg")
    _near_copy(photos[0], folder / "zz_copy.jpg")
    manifest, errors = build(folder, tmp_path / "out")
    assert manifest["samples"] == 5 and errors == {}


def test_flat_depth_maps_are_rejected_and_varied_ones_kept():
    """The gate on the depth annotator's output (random-weight depth networks give no
    reliable flat map, so the gate is fed maps made here)."""
    import numpy as np

    from stages.work import Sample, ShardWork
    from stages.steps import Annotation, AnnotationSettings

    step = Annotation({}, AnnotationSettings(min_depth_std=3.0))
    describe = type("A", (), {"mode": "L", "dtype": np.uint8, "uses_model": False, "describe": lambda self, used: used})()
    image = np.zeros((16, 16, 3), np.uint8)
    work = ShardWork(0, [])
    flat, varied = np.full((16, 16), 128, np.uint8), np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1))
    for name, depth in (("flat.jpg", flat), ("varied.jpg", varied)):
        sample = Sample(name, name, "0", b"", 16, 16, 16, 16)
        kept = step._store(work, sample, "depth", describe, image, 0, (depth, {}))
        assert kept == (name == "varied.jpg")
    assert [(e["source"], e["error"]) for e in work.errors] == [("flat.jpg", "flat_depth")]


def test_low_clip_score_gate_plumbing(tmp_path):
    """With a tiny random-weight CLIP the scores mean nothing, so this checks the plumbing
    (scores per sample, the floor, the reason and the score in errors.jsonl, the rest kept),
    not whether mismatched captions score low: the floor is set between measured scores."""
    import numpy as np

    from stages.models.clip_score import ClipScorer
    from tiny_models import make_tiny_clip

    clip = make_tiny_clip(tmp_path / "clip")
    folder = tmp_path / "in"
    photos = write_synthetic(folder, 6, size=(96, 96))
    captions = ["a red square", "a photo of a dog", "blue gradient", "text", "a cat on a sofa", "squares"]
    for photo, caption in zip(photos, captions):
        photo.with_suffix(".txt").write_text(caption)
    plain, _ = build(folder, tmp_path / "plain", keep_captions=True)  # what the gate will see: the stored images
    import webdataset as wds

    stored = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "plain" / "shards").glob("*.tar")),
                                 shardshuffle=False, empty_check=False).decode("rgb8"))
    scores = dict(zip((Path(s["json"]["source"]).name for s in stored),
                      ClipScorer(str(clip), "cpu")([s["jpg"] for s in stored], [s["txt"] for s in stored])))
    distinct = sorted(set(scores.values()))
    assert len(distinct) >= 2, f"the random CLIP gives one score to all: {scores}"
    floor = (distinct[0] + distinct[1]) / 2
    manifest, errors = build(folder, tmp_path / "out", keep_captions=True, min_clip_score=floor,
                             clip_model=str(clip))
    low = {name for name, s in scores.items() if s < floor}
    assert low and {n for n, e in errors.items() if e["error"] == "low_clip_score"} == low
    assert manifest["samples"] == plain["samples"] - len(low)
    assert all("CLIP score" in errors[n]["message"] for n in low)
