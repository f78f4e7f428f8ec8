"""Lean validation (issue 25): validation and `controlforge sample` build their pipeline from
the modules already in memory (the training ControlNet, the frozen base, the cached
embeddings of the validation prompts) and never load a second copy. While
`train.trainer.run_validation` runs, every `from_pretrained` (diffusers models, pipelines,
schedulers, configs; transformers models, tokenizers, configs, processors) and the
families' loaders raise; the pipeline it samples with holds the training objects
themselves. Tiny SD, SDXL, SD3 and Flux bases with random weights: plumbing, not quality.
The memory side (peak RSS of validation vs a training step) is bench/validation_memory.py."""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import tiny_train_config

FAMILIES = ("sd", "sdxl", "sd3", "flux")
DENOISER = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}


@pytest.fixture(scope="module")
def built(family_builds):
    return family_builds  # conftest.py: a tiny base per family and a build with its prompt embeddings


def train_config(out, base, run, **kw):
    return tiny_train_config(out, base, run, **{"max_train_steps": 2, "validation_steps": 2, **kw})


def _with_subclasses(root: type) -> list[type]:
    """`root` and every subclass imported so far."""
    found, todo = [root], [root]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def _loaders() -> list[tuple[type, str]]:
    """(class, method name) of everything that reads a model, pipeline, scheduler, config,
    tokenizer or processor from a folder or the hub; subclasses that define their own
    version are listed too."""
    import diffusers
    import transformers
    from diffusers.configuration_utils import ConfigMixin
    from transformers.feature_extraction_utils import FeatureExtractionMixin
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    roots = [(diffusers.ModelMixin, "from_pretrained"), (diffusers.DiffusionPipeline, "from_pretrained"),
             (diffusers.SchedulerMixin, "from_pretrained"), (ConfigMixin, "load_config"),
             (transformers.PreTrainedModel, "from_pretrained"),
             (transformers.PreTrainedTokenizerBase, "from_pretrained"),
             (transformers.PretrainedConfig, "from_pretrained"), (transformers.ProcessorMixin, "from_pretrained"),
             (ImageProcessingMixin, "from_pretrained"), (FeatureExtractionMixin, "from_pretrained"),
             (_BaseAutoModelClass, "from_pretrained"), (transformers.AutoTokenizer, "from_pretrained"),
             (transformers.AutoConfig, "from_pretrained")]
    found = []
    for root, name in roots:
        for cls in _with_subclasses(root):
            if name in vars(cls) and (cls, name) not in found:
                found.append((cls, name))
    return found


@contextlib.contextmanager
def loading_refused():
    """Within: every loader above, and the families' own (`families.load`, `load_frozen`,
    `load_text`, `text_only`, each family's `load`), records the call and raises. Yields
    the list of calls, empty when nothing tried to load (checked again after, in case a
    caller swallowed the error)."""
    from train import families
    from train.families import base as family_base

    calls: list[str] = []

    def refuser(what: str, wrap=None, skip: int = 0):
        def refuse(*args, **kwargs):  # `skip`: the class or instance before the path
            where = args[skip] if len(args) > skip else kwargs
            calls.append(f"{what}({where!r})")
            raise AssertionError(f"validation loaded something: {what}({where!r})")
        return wrap(refuse) if wrap else refuse

    with pytest.MonkeyPatch.context() as patch:
        for cls, name in _loaders():
            patch.setattr(cls, name, refuser(f"{cls.__name__}.{name}", classmethod, 1))
        for name in ("load", "load_frozen", "load_text", "text_only"):
            patch.setattr(families, name, refuser(f"families.{name}", skip=1 if name == "load_text" else 0))
        for cls in _with_subclasses(family_base.Family):
            if "load" in vars(cls):
                patch.setattr(cls, "load", refuser(f"{cls.__name__}.load", skip=1))
        yield calls


