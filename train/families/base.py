"""The interface every model family implements in full: what the trainer, validation and
`controlforge sample` ask of a base model, and nothing else. A family is a subclass of
`Family` in its own module, named in FAMILIES (train/families/__init__.py); `missing`
says what a family leaves out, and `detect` refuses such a family before any model loads.

`sd.SD` holds the UNet (DDPM) path, which `sdxl.SDXL` builds on; `flow.Flow` the
rectified-flow path shared by `sd3.SD3` and `flux.Flux`.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

    from . import Frozen


class Noised(NamedTuple):
    """A training step's noisy input: `sigmas` (shaped to broadcast over the latents) for
    flow-matching families, None for DDPM ones."""

    noisy: Any
    noise: Any
    timesteps: Any
    sigmas: Any = None


class Family(abc.ABC):
    """One kind of base model. Subclasses set every attribute below and implement every
    abstract method; a family's methods take the loaded `Frozen` parts, never keep state."""

    #: short name, shown in logs and errors ("sd", "sdxl", ...)
    NAME: str
    #: how errors name the family ("SD 1.x/2.x", "SD3", ...)
    TITLE: str
    #: the diffusers ControlNet pipeline class this family samples (and validates) with
    PIPELINE: str
    #: the diffusers pipeline class of the base alone (no ControlNet)
    BASE_PIPELINE: str
    #: the keyword of that pipeline's condition image
    CONTROL_IMAGE_ARG: str
    #: further keywords that pipeline is called with
    EXTRA_PIPELINE_ARGS: dict
    #: a hub id of such a base, for the "download it elsewhere" message
    EXAMPLE: str
    #: True: `controlforge sample` draws through `pipeline`/`base_pipeline` (control in both
    #: CFG branches only); False: through train/sampler.py with its guidance modes
    SAMPLES_THROUGH_PIPELINE: bool
    #: whether training takes the shards' cached prompt embeddings (`build --text-embeddings`)
    #: for this family; False: it encodes the prompts and says why
    CACHED_TEXT: bool = False

    # -- loading and checks --------------------------------------------------------------

    @abc.abstractmethod
    def load(self, pretrained: str, dtype: torch.dtype, text: bool = True) -> Frozen:
        """The base's frozen parts (see `families.load_frozen`), with `family` = self;
        `text=False`: without the tokenizers and text encoders."""

    @abc.abstractmethod
    def text_parts(self, pretrained: str) -> tuple[list, list]:
        """The base's tokenizers and text encoders, each a `(class, subfolder)` list: what
        `load` loads for prompts, and all that `build --text-embeddings` loads."""

    @abc.abstractmethod
    def check_settings(self, frozen: Frozen, cfg) -> None:
        """Raise FamilyError for a training setting (TrainConfig) this family cannot use."""

    @abc.abstractmethod
    def check_resolution(self, frozen: Frozen, resolution: int) -> None:
        """Raise FamilyError when images of this size do not fit the denoiser."""

    @abc.abstractmethod
    def check_controlnet(self, frozen: Frozen, controlnet, where: str) -> None:
        """Raise FamilyError (naming `where`) for a ControlNet made for another base."""

    # -- training ------------------------------------------------------------------------

    @abc.abstractmethod
    def encode_prompts(self, frozen: Frozen, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> (the text hidden states the denoiser attends to, the pooled embedding or
        None): the text encoders' work alone, what `build --text-embeddings` stores."""

    @abc.abstractmethod
    def conditioning(self, frozen: Frozen, prompts: list[str], device, sizes: Any = None,
                     target: tuple[int, int] | None = None, embeds: tuple | None = None
                     ) -> tuple[torch.Tensor, dict | None]:
        """Prompts -> (text hidden states, added conditioning or None). `sizes`: the batch's
        recorded original sizes and crops (SDXL); `target`: the (h, w) being made; `embeds`:
        the prompts' `encode_prompts` result made already (cached), used instead of encoding."""

    def embedding_dims(self, frozen: Frozen) -> tuple[int, int | None] | None:
        """(hidden size, pooled size or None) of the prompt embeddings this base's denoiser
        takes, from its config (no text encoder needed), or None where not known."""
        return None

    def batch_conditioning(self, frozen: Frozen, batch, dropout, device, sizes: Any = None,
                           target: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict | None]:
        """A training batch's conditioning, with prompt dropout: from the batch's cached prompt
        embeddings when it has them (a dropped prompt gets the stored empty-prompt embedding,
        `frozen.empty_text`; the dropout draws are the same as for encoded prompts), else
        the prompts encoded."""
        import torch

        if "text_embeds" not in batch:
            return self.conditioning(frozen, dropout(batch["text"]), device, sizes, target)
        drop = torch.tensor(dropout.drops(len(batch["text"])), device=device)
        empty_hidden, empty_pooled = frozen.empty_text
        hidden = torch.where(drop.view(-1, 1, 1), empty_hidden.to(device), batch["text_embeds"].to(device))
        pooled = None if empty_pooled is None else torch.where(drop.view(-1, 1), empty_pooled.to(device),
                                                               batch["text_pooled"].to(device))
        return self.conditioning(frozen, batch["text"], device, sizes, target, embeds=(hidden, pooled))

    @abc.abstractmethod
    def noisy_latents(self, frozen: Frozen, latents: torch.Tensor, cfg, device) -> Noised:
        """The noise, timesteps and noisy latents of one training step."""

    @abc.abstractmethod
    def loss(self, batch, cfg, frozen: Frozen, denoiser, controlnet, dropout, device, dtype,
             log=print) -> torch.Tensor:
        """One step's loss on `batch`; `dropout` empties prompts, `log` says things once."""

    @abc.abstractmethod
    def controlnet_class(self):
        """The diffusers class of this family's ControlNets."""

    @abc.abstractmethod
    def new_controlnet(self, frozen: Frozen, init: str):
        """A fresh ControlNet copied from the base's denoiser; `init` as `families.initialise`."""

    def load_controlnet(self, path: str):
        """A saved ControlNet (folder or hub id) of this family's class."""
        from . import FamilyError

        try:
            return self.controlnet_class().from_pretrained(path)
        except (OSError, ValueError, TypeError) as exc:
            raise FamilyError(f"cannot load {path!r} as a ControlNet for this {self.TITLE} base (made for another "
                              f"kind of base model?): {type(exc).__name__}: {str(exc)[:200]}") from None

    def make_controlnet(self, frozen: Frozen, controlnet: str | None, init: str):
        """The ControlNet a run trains: the saved one at `controlnet`, else a new one."""
        return self.load_controlnet(controlnet) if controlnet else self.new_controlnet(frozen, init)

    # -- validation and sampling ---------------------------------------------------------

    def cached_prompt_args(self, frozen: Frozen, pipe, hidden, pooled, device) -> dict:
        """The ControlNet pipeline's prompt keywords from stored embeddings, for a run whose
        text encoders are not loaded: the prompts' hidden states, and for the negative branch
        the stored empty prompt's (what the pipeline encodes when given no negative prompt)."""
        return {"prompt_embeds": hidden.to(device),
                "negative_prompt_embeds": self.empty_negative(frozen, hidden.shape[0], device)[0]}

    def empty_negative(self, frozen: Frozen, n: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored empty prompt's (hidden, pooled or None), `n` times: the negative CFG
        branch of a run without text encoders."""
        hidden, pooled = frozen.empty_text
        return hidden.expand(n, -1, -1).to(device), None if pooled is None else pooled.expand(n, -1).to(device)


    @abc.abstractmethod
    def sampling_scheduler(self, frozen: Frozen):
        """The inference scheduler, made from the training scheduler's config (no reload)."""

    @abc.abstractmethod
    def pipeline_parts(self, frozen: Frozen, denoiser, scheduler) -> dict:
        """The keyword arguments both diffusers pipelines take but the ControlNet."""

    def pipeline(self, frozen: Frozen, denoiser, controlnet, scheduler):
        """The family's diffusers ControlNet pipeline (PIPELINE) around these models."""
        import diffusers

        return getattr(diffusers, self.PIPELINE)(controlnet=controlnet,
                                                 **self.pipeline_parts(frozen, denoiser, scheduler))

    def base_pipeline(self, frozen: Frozen):
        """The base's own diffusers pipeline (BASE_PIPELINE), without a ControlNet, made once
        and kept on `frozen`: prompts are encoded with it (flow families), and the base alone
        samples through it. A text-only Frozen (`families.text_only`: `build --text-embeddings`)
        gets a pipeline of its tokenizers and text encoders alone, enough for `encode_prompt`."""
        if frozen.base_pipe is None:
            import diffusers

            text_only = frozen.denoiser is None
            scheduler = None if text_only else self.sampling_scheduler(frozen)
            denoiser = ConfigOnly.read(frozen.pretrained) if text_only else frozen.denoiser
            frozen.base_pipe = getattr(diffusers, self.BASE_PIPELINE)(
                **self.pipeline_parts(frozen, denoiser, scheduler))
        return frozen.base_pipe


class ConfigOnly:
    """A denoiser's config without its weights, standing in for it in a text-only pipeline:
    `encode_prompt` reads sizes from it (SD3 without T5 makes T5's zeros
    joint_attention_dim wide), and nothing a text encoder does needs the weights."""

    def __init__(self, config: dict):
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(config)

    @classmethod
    def read(cls, pretrained: str) -> "ConfigOnly | None":
        """The base's transformer (or UNet) config.json, from its folder or the hub cache;
        None where it has none."""
        import json
        import os

        for folder in ("transformer", "unet"):
            path = os.path.join(pretrained, folder, "config.json")
            if not os.path.isfile(path):
                try:
                    from huggingface_hub import hf_hub_download

                    path = hf_hub_download(pretrained, f"{folder}/config.json")
                except Exception:
                    continue
            return cls(json.loads(open(path).read()))
        return None


def missing(family) -> list[str]:
    """What `family` (a class or an instance) leaves out of the interface: attributes it
    does not set and methods still abstract. Empty for a complete family."""
    cls = family if isinstance(family, type) else type(family)
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        return [f"not a subclass of {Family.__module__}.Family"]
    declared = {name for klass in cls.__mro__ for name in vars(klass)}  # what the class and its bases set
    unset = [name for name in Family.__annotations__ if name not in declared]
    return unset + sorted(cls.__abstractmethods__)
