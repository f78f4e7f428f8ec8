"""Cached prompt embeddings (`build --text-embeddings MODEL`): each caption encoded once at
build time by the base's own text encoders, so training never loads them.

One encoder for both sides: `PromptEncoder` (what the build step runs) detects the base's
family as the trainer does (`families.detect`, from model_index.json), loads only its
tokenizers and text encoders (`families.text_only`) and calls the family's own
`encode_prompts`, the function the trainer calls when it encodes. The trainer side
(`cached_text`, `fit_base`) decides whether the shards' embeddings fit its base, and says
why not.

Layout (docs/SCHEMA.md): `KEY.text.npy` float16 [L, D] (the hidden states the denoiser
attends to), `KEY.text_pooled.npy` float16 [P] (the pooled embedding: SDXL, SD3, Flux), the json's
`text_embeddings: {model, family, shape, pooled_shape, precision}`; the empty prompt's
pair once per build beside manifest.json (`text_embeddings_empty.npy`,
`text_embeddings_empty_pooled.npy`).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stages.shards.layout import EMPTY_TEXT, EMPTY_TEXT_POOLED, SHARDS_DIR, TEXT_MEMBER, TEXT_POOLED_MEMBER

from . import families


class PromptEncoder:
    """Prompts -> float16 (hidden [L, D], pooled [P] or None) per prompt, through the base's
    text encoders alone, in batches; fp32 on a CPU, fp16 on CUDA. Made from the build
    step's settings (`model`, `batch_size`); loads on first use (a Ray actor loads it there)."""

    def __init__(self, settings: Any, device: str | None = None):
        self.model, self.batch_size = settings.model, getattr(settings, "batch_size", 16)
        self.device, self.frozen = device, None

    def check(self):
        """The base's family, once its tokenizers and its text encoders' configs are found
        (FamilyError, OSError or ValueError otherwise): what the driver runs before any
        shard, without loading an encoder's weights (T5-XXL alone is 19 GB in fp32)."""
        family = families.detect(self.model)  # FamilyError: an unknown base type, named
        if not family.CACHED_TEXT:
            raise families.FamilyError(f"--text-embeddings {self.model}: cached prompt embeddings are not made for "
                                       f"{family.TITLE} bases; leave the option out (training then encodes the "
                                       f"prompts)")
        tokenizers, encoders = family.text_parts(self.model)
        for cls, sub in tokenizers:
            cls.from_pretrained(self.model, subfolder=sub)
        for _, sub in encoders:  # a config read would not do: transformers returns defaults for a missing one
            if os.path.isdir(self.model):
                if not os.path.isfile(os.path.join(self.model, sub, "config.json")):
                    raise OSError(f"{self.model} has no {sub}/config.json: the base's text encoder {sub} is missing")
            else:
                from huggingface_hub import hf_hub_download

                hf_hub_download(self.model, f"{sub}/config.json")
        return family

    def setup(self) -> None:
        if self.frozen is not None:
            return
        family = self.check()
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        frozen = families.text_only(family, self.model, self.dtype)
        for encoder in frozen.text_encoders:
            encoder.to(self.device)
        self.frozen = frozen

    @property
    def family(self):
        return self.frozen.family

    def __call__(self, prompts: list[str]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        self.setup()
        out: list[tuple[np.ndarray, np.ndarray | None]] = []
        for start in range(0, len(prompts), self.batch_size):
            with torch.no_grad():
                hidden, pooled = self.family.encode_prompts(self.frozen, prompts[start:start + self.batch_size],
                                                            self.device)
            hidden = hidden.float().cpu().numpy().astype(np.float16)
            pooled = None if pooled is None else pooled.float().cpu().numpy().astype(np.float16)
            out.extend((h, None if pooled is None else pooled[i]) for i, h in enumerate(hidden))
        return out

    def info(self, hidden: np.ndarray, pooled: np.ndarray | None) -> dict[str, Any]:
        """The json record: which base made them, its family, the shapes, the precision run in."""
        record = {"model": self.model, "family": self.family.NAME, "shape": list(hidden.shape),
                  "precision": "fp16" if self.dtype == torch.float16 else "fp32"}
        if pooled is not None:
            record["pooled_shape"] = list(pooled.shape)
        return record

    def empty(self) -> dict[str, bytes]:
        """The empty prompt's embedding files (name -> .npy bytes), for beside manifest.json;
        made where the samples' are, by the same encoders in the same precision."""
        from stages.models.latents import npy_bytes

        hidden, pooled = self([""])[0]
        files = {EMPTY_TEXT: npy_bytes(hidden)}
        if pooled is not None:
            files[EMPTY_TEXT_POOLED] = npy_bytes(pooled)
        return files


# -- the trainer's side -------------------------------------------------------------------


@dataclass
class CachedText:
    """The shards' prompt embeddings as the first sample describes them, and the build's
    stored empty-prompt embedding (float32 tensors: hidden [L, D], pooled [P] or None)."""

    info: dict[str, Any]
    empty: tuple[torch.Tensor, torch.Tensor | None]

    def describe(self) -> str:
        return f"cached prompt embeddings from the shards ({self.info.get('model')})"


def same_model(recorded: Any, pretrained: str) -> bool:
    """The same hub id or path, or two paths to the same folder."""
    recorded = str(recorded)
    return recorded == pretrained or (os.path.exists(recorded) and os.path.exists(pretrained)
                                      and os.path.samefile(recorded, pretrained))


def build_folder(url: str) -> str:
    """The build folder (where manifest.json is) of a shard: the folder above shards/, else
    the shard's own folder."""
    folder = posixpath.dirname(url) if "://" in url else os.path.dirname(os.path.abspath(url))
    base = posixpath.basename(folder.rstrip("/")) if "://" in url else os.path.basename(folder)
    if base == SHARDS_DIR:
        folder = posixpath.dirname(folder.rstrip("/")) if "://" in url else os.path.dirname(folder)
    return folder


def _read_npy(url: str) -> np.ndarray | None:
    import fsspec

    try:
        with fsspec.open(url, "rb") as handle:
            return np.load(io.BytesIO(handle.read()), allow_pickle=False)
    except (OSError, ValueError):
        return None


def cached_text(urls: list[str], pretrained: str, family) -> tuple[CachedText | None, str]:
    """The shards' prompt embeddings when they fit this base as far as can be told before
    it loads (judged on the first sample: made with this base, of its family, the empty
    prompt's stored beside the manifest), else None; and why."""
    import webdataset as wds

    if not family.CACHED_TEXT:
        return None, f"cached prompt embeddings are not used for {family.TITLE} bases"
    if urls[0].startswith("pipe:"):
        return None, "the shards are read through a pipe: the build's empty-prompt embedding cannot be found"
    for sample in wds.WebDataset(urls[:1], shardshuffle=False, empty_check=False, nodesplitter=None):
        meta = json.loads(sample["json"]) if "json" in sample else {}
        info = meta.get("text_embeddings")
        if not info or TEXT_MEMBER not in sample:
            return None, "the shards hold no cached prompt embeddings"
        if not same_model(info.get("model"), pretrained):
            return None, (f"the shards' prompt embeddings were made with {info.get('model')!r}, not this base "
                          f"{pretrained!r}")
        if info.get("family") != family.NAME:
            return None, f"the shards' prompt embeddings are {info.get('family')}'s, this base is {family.NAME}"
        pooled = "pooled_shape" in info
        if pooled and TEXT_POOLED_MEMBER not in sample:
            return None, f"the first sample has no {TEXT_POOLED_MEMBER} though its json records a pooled shape"
        folder = build_folder(urls[0])
        empty = _read_npy(f"{folder}/{EMPTY_TEXT}")
        empty_pooled = _read_npy(f"{folder}/{EMPTY_TEXT_POOLED}") if pooled else None
        if empty is None or (pooled and empty_pooled is None):
            names = f"{EMPTY_TEXT} and {EMPTY_TEXT_POOLED}" if pooled else EMPTY_TEXT
            return None, (f"the build's empty-prompt embedding ({names}) is not in {folder}, beside its "
                          f"manifest.json: prompt dropout needs it")
        if list(empty.shape) != list(info.get("shape", [])) or (
                pooled and list(empty_pooled.shape) != list(info["pooled_shape"])):
            return None, (f"the stored empty-prompt embedding ({list(empty.shape)}) and the samples' "
                          f"({info.get('shape')}) differ in shape: made by different builds")
        return CachedText(info, (torch.from_numpy(empty.astype(np.float32)),
                                 None if empty_pooled is None else torch.from_numpy(empty_pooled.astype(np.float32)))
                          ), "they fit"
    return None, "the first shard is empty"


def fit_base(cached: CachedText, frozen) -> str | None:
    """Why the cached embeddings do not fit the loaded base's denoiser (hidden or pooled
    size), or None when they do."""
    dims = frozen.family.embedding_dims(frozen)
    if dims is None:
        return None
    hidden_dim, pooled_dim = dims
    shape, pooled = cached.info.get("shape", []), cached.info.get("pooled_shape")
    if not shape or shape[-1] != hidden_dim:
        return f"the shards' prompt embeddings are {shape}, the base's denoiser attends to {hidden_dim} features"
    if (pooled_dim is None) != (pooled is None) or (pooled is not None and pooled[-1] != pooled_dim):
        return f"the shards' pooled embeddings are {pooled}, the base takes {pooled_dim}"
    return None