def watch_validation(monkeypatch):
    """Wrap `train.trainer.run_validation`: while it runs, loading is refused, and the
    family's pipeline (flow families) or the sampler's call (SD, SDXL: train/sampler.py)
    is captured with what it was given. Returns the list of records, one per validation:
    its arguments, the pipelines, the sampler calls and the refused loads."""
    import train.sampler as sampler
    import train.trainer as trainer

    records: list[dict] = []
    validate = trainer.run_validation

    def watched(batch, cfg, accelerator, frozen, denoiser, controlnet, step, dtype):
        record = {"frozen": frozen, "denoiser": accelerator.unwrap_model(denoiser),
                  "controlnet": accelerator.unwrap_model(controlnet), "pipes": [], "samples": []}
        records.append(record)
        family_cls = type(frozen.family)
        make_pipeline, draw = family_cls.pipeline, sampler.sample

        def capture(self, *args, **kwargs):
            pipe = make_pipeline(self, *args, **kwargs)
            record["pipes"].append(pipe)
            return pipe

        def capture_sample(sampled_frozen, scheduler, controls, *args, **kwargs):
            record["samples"].append({"frozen": sampled_frozen, "controls": controls, "mode": args[2]})
            return draw(sampled_frozen, scheduler, controls, *args, **kwargs)

        with loading_refused() as calls, pytest.MonkeyPatch.context() as patch:
            record["loads"] = calls
            patch.setattr(family_cls, "pipeline", capture)
            patch.setattr(sampler, "sample", capture_sample)
            return validate(batch, cfg, accelerator, frozen, denoiser, controlnet, step, dtype)

    monkeypatch.setattr(trainer, "run_validation", watched)
    return records


