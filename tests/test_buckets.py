"""Aspect-ratio buckets: a keep_ratio build records each sample's bucket from a fixed set;
the trainer batches by bucket (every batch one size) and says what a finite stream leaves."""

from __future__ import annotations

import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from stages.transform.buckets import bucket_for, buckets


def test_bucket_set_and_choice():
    assert buckets(64)[0] == (64, 64) and (128, 64) in buckets(64) and (64, 128) in buckets(64)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets(512))
    assert bucket_for(800, 600, 512) == (640, 512) and bucket_for(600, 800, 512) == (512, 640)
    assert bucket_for(500, 500, 512) == (512, 512) and bucket_for(1920, 1080, 512) == (896, 512)


@pytest.fixture(scope="module")
def bucket_build(tmp_path_factory):
    from conftest import synthetic_image
    from pipeline.build import run_build
    from pipeline.config import BuildConfig

    root = tmp_path_factory.mktemp("buckets")
    (root / "in").mkdir()
    sizes = [(96, 64), (64, 96), (128, 64), (64, 64), (200, 64), (64, 140)] * 3
    for i, size in enumerate(sizes):
        synthetic_image(i, size).save(root / "in" / f"img_{i:03d}.jpg", quality=90)
    run_build(BuildConfig(input=[str(root / "in")], output=str(root / "out"), resolution=64, min_size=64,
                          max_aspect=4.0, resize_mode="keep_ratio", caption_model="none", executor="local",
                          samples_per_shard=6, preview=0, report_samples=0), log=lambda *_: None)
    return root


def test_keep_ratio_build_records_buckets(bucket_build):
    urls = sorted(str(p) for p in (bucket_build / "out" / "shards").glob("*.tar"))
    recorded = [tuple(json.loads(s["json"])["bucket"]) for s in wds.WebDataset(urls, shardshuffle=False,
                                                                                 empty_check=False)]
    assert len(recorded) == 18 and set(recorded) <= set(buckets(64))
    assert {(64, 64), (128, 64), (64, 128), (192, 64)} <= set(recorded)


def test_every_batch_is_one_bucket(bucket_build):
    from train.data import expand_shards, make_dataset

    dataset = make_dataset(expand_shards([str(bucket_build / "out")]), "canny", 64, 3, seed=0, shuffle_buffer=8,
                           flip=True, buckets=True)
    seen = set()
    for batch, _ in zip(dataset, range(12)):
        sizes = {tuple(x.shape[-2:]) for key in ("pixel_values", "conditioning_pixel_values") for x in batch[key]}
        assert len(sizes) == 1, "one size per batch, image and condition alike"
        assert batch["pixel_values"].shape[0] == 3
        seen.add(tuple(batch["pixel_values"].shape[-2:]))
    assert len(seen) >= 3, f"several buckets take turns: {seen}"


def test_a_finite_stream_says_what_is_left_and_drops_nothing_silently():
    from train.data import BucketBatches

    def item(w, h):
        return {"pixel_values": torch.zeros(3, h, w), "conditioning_pixel_values": torch.zeros(3, h, w), "text": "",
                "bucket": (w, h)}

    stream = [item(64, 64)] * 5 + [item(128, 64)] * 2
    said: list[str] = []
    batches = list(BucketBatches(2, partial=True, log=said.append)(iter(stream)))
    assert sum(b["pixel_values"].shape[0] for b in batches) == 7, "every sample in some batch"
    assert said == ["end of the data: smaller last batches: 1 of 64x64"]
    said.clear()
    dropped = list(BucketBatches(3, partial=False, log=said.append)(iter(stream)))
    assert sum(b["pixel_values"].shape[0] for b in dropped) == 3 and said == [
        "end of the data: dropped: 2 of 64x64, 2 of 128x64"]


def test_training_on_buckets(bucket_build, tmp_path):
    from tiny_models import make_tiny_sd
    from train.config import TrainConfig
    from train.trainer import train

    cfg = TrainConfig(shards=[str(bucket_build / "out")], pretrained_model=str(make_tiny_sd(tmp_path / "sd")),
                      output_dir=str(tmp_path / "run"), resolution=64, train_batch_size=2, max_train_steps=3,
                      checkpointing_steps=100, validation_steps=100, num_validation_images=0, dataloader_num_workers=0,
                      shuffle_buffer=6, report_to="none", buckets=True)
    assert train(cfg, log=lambda *_: None)["global_step"] == 3
