"""BLIP captions for the samples that still lack one (a model actor: one BLIP per actor)."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.captioner import BlipCaptioner, CaptionModelError
from ..transform.decode import decode_rgb
from ..work import ShardWork
from .base import Step, error_text, timed


@dataclass(frozen=True)
class CaptionSettings:
    model: str
    prompt: str = ""
    max_tokens: int = 40
    beams: int = 3
    batch_size: int = 16
    precision: str = "auto"  # fp32 | fp16 | bf16 | auto (fp16 on CUDA)


class Caption(Step):
    """Captions in batches of `batch_size`, decoded one batch at a time; a failing batch
    costs its samples only, a model that cannot load stops the build."""

    name = "caption"
    actor = True

    def __init__(self, settings: CaptionSettings, num_gpus: float = 0.0):
        self.settings = settings
        self.num_gpus = num_gpus
        self.captioner = BlipCaptioner(settings.model, "cuda" if num_gpus > 0 else None, settings.prompt,
                                       settings.max_tokens, settings.beams, settings.batch_size, settings.precision)

    def __call__(self, work: ShardWork) -> ShardWork:
        todo = [s for s in work.samples if s.caption is None]
        failed: set[str] = set()
        size = max(1, self.settings.batch_size)
        for start in range(0, len(todo), size):  # decoded images: one batch's worth at a time
            chunk = todo[start:start + size]
            with timed(work, "caption"):
                try:
                    captions = self.captioner([decode_rgb(s.jpg) for s in chunk])
                except CaptionModelError:
                    raise  # a config problem: stop the build with its message
                except Exception as exc:  # costs this batch only
                    for s in chunk:
                        work.reject(s.source, "caption", "caption_error", error_text(exc))
                        failed.add(s.key)
                    continue
            for sample, caption in zip(chunk, captions):
                sample.caption = caption
                sample.caption_precision = self.captioner.resolved_precision
        if failed:
            work.samples = [s for s in work.samples if s.key not in failed]
        return work
