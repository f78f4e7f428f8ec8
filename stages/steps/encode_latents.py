"""--latents MODEL: the VAE latents of every stored image, so training skips the encoder."""

from __future__ import annotations

from ..transform.decode import decode_rgb
from ..work import ShardWork
from .base import Step, batches_by_size, timed
from .clip_gate import CHUNK


class EncodeLatents(Step):
    """Batched by image size (keep_ratio builds have several), a chunk decoded at a time;
    a GPU actor when the cluster has GPUs."""

    name = "latents"

    def __init__(self, model: str, num_gpus: float = 0.0):
        from ..models.latents import LatentEncoder

        self.model, self.num_gpus, self.actor = model, num_gpus, num_gpus > 0
        self.encoder = LatentEncoder(model, "cuda" if num_gpus > 0 else None)

    def __call__(self, work: ShardWork) -> ShardWork:
        from ..models.latents import npy_bytes

        with timed(work, "latents"):
            for chunk in batches_by_size(work.samples, CHUNK):  # decoded images: one chunk at a time
                for sample, latent in zip(chunk, self.encoder([decode_rgb(s.jpg) for s in chunk])):
                    sample.latents, sample.latents_info = npy_bytes(latent), self.encoder.info(latent.shape)
        return work
