"""Cached prompt embeddings: `build --text-embeddings MODEL` stores what the base's own text
encoders make of each caption (and of the empty prompt, once, beside the manifest), and
the trainer uses them only when they fit its base, then never loading the text encoders
(tiny SD, SDXL, SD3 and Flux bases with random weights: plumbing and numbers, not quality)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import tiny_train_config, write_synthetic

FAMILIES = ("sd", "sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def built(family_builds):
    return family_builds  # conftest.py: a tiny base per family and a build with its prompt embeddings


def samples_of(folder):
    return list(wds.WebDataset(sorted(str(p) for p in (folder / "shards").glob("*.tar")), shardshuffle=False,
                               empty_check=False))


def encoded(base, prompts):
    """What the trainer's family makes of `prompts` with the base's text encoders (fp32)."""
    from train import families

    family = families.detect(str(base))
    frozen = families.text_only(family, str(base), torch.float32)
    with torch.no_grad():
        hidden, pooled = family.encode_prompts(frozen, prompts, "cpu")
    return hidden.numpy(), None if pooled is None else pooled.numpy()


@pytest.mark.parametrize("name", FAMILIES)
def test_stored_embeddings_are_the_family_encoding_of_each_caption(built, name):
    from stages.shards.layout import EMPTY_TEXT, EMPTY_TEXT_POOLED

    base, out = built[name]
    samples = samples_of(out)
    assert len(samples) == 6
    hidden, pooled = encoded(base, [s["txt"].decode() for s in samples])
    # tiny CLIPs: 16 tokens; SD3: 16 CLIP tokens then 77 of zeros for its missing T5; Flux: 77 T5 tokens
    shape, pooled_shape = {"sd": ([16, 32], None), "sdxl": ([16, 32], [16]), "sd3": ([93, 32], [32]),
                           "flux": ([77, 32], [16])}[name]
    for i, sample in enumerate(samples):
        meta = json.loads(sample["json"])
        stored = np.load(io.BytesIO(sample["text.npy"]))
        assert meta["text_embeddings"] == {"model": str(base), "family": name, "shape": shape, "precision": "fp32",
                                           **({"pooled_shape": pooled_shape} if pooled_shape else {})}
        assert stored.dtype == np.float16 and list(stored.shape) == shape
        # fp32 on the CPU, then stored in fp16: equal to the encoder's output rounded to fp16
        np.testing.assert_array_equal(stored, hidden[i].astype(np.float16))
        if pooled_shape:
            stored_pooled = np.load(io.BytesIO(sample["text_pooled.npy"]))
            assert stored_pooled.dtype == np.float16 and list(stored_pooled.shape) == pooled_shape
            np.testing.assert_array_equal(stored_pooled, pooled[i].astype(np.float16))
        else:
            assert "text_pooled.npy" not in sample
    empty_hidden, empty_pooled = encoded(base, [""])
    np.testing.assert_array_equal(np.load(out / EMPTY_TEXT), empty_hidden[0].astype(np.float16))
    assert (out / EMPTY_TEXT_POOLED).exists() == (pooled_shape is not None)
    if pooled_shape:
        np.testing.assert_array_equal(np.load(out / EMPTY_TEXT_POOLED), empty_pooled[0].astype(np.float16))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["text_embeddings"] == str(base)
    assert manifest["text_embeddings"]["family"] == name


def train_config(out, base, run, **kw):
    return tiny_train_config(out, base, run, **kw)


def no_text_encoders(monkeypatch):
    """Loading any tokenizer or text encoder of these families raises."""
    from transformers import (AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                              T5EncoderModel, T5TokenizerFast)

    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder or tokenizer was loaded although the shards' embeddings fit")

    for cls in (CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast,
                AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.mark.parametrize("name", FAMILIES)
def test_training_on_cached_embeddings_loads_no_text_encoder_and_gives_the_same_losses(built, name, tmp_path,
                                                                                        monkeypatch):
    """Three steps with prompt dropout (0.5: both kinds of rows occur) and a validation at the
    end, without the text encoders; then the same run encoding the prompts. The losses agree
    to fp16 rounding of the embeddings (rtol 1e-4), and bit for bit when the encoder's output
    is rounded to fp16 as the build stores it: the two paths differ in nothing else."""
    from train.trainer import PromptDropout, train

    assert any(d for _ in range(3) for d in PromptDropout(0.5, 0).drops(2))
    assert not all(d for _ in range(3) for d in PromptDropout(0.5, 0).drops(2))
    base, out = built[name]
    with monkeypatch.context() as patch:
        no_text_encoders(patch)
        logs: list[str] = []
        cached = train(train_config(out, base, tmp_path / "cached"), log=logs.append)
    assert any("using cached prompt embeddings from the shards" in line and "not loaded" in line for line in logs)
    assert cached["models"]["frozen"].text_encoders == [] and cached["models"]["text_encoder"] is None
    assert (tmp_path / "cached" / "validation" / "step-0000003.png").exists()  # validation on the stored embeddings

    encoded_run = train(train_config(out, base, tmp_path / "encoded", cached_text_embeddings=False),
                        log=lambda *_: None)
    np.testing.assert_allclose(cached["losses"], encoded_run["losses"], rtol=1e-4)

    family_cls = type(encoded_run["models"]["frozen"].family)
    encode = family_cls.encode_prompts

    def as_stored(self, frozen, prompts, device):  # what the build stores: fp16
        hidden, pooled = encode(self, frozen, prompts, device)
        return hidden.half().float(), None if pooled is None else pooled.half().float()

    monkeypatch.setattr(family_cls, "encode_prompts", as_stored)
    rounded = train(train_config(out, base, tmp_path / "rounded", cached_text_embeddings=False), log=lambda *_: None)
    assert rounded["losses"] == cached["losses"]


def test_embeddings_of_another_base_are_not_used_and_it_says_why(built, tmp_path):
    from tiny_models import make_tiny_sd
    from train.trainer import train

    _, out = built["sd"]
    other = make_tiny_sd(tmp_path / "other")
    logs: list[str] = []
    run = train(train_config(out, other, tmp_path / "run", max_train_steps=1, num_validation_images=0), log=logs.append)
    assert run["global_step"] == 1 and run["models"]["frozen"].text_encoders
    assert any("encoding prompts with the text encoders" in line and "not this base" in line for line in logs), logs
    logs.clear()  # SDXL's embeddings on an SD base: another model (and family)
    train(train_config(built["sdxl"][1], built["sd"][0], tmp_path / "run2", max_train_steps=1,
                       num_validation_images=0), log=logs.append)
    assert any("encoding prompts with the text encoders" in line and "not this base" in line for line in logs), logs


def test_a_missing_empty_embedding_means_encoding(built, tmp_path):
    import shutil

    from stages.shards.layout import EMPTY_TEXT
    from train import families, text_embeddings

    base, out = built["sd"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / EMPTY_TEXT).unlink()
    urls = sorted(str(p) for p in (copy / "shards").glob("*.tar"))
    cached, why = text_embeddings.cached_text(urls, str(base), families.detect(str(base)))
    assert cached is None and EMPTY_TEXT in why and "prompt dropout" in why


def test_a_base_of_another_family_refuses_at_build_and_falls_back_in_training(built, tmp_path):
    """A base folder that is no known pipeline: the build stops before any shard; SD's
    embeddings on a Flux base are another family's, so training encodes and says why."""
    from pipeline.cli import main
    from train import families, text_embeddings

    flux = built["flux"][0]
    urls = sorted(str(p) for p in (built["sd"][1] / "shards").glob("*.tar"))
    cached, why = text_embeddings.cached_text(urls, str(flux), families.detect(str(flux)))
    assert cached is None and "not this base" in why
    write_synthetic(tmp_path / "in", 2)
    assert main(["build", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out2"), "--resolution", "64",
                 "--min-size", "64", "--caption-model", "none", "--text-embeddings", str(tmp_path / "nothing")]) == 2
    assert not list((tmp_path / "out2").glob("shards/*.tar"))


