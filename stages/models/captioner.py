"""BLIP captions through transformers, batched; one model per worker."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .precision import resolve, torch_dtype


class CaptionModelError(RuntimeError):
    """The caption model cannot be loaded; the message says how to fix it."""


def load_error(name: str, exc: Exception) -> CaptionModelError:
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return CaptionModelError(
        f"cannot load caption model {name!r}: {type(exc).__name__}: {exc}\n"
        f"{'Hugging Face Hub access is off (HF_HUB_OFFLINE). ' if offline else ''}"
        "On a machine without hub access, download it elsewhere "
        "(`huggingface-cli download Salesforce/blip-image-captioning-base --local-dir blip`), copy the folder here "
        "and pass `--caption-model ./blip`; or skip captioning with `--caption-model none`, "
        "or use the captions that come with the input with `--keep-captions`."
    )


class BlipCaptioner:
    """Loads lazily: a build whose inputs all carry captions never loads BLIP."""

    def __init__(self, model: str, device: str | None = None, prompt: str = "", max_new_tokens: int = 40,
                 num_beams: int = 3, batch_size: int = 16, precision: str = "auto"):
        resolve(precision, "cpu")  # an unknown name fails here, not in a worker
        self.model_name = model
        self.precision = precision
        self.device = device
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.batch_size = batch_size
        self._model = None
        self._processor = None

    def load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.resolved_precision = resolve(self.precision, device)
        dtype = torch_dtype(self.resolved_precision)
        try:
            self._processor = BlipProcessor.from_pretrained(self.model_name)
            model = BlipForConditionalGeneration.from_pretrained(self.model_name, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise load_error(self.model_name, exc) from None
        self._model = model.to(device).eval()
        self.device, self._dtype = device, dtype

    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        if not images:
            return []
        self.load()
        import torch

        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start:start + self.batch_size])
            kwargs = {"text": [self.prompt] * len(chunk)} if self.prompt else {}
            inputs = self._processor(images=chunk, return_tensors="pt", **kwargs).to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
            with torch.inference_mode():
                out = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                           do_sample=False)
            texts = self._processor.batch_decode(out, skip_special_tokens=True)
            captions.extend(" ".join(t.split()) for t in texts)
        return captions
