"""Model families: what differs between base models, behind one declared interface
(`base.Family`), so the trainer, the sampler and validation run one loop for all. A family
is one module here holding a `Family` subclass; adding one is adding a file and a line in
FAMILIES.

The family is read from the base folder's `model_index.json` (`_class_name`), before any
model is loaded, so an unsupported base fails at once with a clear message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import Family, Noised, missing  # noqa: F401 (the interface, re-exported)


class FamilyError(ValueError):
    """A base model, ControlNet or setting the trainer cannot use; the message says why."""


@dataclass
class Frozen:
    """The frozen parts of a base model (loaded once), and its family."""

    family: Any
    pretrained: str
    tokenizers: list
    text_encoders: list
    vae: Any
    denoiser: Any  # the UNet (SD, SDXL) or transformer (SD3, Flux)
    scheduler: Any  # the training noise scheduler (DDPM, or flow matching)
    notes: set = field(default_factory=set)  # things said once (e.g. missing size records)
    #: the family's base_pipeline around these parts, made once
    base_pipe: Any = field(default=None, repr=False)
    #: (hidden, pooled or None): the stored empty-prompt embedding, when the run trains on the
    #: shards' cached prompt embeddings (then `text_encoders` is empty: they were never loaded)
    empty_text: Any = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


#: model_index.json _class_name -> "module.Class": the Family subclass in train/families/<module>.py
FAMILIES = {
    "StableDiffusionPipeline": "sd.SD",
    "StableDiffusionControlNetPipeline": "sd.SD",
    "StableDiffusionImg2ImgPipeline": "sd.SD",
    "StableDiffusionXLPipeline": "sdxl.SDXL",
    "StableDiffusionXLControlNetPipeline": "sdxl.SDXL",
    "StableDiffusionXLImg2ImgPipeline": "sdxl.SDXL",
    "StableDiffusion3Pipeline": "sd3.SD3",
    "StableDiffusion3ControlNetPipeline": "sd3.SD3",
    "FluxPipeline": "flux.Flux",
    "FluxControlNetPipeline": "flux.Flux",
}
DEFAULT = "sd.SD"  # a folder without model_index.json (what older controlforge runs assumed)


def pipeline_class_name(pretrained: str) -> str | None:
    """`_class_name` of the base's model_index.json (local folder or hub cache), or None."""
    path = os.path.join(pretrained, "model_index.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(pretrained, "model_index.json")
        except Exception:
            return None
    try:
        return json.loads(open(path).read()).get("_class_name")
    except (OSError, ValueError):
        return None


def family_class(spec: str) -> type[Family]:
    """The Family subclass a FAMILIES value ("module.Class") names."""
    import importlib

    module, name = spec.rsplit(".", 1)
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def detect(pretrained: str) -> Family:
    """The family of a base model, from its model_index.json, before any model loads."""
    name = pipeline_class_name(pretrained)
    if name is not None and name not in FAMILIES:
        raise FamilyError(f"{pretrained}: unknown base model type {name!r}; supported: {', '.join(sorted(FAMILIES))}")
    cls = family_class(FAMILIES.get(name, DEFAULT))
    if missing(cls):
        raise FamilyError(f"the {cls.__name__} family does not implement {', '.join(missing(cls))} "
                          f"(train/families/base.py declares what a family must have)")
    return cls()


def load(pretrained: str, dtype: torch.dtype, text: bool = True) -> Frozen:
    """`text=False`: without tokenizers and text encoders (the run has cached prompt embeddings)."""
    return detect(pretrained).load(pretrained, dtype, text)


def cast(added: dict | None, dtype: torch.dtype) -> dict | None:
    """Added conditioning (a dict of tensors, or None) in `dtype`."""
    return None if added is None else {k: v.to(dtype) for k, v in added.items()}


def initialise(layers, init: str) -> None:
    """The ControlNet's zero layers as the paper has them (`zero`: left at zero), or for
    the ablation (`random`) re-initialised with PyTorch's default (Kaiming-uniform) under
    a fixed seed, so noise reaches the base from step 0."""
    if init == "random":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            for layer in layers:
                layer.reset_parameters()
    elif init != "zero":
        raise FamilyError(f"controlnet init must be 'zero' or 'random', got {init!r}")


def load_text(family: Family, pretrained: str, dtype: torch.dtype) -> tuple[list, list]:
    """The base's tokenizers and text encoders alone (the family's `text_parts`), the
    encoders frozen, in eval mode, cast to `dtype`."""
    tokenizers, text_encoders = family.text_parts(pretrained)
    try:
        loaded_tokenizers = [cls.from_pretrained(pretrained, subfolder=sub) for cls, sub in tokenizers]
        encoders = [cls.from_pretrained(pretrained, subfolder=sub) for cls, sub in text_encoders]
    except (OSError, ValueError) as exc:
        raise load_error(pretrained, exc, family.EXAMPLE) from None
    for module in encoders:
        module.requires_grad_(False)
        module.eval()
    return loaded_tokenizers, [e.to(dtype) for e in encoders]


def text_only(family: Family, pretrained: str, dtype: torch.dtype) -> Frozen:
    """A Frozen holding only the tokenizers and text encoders (no VAE, denoiser or
    scheduler): what encoding prompts needs, e.g. `build --text-embeddings`."""
    tokenizers, encoders = load_text(family, pretrained, dtype)
    return Frozen(family, pretrained, tokenizers, encoders, None, None, None)


def load_frozen(family: Family, pretrained: str, dtype: torch.dtype, denoiser: tuple, scheduler,
                text: bool = True) -> Frozen:
    """A base's parts, each `(class, subfolder)` (the scheduler a class, from `scheduler/`),
    loaded, frozen, in eval mode; text encoders (the family's `text_parts`; none with
    `text=False`) and VAE cast to `dtype`. A part that cannot be loaded fails with
    `load_error`, naming the base and how to get it offline."""
    from diffusers import AutoencoderKL

    loaded_tokenizers, encoders = load_text(family, pretrained, dtype) if text else ([], [])
    try:
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae")
        net = denoiser[0].from_pretrained(pretrained, subfolder=denoiser[1])
        noise_scheduler = scheduler.from_pretrained(pretrained, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise load_error(pretrained, exc, family.EXAMPLE) from None
    for module in (vae, net):
        module.requires_grad_(False)
        module.eval()
    return Frozen(family, pretrained, loaded_tokenizers, encoders, vae.to(dtype), net, noise_scheduler)


def load_error(pretrained: str, exc: BaseException, example: str) -> FamilyError:
    return FamilyError(f"cannot load the base model {pretrained!r} ({type(exc).__name__}: {str(exc)[:200]}). "
                       f"Without hub access, download it elsewhere (`huggingface-cli download {example} --local-dir "
                       f"base`), copy the folder here and pass --pretrained-model ./base")
