"""Cached latents: `build --latents MODEL` stores what the model's VAE makes of each stored
image, and the trainer uses them (no VAE encoder on the images) only when they fit its
base (tiny SD, SD3 and Flux with random weights: plumbing and numbers, not quality)."""

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
        assert meta["latents"]["shift_factor"] == 0.0  # SD VAEs have no shift
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


# SD3 and Flux: their VAEs shift the latents before scaling; the cached latents carry the shift.

@pytest.fixture(scope="module")
def flow_built(tmp_path_factory):
    """One build per flow family, each with `--latents` of that tiny base."""
    from pipeline.build import run_build
    from pipeline.config import BuildConfig
    from tiny_models import make_tiny_flux, make_tiny_sd3

    root = tmp_path_factory.mktemp("flow-latents")
    write_synthetic(root / "in", 4, size=(96, 80))
    bases = {"sd3": make_tiny_sd3(root / "sd3"), "flux": make_tiny_flux(root / "flux")}
    for family, base in bases.items():
        run_build(BuildConfig(input=[str(root / "in")], output=str(root / family), resolution=64, min_size=64,
                              caption_model="none", executor="local", samples_per_shard=4, preview=0,
                              report_samples=0, latents=str(base)), log=lambda *_: None)
    return root, bases


def shard_samples(folder) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in (folder / "shards").glob("*.tar")), shardshuffle=False,
                               empty_check=False))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_latents_are_the_shifted_and_scaled_mean_of_the_stored_image(flow_built, family):
    from diffusers import AutoencoderKL
    from PIL import Image

    root, bases = flow_built
    vae = AutoencoderKL.from_pretrained(bases[family], subfolder="vae").eval()
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    assert shift * scale > 1e-2, "the tiny base's VAE has a shift, as the real ones do, well above fp16 rounding"
    samples = shard_samples(root / family)
    assert len(samples) == 4
    for sample in samples:
        meta = json.loads(sample["json"])["latents"]
        assert meta["shift_factor"] == pytest.approx(shift) and meta["scaling_factor"] == pytest.approx(scale)
        stored = np.load(io.BytesIO(sample["latents.npy"])).astype(np.float32)
        assert list(stored.shape) == meta["shape"] == [4, 8, 8]
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        with torch.no_grad():
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
            expected = ((vae.encode(x).latent_dist.mean - shift) * scale)[0].numpy()
        # float16 storage: a few 1e-4 of the values; leaving the shift out would be off by shift x scale
        np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)


class EncodeCalls:
    """AutoencoderKL.encode, recording what it was given (then encoding as usual)."""

    def __init__(self, monkeypatch):
        from diffusers import AutoencoderKL

        self.inputs: list[torch.Tensor] = []
        original = AutoencoderKL.encode

        def encode(vae, x, *args, **kwargs):
            self.inputs.append(x.detach().clone())
            return original(vae, x, *args, **kwargs)

        monkeypatch.setattr(AutoencoderKL, "encode", encode)

    def images(self) -> int:
        """Calls on anything but a canny condition (which the trainer gives as exactly -1 or 1)."""
        return sum(not torch.isin(x, torch.tensor([-1.0, 1.0], dtype=x.dtype)).all().item() for x in self.inputs)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_training_uses_cached_latents_and_loses_the_same_as_encoding_the_mean(flow_built, tmp_path, monkeypatch,
                                                                                  family):
    """With cached latents the VAE encodes the condition only; the loss is the one of an
    encoding run whose posterior samples are replaced by the mean (same data, same noise)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from train.trainer import train

    root, bases = flow_built
    # the mean instead of a posterior sample; contiguous, as the cached latents are: the CPU VAE
    # returns channels-last strides, and randn_like (the step's noise) follows the strides
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda dist, generator=None: dist.mode().contiguous())
    runs = {}
    for cached in (True, False):
        calls, logs = EncodeCalls(monkeypatch), []
        result = train(train_config(root, bases[family], tmp_path / f"run-{cached}", shards=[str(root / family)],
                                    cached_latents=cached, flip=False), log=logs.append)
        runs[cached] = result["losses"], len(calls.inputs), calls.images()  # counted now: the next run wraps this
        if cached:
            assert any("using cached latents from the shards" in line for line in logs), logs
    (cached_losses, *cached_calls), (encoded_losses, *encoded_calls) = runs[True], runs[False]
    assert cached_calls == [2, 0], "2 steps: the condition only"
    assert encoded_calls == [4, 2], "2 steps: the image and the condition"
    # float16 storage moves the loss by ~1e-5 relative; latents without the shift move it by ~1e-2
    assert cached_losses == pytest.approx(encoded_losses, rel=1e-4), (cached_losses, encoded_losses)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_latents_made_without_the_shift_are_refused_for_a_shifted_vae(flow_built, tmp_path, monkeypatch, family):
    """Shards built before the shift was applied record no shift_factor: the trainer encodes
    and says why; for a VAE without a shift (SD) such shards still fit."""
    from train.data import cached_latents_match
    from train.trainer import train

    root, bases = flow_built
    old = tmp_path / "old"
    old.mkdir()
    with wds.TarWriter(str(old / "00000.tar")) as sink:
        for sample in shard_samples(root / family):
            meta = json.loads(sample["json"])
            del meta["latents"]["shift_factor"]
            sink.write({**{k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"},
                        "json": json.dumps(meta).encode()})
    url, info = str(old / "00000.tar"), json.loads(shard_samples(root / family)[0]["json"])["latents"]
    fits, why = cached_latents_match([url], str(bases[family]), info["scaling_factor"], info["shape"], 64,
                                     info["shift_factor"])
    assert not fits and "without the VAE's shift" in why and "rebuild" in why
    assert cached_latents_match([url], str(bases[family]), info["scaling_factor"], info["shape"], 64, 0.0)[0]
    assert not cached_latents_match([str(root / family / "shards" / "00000.tar")], str(bases[family]),
                                    info["scaling_factor"], info["shape"], 64, info["shift_factor"] + 0.01)[0]

    calls, logs = EncodeCalls(monkeypatch), []
    train(train_config(root, bases[family], tmp_path / "run", shards=[str(old)], max_train_steps=1, flip=False),
          log=logs.append)
    assert any("encoding images with the VAE" in line and "without the VAE's shift" in line for line in logs), logs
    assert calls.images() == 1, "the image is encoded"
