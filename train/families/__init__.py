"""Model families: what differs between base models, behind one small interface, so the
trainer, the sampler and validation run one loop for all. A family is one module here;
adding one is adding a file and a line in FAMILIES.

The family is read from the base folder's `model_index.json` (`_class_name`), before any
model is loaded, so an unsupported base fails at once with a clear message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch


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
    unet: Any
    scheduler: Any  # the training noise scheduler (DDPM)
    notes: set = field(default_factory=set)  # things said once (e.g. missing size records)
    #: the family's diffusers pipeline around these parts, made once, for its encode_prompt
    prompt_pipe: Any = field(default=None, repr=False)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


#: model_index.json _class_name -> family module (train/families/<module>.py)
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionControlNetPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLControlNetPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3ControlNetPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxControlNetPipeline": "flux",
}
NOT_YET: dict[str, str] = {}


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


def detect(pretrained: str):
    """The family module of a base model. A folder without model_index.json is taken as
    SD 1.x/2.x (what older controlforge runs assumed)."""
    import importlib

    name = pipeline_class_name(pretrained)
    if name in NOT_YET:
        raise FamilyError(f"{pretrained}: {name} ({NOT_YET[name]}) bases are not supported by the trainer yet; "
                          f"supported: SD 1.x/2.x, SDXL, SD3 and Flux ({', '.join(sorted(FAMILIES))})")
    if name is not None and name not in FAMILIES:
        raise FamilyError(f"{pretrained}: unknown base model type {name!r}; supported: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(f"{__name__}.{FAMILIES.get(name, 'sd')}")


def load(pretrained: str, dtype: torch.dtype) -> Frozen:
    return detect(pretrained).load(pretrained, dtype)


def check_resolution(frozen: Frozen, resolution: int) -> None:
    """The latent must halve evenly through every UNet level (or split into patches)."""
    if hasattr(frozen.family, "check_resolution"):
        return frozen.family.check_resolution(frozen, resolution)
    levels = len(frozen.unet.config.down_block_types) - 1
    step = frozen.vae_scale_factor * 2 ** levels
    if resolution % step:
        raise FamilyError(f"resolution {resolution} does not fit {frozen.pretrained}: it must be a multiple of {step} "
                          f"(VAE factor {frozen.vae_scale_factor} x 2^{levels} UNet levels)")


def check_controlnet(frozen: Frozen, controlnet, where: str) -> None:
    """A ControlNet made for another family (or another base size) fails here, named."""
    if hasattr(frozen.family, "check_controlnet"):
        return frozen.family.check_controlnet(frozen, controlnet, where)
    if type(controlnet).__name__ != "ControlNetModel":
        raise FamilyError(f"{where}: this ControlNet was made for another kind of base model "
                          f"({type(controlnet).__name__}; the base {frozen.pretrained} is {frozen.family.NAME})")
    unet, net = frozen.unet.config, controlnet.config
    for key in ("cross_attention_dim", "addition_embed_type", "in_channels"):
        if net.get(key) != unet.get(key):
            raise FamilyError(f"{where}: this ControlNet was made for another kind of base model ({key} is "
                              f"{net.get(key)!r}, the base {frozen.pretrained} has {unet.get(key)!r})")
    factor = 2 ** (len(net.conditioning_embedding_out_channels) - 1)
    if factor != frozen.vae_scale_factor:
        raise FamilyError(f"{where}: its condition encoder shrinks images by {factor}, but the base's VAE by "
                          f"{frozen.vae_scale_factor}: this ControlNet was trained for another base model")


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


def load_frozen(family, pretrained: str, dtype: torch.dtype, example: str, tokenizers: list, text_encoders: list,
                denoiser: tuple, scheduler) -> Frozen:
    """A base's parts, each `(class, subfolder)` (the scheduler a class, from `scheduler/`),
    loaded, frozen, in eval mode; text encoders and VAE cast to `dtype`. A part that cannot
    be loaded fails with `load_error`, naming the base and how to get it offline."""
    from diffusers import AutoencoderKL

    try:
        loaded_tokenizers = [cls.from_pretrained(pretrained, subfolder=sub) for cls, sub in tokenizers]
        encoders = [cls.from_pretrained(pretrained, subfolder=sub) for cls, sub in text_encoders]
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae")
        net = denoiser[0].from_pretrained(pretrained, subfolder=denoiser[1])
        noise_scheduler = scheduler.from_pretrained(pretrained, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise load_error(pretrained, exc, example) from None
    for module in (*encoders, vae, net):
        module.requires_grad_(False)
        module.eval()
    return Frozen(family, pretrained, loaded_tokenizers, [e.to(dtype) for e in encoders], vae.to(dtype), net,
                  noise_scheduler)


def load_error(pretrained: str, exc: BaseException, example: str) -> FamilyError:
    return FamilyError(f"cannot load the base model {pretrained!r} ({type(exc).__name__}: {str(exc)[:200]}). "
                       f"Without hub access, download it elsewhere (`huggingface-cli download {example} --local-dir "
                       f"base`), copy the folder here and pass --pretrained-model ./base")