def test_the_driver_checks_the_encoders_without_loading_their_weights(built, tmp_path, monkeypatch):
    """The build's check before any shard finds the tokenizers and the encoders' configs but
    loads no encoder weights (T5-XXL would be 19 GB on the driver); a base whose encoder
    folder is gone fails that check, named, before any shard."""
    import shutil

    from pipeline.cli import main
    from stages.steps import TextEmbeddingSettings
    from train.text_embeddings import PromptEncoder

    base = built["flux"][0]
    with monkeypatch.context() as patch:
        no_text_encoders_weights = []
        from transformers import CLIPTextModel, T5EncoderModel

        for cls in (CLIPTextModel, T5EncoderModel):
            patch.setattr(cls, "from_pretrained", lambda *a, **k: no_text_encoders_weights.append(a) or 1 / 0)
        assert PromptEncoder(TextEmbeddingSettings(str(base)), "cpu").check().NAME == "flux"
        assert no_text_encoders_weights == []
    broken = tmp_path / "flux"
    shutil.copytree(base, broken)
    shutil.rmtree(broken / "text_encoder_2")
    write_synthetic(tmp_path / "in", 2)
    assert main(["build", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--resolution", "64",
                 "--min-size", "64", "--caption-model", "none", "--text-embeddings", str(broken)]) == 2
    assert not list((tmp_path / "out").glob("shards/*.tar"))
