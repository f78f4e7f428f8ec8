"""--text-embeddings MODEL: each sample's prompt embeddings, so training needs no text encoder.

The encoder is the training family's own (`train/text_embeddings.py:PromptEncoder`: the
base's family detected as the trainer detects it, its `encode_prompts`); the plan hands
it in as `encoder` (a class or factory taking these settings and a device), so this
floor imports nothing from train/. Placed like the latents step: after the captioner and
the gates, batched, an actor on a GPU when the cluster has GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..work import ShardWork
from .base import Step, timed


@dataclass(frozen=True)
class TextEmbeddingSettings:
    model: str  # the base model (diffusers folder or hub id) whose text encoders encode the captions
    batch_size: int = 16  # prompts per encoder forward pass
    output: str | None = None  # the build's output URL: the empty prompt's embedding is written there once


class EncodeText(Step):
    """Every sample's caption ('' where it has none) through the base's text encoders:
    `KEY.text.npy` (float16 [L, D]), `KEY.text_pooled.npy` (float16 [P]) where the family
    has a pooled embedding, and `text_embeddings` in the json."""

    name = "text_embeddings"

    def __init__(self, settings: TextEmbeddingSettings, encoder: Callable[..., Any], num_gpus: float = 0.0):
        self.settings, self.num_gpus, self.actor = settings, num_gpus, num_gpus > 0
        self.encoder = encoder(settings, "cuda" if num_gpus > 0 else None)  # loads its models on first use
        self.empty_written = False

    def __call__(self, work: ShardWork) -> ShardWork:
        from ..models.latents import npy_bytes

        with timed(work, "text_embeddings"):
            encoded = self.encoder([s.caption or "" for s in work.samples])  # batched inside
            for sample, (hidden, pooled) in zip(work.samples, encoded):
                sample.text_embeddings = npy_bytes(hidden)
                sample.text_pooled = None if pooled is None else npy_bytes(pooled)
                sample.text_info = self.encoder.info(hidden, pooled)
            self.write_empty()
        return work

    def write_empty(self) -> None:
        """The empty prompt's embedding beside manifest.json, for prompt dropout, before this
        actor's first shard is written: made here, where the encoders are loaded (on a GPU
        when the build has one), not on the driver. Every actor makes the same bytes, so two
        that race write the same file."""
        if self.empty_written or not self.settings.output:
            return
        from ..shards.layout import EMPTY_TEXT
        from ..shards.output import Output

        out = Output(self.settings.output)
        if not out.exists(EMPTY_TEXT):
            for name, data in self.encoder.empty().items():
                out.write_atomic(name, data)
        self.empty_written = True
