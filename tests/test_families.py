"""Model families in the trainer, sampler and eval: SDXL next to SD 1.x, on tiny bases
with random weights made here (plumbing, shapes, determinism, formats; not quality)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import write_synthetic


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.build import run_build
    from pipeline.config import BuildConfig
    from tiny_models import make_tiny_flux, make_tiny_sd, make_tiny_sd3, make_tiny_sdxl

    root = tmp_path_factory.mktemp("families")
    write_synthetic(root / "in", 8, size=(120, 80))
    for i in range(8):
        (root / "in" / f"synth_{i:04d}.txt").write_text(f"a synthetic picture number {i}")
    run_build(BuildConfig(input=[str(root / "in")], output=str(root / "shards"), resolution=64, min_size=64,
                          caption_model="none", keep_captions=True, samples_per_shard=4, executor="local", preview=0,
                          report_samples=0), log=lambda *_: None)
    return {"root": root, "sd": make_tiny_sd(root / "sd"), "sdxl": make_tiny_sdxl(root / "sdxl"),
            "sd3": make_tiny_sd3(root / "sd3"), "flux": make_tiny_flux(root / "flux"), "shards": root / "shards"}


def config(setup, out, base="sdxl", **kw):
    from train.config import TrainConfig

    values = dict(shards=[str(setup["shards"])], pretrained_model=str(setup[base]), output_dir=str(out), resolution=64,
                  train_batch_size=2, max_train_steps=3, checkpointing_steps=2, validation_steps=100,
                  num_validation_images=0, dataloader_num_workers=0, shuffle_buffer=4, report_to="none",
                  learning_rate=1e-3)
    values.update(kw)
    return TrainConfig(**values)


def test_the_family_comes_from_model_index(setup, tmp_path):
    from train import families

    assert [families.detect(str(setup[k])).NAME for k in ("sd", "sdxl", "sd3", "flux")] == ["sd", "sdxl", "sd3", "flux"]
    for name, said in (("KandinskyPipeline", "unknown"), ("WanPipeline", "unknown")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": name}))
        with pytest.raises(families.FamilyError, match=said):
            families.detect(str(folder))


def test_every_family_implements_the_whole_interface():
    from train import families
    from train.families.base import Family, missing

    specs = sorted({*families.FAMILIES.values(), families.DEFAULT})
    assert specs == ["flux.Flux", "sd.SD", "sd3.SD3", "sdxl.SDXL"]
    for spec in specs:
        cls = families.family_class(spec)
        assert issubclass(cls, Family) and missing(cls) == [], spec
        assert isinstance(cls.SAMPLES_THROUGH_PIPELINE, bool) and cls.CONTROL_IMAGE_ARG and cls.PIPELINE
        cls()  # no method left abstract


def test_an_incomplete_family_fails_the_check(tmp_path, monkeypatch):
    from train import families
    from train.families.base import Family, missing
    from train.families.sd import SD

    class Half(Family):  # a new family, its author stopped half way
        NAME = "half"

        def load(self, pretrained, dtype):
            raise AssertionError("never loaded")

    assert {"TITLE", "PIPELINE", "SAMPLES_THROUGH_PIPELINE", "loss", "conditioning", "pipeline_parts"} <= set(
        missing(Half)) and "load" not in missing(Half) and "NAME" not in missing(Half)
    with pytest.raises(TypeError, match="abstract"):
        Half()
    # every method there, one attribute not: instantiable, so only the check sees it
    members = {k: v for k, v in vars(SD).items() if not k.startswith("__") and k != "SAMPLES_THROUGH_PIPELINE"}
    unflagged = type("Unflagged", (Family,), members)
    assert missing(unflagged) == ["SAMPLES_THROUGH_PIPELINE"] and missing(unflagged()) == ["SAMPLES_THROUGH_PIPELINE"]
    assert missing(SD) == [] and missing(object) != [], "not a Family at all"
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    monkeypatch.setattr(families, "family_class", lambda spec: unflagged)
    with pytest.raises(families.FamilyError, match="does not implement SAMPLES_THROUGH_PIPELINE"):
        families.detect(str(tmp_path))


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_every_family_builds_its_controlnet_and_pipelines_from_the_loaded_parts(setup, family):
    from train import families

    frozen = families.load(str(setup[family]), torch.float32)
    impl = frozen.family
    assert impl.NAME == family and not hasattr(frozen, "unet")
    net = impl.make_controlnet(frozen, None, "zero")
    assert type(net) is impl.controlnet_class()
    impl.check_controlnet(frozen, net, "fresh")
    pipe = impl.pipeline(frozen, frozen.denoiser, net, impl.sampling_scheduler(frozen))
    assert type(pipe).__name__ == impl.PIPELINE and pipe.controlnet is net and pipe.vae is frozen.vae
    base = impl.base_pipeline(frozen)
    assert base is impl.base_pipeline(frozen), "made once"
    assert getattr(base, "unet", None) is frozen.denoiser or getattr(base, "transformer", None) is frozen.denoiser
    base.set_progress_bar_config(disable=True)
    image = base("a picture", num_inference_steps=1, height=64, width=64, generator=torch.Generator().manual_seed(0),
                 **impl.EXTRA_PIPELINE_ARGS).images[0]
    assert image.size == (64, 64)


def test_sdxl_batches_carry_the_recorded_size_and_crop(setup):
    from train.data import expand_shards, make_dataset

    batch = next(iter(make_dataset(expand_shards([str(setup["shards"])]), "canny", 64, 4, 0, 4, False)))
    sizes = batch["sizes"]
    assert sizes["recorded"] and sizes["original_size"].tolist() == [[80, 120]] * 4
    assert sizes["crop_top_left"].tolist() == [[0, 16]] * 4, "120x80 resized to 96x64; the centre 64 starts at x=16"


def test_sdxl_trains_resumes_bit_exactly_and_validates(setup, tmp_path):
    from train.trainer import train

    logs: list[str] = []
    straight = train(config(setup, tmp_path / "straight", max_train_steps=4, validation_steps=2,
                            num_validation_images=2), log=logs.append)
    assert straight["global_step"] == 4 and any("base model: sdxl" in line for line in logs)
    assert sorted(p.name for p in (tmp_path / "straight" / "validation").glob("*.png")) == [
        "step-0000002.png", "step-0000004.png"]
    train(config(setup, tmp_path / "resumed", max_train_steps=2), log=lambda *_: None)
    resumed = train(config(setup, tmp_path / "resumed", max_train_steps=4, resume="latest"), log=lambda *_: None)
    a, b = straight["models"]["controlnet"].state_dict(), resumed["models"]["controlnet"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resume is bit-exact"
    from train import families

    frozen = families.load(str(setup["sdxl"]), torch.float32)
    start = frozen.family.make_controlnet(frozen, None, "zero").state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a), "training moved the weights"


def test_saved_sdxl_controlnet_generates_through_the_diffusers_pipeline(setup, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import Image

    from train.trainer import train

    train(config(setup, tmp_path / "run", max_train_steps=2), log=lambda *_: None)
    controlnet = ControlNetModel.from_pretrained(tmp_path / "run")
    assert controlnet.config.addition_embed_type == "text_time"
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(str(setup["sdxl"]), controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a synthetic picture", image=Image.new("RGB", (64, 64)), num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_sample_and_eval_commands_on_an_sdxl_base(setup, tmp_path):
    from pipeline.cli import main
    from train.trainer import train

    train(config(setup, tmp_path / "run", max_train_steps=1), log=lambda *_: None)
    shard = sorted((setup["shards"] / "shards").glob("*.tar"))[0]
    args = ["sample", "--pretrained-model", str(setup["sdxl"]), "--shard", str(shard), "--num", "2", "--steps", "2",
            "--resolution", "64", "--prompt-mode", "auto"]
    assert main([*args, "--controlnet", str(tmp_path / "run"), "--output", str(tmp_path / "s")]) == 0
    assert main([*args, "--output", str(tmp_path / "base")]) == 0, "the SDXL base alone"
    records = [json.loads((tmp_path / "s" / f"{i:04d}.json").read_text()) for i in range(2)]
    assert records[0]["prompt"].startswith("a synthetic picture") and (tmp_path / "s" / "0001.png").exists()
    assert main(["eval", str(tmp_path / "s"), "--condition", "canny", "--shuffled"]) == 0


def test_clear_errors_before_any_step(setup, tmp_path, capsys):
    from pipeline.cli import main
    from train.trainer import TrainError, train

    train(config(setup, tmp_path / "sd-run", base="sd", max_train_steps=1), log=lambda *_: None)
    with pytest.raises(TrainError, match="made for another kind of base model"):
        train(config(setup, tmp_path / "mixed", controlnet=str(tmp_path / "sd-run")), log=lambda *_: None)
    with pytest.raises(TrainError, match="resolution 40 does not fit"):
        train(config(setup, tmp_path / "res", resolution=40), log=lambda *_: None)
    shard = sorted((setup["shards"] / "shards").glob("*.tar"))[0]
    assert main(["sample", "--pretrained-model", str(setup["sdxl"]), "--controlnet", str(tmp_path / "sd-run"),
                 "--shard", str(shard), "--num", "1", "--steps", "1", "--resolution", "64",
                 "--output", str(tmp_path / "x")]) == 2
    assert "another kind of base model" in capsys.readouterr().err
    kandinsky = tmp_path / "kandinsky"
    kandinsky.mkdir()
    (kandinsky / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(TrainError, match="unknown base model type"):
        train(config(setup, tmp_path / "krun", pretrained_model=str(kandinsky)), log=lambda *_: None)
    with pytest.raises(TrainError, match="made for another kind of base model"):
        train(config(setup, tmp_path / "mixedflux", base="flux", controlnet=str(tmp_path / "sd-run")),
              log=lambda *_: None)
    with pytest.raises(TrainError, match="made for another kind of base model"):
        train(config(setup, tmp_path / "mixed3", base="sd3", controlnet=str(tmp_path / "sd-run")), log=lambda *_: None)
    with pytest.raises(TrainError, match="unlock-decoder"):
        train(config(setup, tmp_path / "unlock3", base="sd3", unlock_decoder=True), log=lambda *_: None)


FLOW = {  # family -> (ControlNet class, pipeline class, extra from_pretrained arguments)
    "sd3": ("SD3ControlNetModel", "StableDiffusion3ControlNetPipeline", {"text_encoder_3": None, "tokenizer_3": None}),
    "flux": ("FluxControlNetModel", "FluxControlNetPipeline", {}),
}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_matching_families_train_resume_validate_and_generate(setup, tmp_path, family):
    """SD3 (MMDiT) and Flux (packed latents, guidance embedding): a few flow-matching steps,
    bit-exact resume, validation through the family's diffusers ControlNet pipeline, the
    saved ControlNet generates there and through `controlforge sample` (random weights:
    plumbing only)."""
    import diffusers
    from PIL import Image

    from pipeline.cli import main
    from train.trainer import train

    logs: list[str] = []
    straight = train(config(setup, tmp_path / "straight", base=family, max_train_steps=4, validation_steps=4,
                            num_validation_images=2), log=logs.append)
    assert any(f"base model: {family}" in line for line in logs) and (tmp_path / "straight" / "validation").exists()
    assert all(np.isfinite(straight["losses"]))
    train(config(setup, tmp_path / "resumed", base=family, max_train_steps=2), log=lambda *_: None)
    resumed = train(config(setup, tmp_path / "resumed", base=family, max_train_steps=4, resume="latest"),
                    log=lambda *_: None)
    a, b = straight["models"]["controlnet"].state_dict(), resumed["models"]["controlnet"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resume is bit-exact"

    net_class, pipe_class, extra = FLOW[family]
    net = getattr(diffusers, net_class).from_pretrained(tmp_path / "straight")
    pipe = getattr(diffusers, pipe_class).from_pretrained(str(setup[family]), controlnet=net, **extra)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a picture", control_image=Image.new("RGB", (64, 64)), num_inference_steps=2, height=64, width=64,
                 max_sequence_length=77, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

    shard = sorted((setup["shards"] / "shards").glob("*.tar"))[0]
    args = ["sample", "--pretrained-model", str(setup[family]), "--shard", str(shard), "--num", "2", "--steps", "2",
            "--resolution", "64", "--prompt-mode", "auto"]
    assert main([*args, "--controlnet", str(tmp_path / "straight"), "--output", str(tmp_path / "s")]) == 0
    assert main([*args, "--output", str(tmp_path / "base")]) == 0, "the base alone"
    assert json.loads((tmp_path / "s" / "0000.json").read_text())["guidance_mode"] == "both"
    assert main([*args, "--mode", "paper", "--controlnet", str(tmp_path / "straight"), "--output",
                 str(tmp_path / "p")]) == 2, "samples through the pipeline: both branches only"
    assert main(["eval", str(tmp_path / "s"), "--condition", "canny", "--shuffled"]) == 0


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_every_family_takes_ema_checkpointing_dropout_and_the_convergence_tracker(setup, tmp_path, family):
    from train.trainer import train

    result = train(config(setup, tmp_path / "run", base=family, max_train_steps=2, use_ema=True,
                          gradient_checkpointing=True, prompt_dropout=0.5, validation_steps=2, num_validation_images=2,
                          validation_shards=[str(setup["shards"])]), log=lambda *_: None)
    assert result["global_step"] == 2
    tracked = json.loads((tmp_path / "run" / "controllability.json").read_text())
    assert tracked["steps"] == [2] and tracked["metric"] == "f1_2px"
