"""Cached latents: `build --latents MODEL` stores what the model's VAE makes of each stored
image, and the trainer uses them (no VAE encoder) only when they fit its base (tiny SD
with random weights: plumbing and numbers, not quality)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import write_synthetic


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from pipeline.build import run_build
    from pipeline.config import BuildConfig
    from tiny_models import make_tiny_sd

    root = tmp_path_factory.mktemp("latents")
    sd = make_tiny_sd(root / "sd")
    write_synthetic(root / "in", 6, size=(96, 80))
    run_build(BuildConfig(input=[str(root / "in")], output=str(root / "out"), resolution=64, min_size=64,
                          caption_model="none", executor="local", samples_per_shard=3, preview=0, report_samples=0,
                          latents=str(sd)), log=lambda *_: None)
    return root, sd


def test_stored_latents_match_the_vae_encoding_of_the_stored_image(built):
    from diffusers import AutoencoderKL
    from PIL import Image

    root, sd = built
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").eval()
    samples = list(wds.WebDataset(sorted(str(p) for p in (root / "out" / "shards").glob("*.tar")), shardshuffle=False,
                                  empty_check=False))
    assert len(samples) == 6
    for sample in samples:
        meta = json.loads(sample["json"])
        stored = np.load(io.BytesIO(sample["latents.npy"]))
        assert stored.dtype == np.float16 and list(stored.shape) == meta["latents"]["shape"] == [4, 8, 8]
        assert meta["latents"]["model"] == str(sd) and meta["latents"]["scaling_factor"] == vae.config.scaling_factor
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        with torch.no_grad():
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
            expected = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor)[0].numpy()
        assert np.corrcoef(stored.astype(np.float32).ravel(), expected.ravel())[0, 1] >= 0.95


def train_config(root, base, out, **kw):
    from train.config import TrainConfig

    values = dict(shards=[str(root / "out")], pretrained_model=str(base), output_dir=str(out), resolution=64,
                  train_batch_size=2, max_train_steps=2, checkpointing_steps=100, validation_steps=100,
                  num_validation_images=0, dataloader_num_workers=0, shuffle_buffer=4, report_to="none")
    values.update(kw)
    return TrainConfig(**values)


def test_training_uses_matching_latents_without_the_vae_encoder(built, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from train.trainer import train

    root, sd = built

    def no_encoder(*args, **kwargs):
        raise AssertionError("the VAE encoder ran although cached latents fit")

    monkeypatch.setattr(AutoencoderKL, "encode", no_encoder)
    logs: list[str] = []
    assert train(train_config(root, sd, tmp_path / "run"), log=logs.append)["global_step"] == 2
    assert any("using cached latents from the shards" in line and "random flips off" in line for line in logs)


def test_latents_of_another_base_are_not_used(built, tmp_path):
    from tiny_models import make_tiny_sd
    from train.trainer import train

    root, _ = built
    other = make_tiny_sd(tmp_path / "other")
    logs: list[str] = []
    assert train(train_config(root, other, tmp_path / "run"), log=logs.append)["global_step"] == 2
    assert any("encoding images with the VAE" in line and "not this base" in line for line in logs)
    logs.clear()
    train(train_config(root, built[1], tmp_path / "run2", cached_latents=False), log=logs.append)
    assert not any("using cached latents" in line for line in logs)


def test_flips_and_cached_latents_do_not_mix(built, tmp_path):
    from train.trainer import TrainError, train

    root, sd = built
    with pytest.raises(TrainError, match="flip"):
        train(train_config(root, sd, tmp_path / "run", flip=True), log=lambda *_: None)


def test_a_wrong_latents_model_fails_before_any_shard(tmp_path):
    from pipeline.cli import main

    write_synthetic(tmp_path / "in", 2)
    assert main(["build", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--resolution", "64",
                 "--min-size", "64", "--caption-model", "none", "--latents", str(tmp_path / "nothing-here")]) == 2
    assert not list((tmp_path / "out").glob("shards/*.tar"))