def assert_pipeline_is_made_of(pipe, name: str, frozen, denoiser, controlnet) -> None:
    assert getattr(pipe, DENOISER[name]) is denoiser is frozen.denoiser
    assert pipe.vae is frozen.vae
    assert pipe.controlnet is controlnet
    encoders = [getattr(pipe, attr, None) for attr in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    tokenizers = [getattr(pipe, attr, None) for attr in ("tokenizer", "tokenizer_2", "tokenizer_3")]
    n = len(frozen.text_encoders)
    assert all(a is b for a, b in zip(encoders, frozen.text_encoders)) and not any(encoders[n:])
    assert all(a is b for a, b in zip(tokenizers, frozen.tokenizers)) and not any(tokenizers[n:])
    shared = [k for k in frozen.scheduler.config if k in pipe.scheduler.config and not k.startswith("_")]
    assert shared and all(pipe.scheduler.config[k] == frozen.scheduler.config[k] for k in shared)


@pytest.mark.parametrize("text", ["cached", "encoded"])
@pytest.mark.parametrize("name", FAMILIES)
def test_validation_samples_with_the_training_modules_and_loads_nothing(built, name, text, tmp_path, monkeypatch):
    """Two steps, validation at the last (2 images, 2 steps): on the shards' cached prompt
    embeddings (no text encoders in memory) and with the text encoders."""
    from train.trainer import train

    base, out = built[name]
    records = watch_validation(monkeypatch)
    result = train(train_config(out, base, tmp_path / "run", cached_text_embeddings=text == "cached"),
                   log=lambda *_: None)
    assert result["global_step"] == 2 and (tmp_path / "run" / "validation" / "step-0000002.png").exists()
    assert len(records) == 1
    record = records[0]
    assert record["loads"] == []
    frozen = result["models"]["frozen"]
    assert record["frozen"] is frozen
    assert record["controlnet"] is result["models"]["controlnet"]
    assert (frozen.text_encoders == []) == (text == "cached")
    denoiser, controlnet = result["models"]["denoiser"], result["models"]["controlnet"]
    if frozen.family.SAMPLES_THROUGH_PIPELINE:
        assert len(record["pipes"]) == 1 and record["samples"] == []
        assert_pipeline_is_made_of(record["pipes"][0], name, frozen, denoiser, controlnet)
        return
    assert record["pipes"] == [] and len(record["samples"]) == 1  # as `sample` draws: train/sampler.py, paper mode
    drawn = record["samples"][0]
    assert drawn["mode"] == "paper" and len(drawn["controls"]) == 1 and drawn["controls"][0].model is controlnet
    assert drawn["frozen"].denoiser is denoiser is frozen.denoiser and drawn["frozen"].vae is frozen.vae
    assert all(a is b for a, b in zip(drawn["frozen"].text_encoders, frozen.text_encoders))
    assert len(drawn["frozen"].text_encoders) == len(frozen.text_encoders)


def test_validation_mode_reaches_the_sampler_and_is_refused_where_a_pipeline_samples(built, tmp_path, monkeypatch):
    """--validation-mode both on SD draws in that mode; on SD3 (validated through its
    diffusers pipeline, control in both branches) paper is refused before any model loads."""
    from train import families
    from train.errors import TrainError
    from train.trainer import train

    base, out = built["sd"]
    records = watch_validation(monkeypatch)
    train(train_config(out, base, tmp_path / "sd", validation_mode="both"), log=lambda *_: None)
    assert [s["mode"] for r in records for s in r["samples"]] == ["both"]

    base, out = built["sd3"]
    loads = []
    monkeypatch.setattr(type(families.detect(str(base))), "load", lambda *a, **k: loads.append(a))
    with pytest.raises(TrainError, match="--validation-mode paper: .*use --validation-mode both"):
        train(train_config(out, base, tmp_path / "sd3", validation_mode="paper"), log=lambda *_: None)
    assert loads == []


@pytest.mark.parametrize("load", ["scheduler", "vae", "tokenizer", "pipeline", "family"])
def test_the_check_catches_a_validation_that_loads(built, load, tmp_path, monkeypatch):
    """The check above is not vacuous: a validation that loads any part again fails it."""
    import diffusers
    import transformers

    from train import families
    from train.trainer import train

    base, out = built["sd"]

    def reload(frozen):
        path = frozen.pretrained
        if load == "scheduler":
            diffusers.DDIMScheduler.from_pretrained(path, subfolder="scheduler")
        elif load == "vae":
            diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae")
        elif load == "tokenizer":
            transformers.CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        elif load == "pipeline":
            diffusers.StableDiffusionControlNetPipeline.from_pretrained(path)
        else:
            families.load(path, torch.float32)

    family_cls = type(families.detect(str(base)))
    make_scheduler = family_cls.sampling_scheduler

    def reloading_scheduler(self, frozen):
        with contextlib.suppress(Exception):  # even a swallowed load is seen
            reload(frozen)
        return make_scheduler(self, frozen)

    records = watch_validation(monkeypatch)
    monkeypatch.setattr(family_cls, "sampling_scheduler", reloading_scheduler)
    train(train_config(out, base, tmp_path / "run"), log=lambda *_: None)
    assert len(records) == 1 and records[0]["loads"], f"a {load} load during validation went unseen"


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_loads_the_base_once_for_several_conditions(built, name, tmp_path, monkeypatch):
    """`controlforge sample` over 3 conditions in 2 batches: the base is loaded once
    (one `families.load`, each part's `from_pretrained` once), the ControlNet once, and
    no pipeline is loaded (flow families: one pipeline, built around those modules)."""
    import diffusers
    import transformers

    from train import families
    from train.config import SampleConfig
    from train.sample_cli import run_sample

    base, out = built[name]
    family = families.detect(str(base))
    frozen = family.load(str(base), torch.float32)
    family.new_controlnet(frozen, "zero").save_pretrained(tmp_path / "cn")
    del frozen

    loads, family_loads, parts, pipes = [], [], [], []
    load_base = families.load
    family_load = type(family).load
    monkeypatch.setattr(families, "load", lambda *a, **k: loads.append(a) or load_base(*a, **k))
    monkeypatch.setattr(type(family), "load", lambda *a, **k: family_loads.append(a) or family_load(*a, **k))
    for root in (diffusers.ModelMixin, transformers.PreTrainedModel):
        original = root.from_pretrained.__func__

        def counted(cls, *args, original=original, **kwargs):
            parts.append((cls.__name__, str(args[0]) if args else None, kwargs.get("subfolder")))
            return original(cls, *args, **kwargs)
        monkeypatch.setattr(root, "from_pretrained", classmethod(counted))

    def no_pipeline_load(cls, *args, **kwargs):
        raise AssertionError("sample loaded a pipeline")
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(no_pipeline_load))
    make_pipeline = type(family).pipeline
    monkeypatch.setattr(type(family), "pipeline", lambda self, *a, **k: pipes.append(a) or make_pipeline(self, *a, **k))

    shard = sorted((out / "shards").glob("*.tar"))
    records = run_sample(SampleConfig(pretrained_model=str(base), controlnet=[str(tmp_path / "cn")],
                                      shard=str(shard[0]), num=3, prompt_mode="default", steps=2, resolution=64,
                                      batch_size=2, output=str(tmp_path / "samples")), log=lambda *_: None)
    assert len(records) == 3
    assert len(loads) == 1 and len(family_loads) == 1
    assert len(parts) == len(set(parts)), f"a part loaded twice: {parts}"
    assert sum(sub is None for _, _, sub in parts) == 1  # the ControlNet, from its own folder
    assert len(pipes) == (1 if family.SAMPLES_THROUGH_PIPELINE else 0)
    for frozen, denoiser, *_ in pipes:
        assert denoiser is frozen.denoiser
