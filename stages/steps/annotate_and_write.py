"""The last step: each sample's condition maps, the sample spooled to local disk, then
the shard tar and its stats (the shard's completion marker)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..shards.output import Output
from ..shards.writer import ShardWriter
from ..transform.decode import decode_rgb
from ..work import Sample, ShardWork
from .annotate import Annotation
from .base import Step, error_text, timed


@dataclass(frozen=True)
class WriteSettings:
    output: str  # the build's output folder (local path or fsspec URL)
    seed: int
    conditions: tuple[str, ...]  # every condition a sample must carry


class AnnotateAndWrite(Step):
    """Annotates and writes one shard; returns its stats. The CPU annotators (`cpu`) run on
    one sample at a time, from its stored JPEG. With GPUs, this step is the actor that
    holds the network annotators (`gpu`): they run on a chunk of samples at a time (their
    batch), which is then spooled, so no condition map ever leaves the task that made it.
    A task here holds the shard's JPEGs and one chunk's maps."""

    name = "annotate_and_write"

    def __init__(self, settings: WriteSettings, cpu: Annotation | None = None, gpu: Annotation | None = None):
        self.settings = settings
        self.cpu = cpu
        self.gpu = gpu
        self.num_gpus = gpu.num_gpus if gpu is not None else 0.0
        self.actor = gpu is not None

    def __call__(self, work: ShardWork) -> dict[str, Any]:
        s = self.settings
        writer = ShardWriter(Output(s.output), work, s.seed, list(s.conditions))
        size = self.gpu.chunk_size if self.gpu is not None else 1
        try:
            samples, work.samples = work.samples, []
            for start in range(0, len(samples), size):
                chunk = samples[start:start + size]
                samples[start:start + size] = [None] * len(chunk)  # their bytes go to the spool; no second reference
                if self.gpu is not None:
                    chunk = self.gpu.annotate_chunk(work, chunk)
                for sample in chunk:
                    if self.cpu is None or self._annotate_on_cpu(work, sample):
                        with timed(work, "write"):
                            writer.add(sample)
            return writer.finish()
        finally:
            writer.close()

    def _annotate_on_cpu(self, work: ShardWork, sample: Sample) -> bool:
        with timed(work, "decode"):
            try:
                image = decode_rgb(sample.jpg)
            except Exception as exc:
                work.reject(sample.source, "annotate", "decode_error", error_text(exc))
                return False
        return self.cpu.annotate_one(work, sample, image)
