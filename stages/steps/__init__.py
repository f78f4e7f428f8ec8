"""The build's steps, one per file, each `ShardWork -> ShardWork` with one job and its own
typed settings (pipeline/plan.py makes them from the build config and lists them):

    read_decode          fetch, hash, de-duplicate, decode, validate, resize
    caption              BLIP captions (a model actor)
    clip_gate            --min-clip-score (a model actor on GPUs)
    encode_latents       --latents: VAE latents (a model actor on GPUs)
    encode_text          --text-embeddings: prompt embeddings (a model actor on GPUs)
    annotate_and_write   the condition maps, then the shard tar and its stats

Executors (pipeline/executors.py) run the same list locally or on Ray.
"""

from .annotate import Annotation, AnnotationSettings
from .annotate_and_write import AnnotateAndWrite, WriteSettings
from .base import Step
from .caption import Caption, CaptionSettings
from .clip_gate import ClipGate, ClipGateSettings
from .encode_latents import EncodeLatents
from .encode_text import EncodeText, TextEmbeddingSettings
from .read_decode import CaptionPolicy, ReadDecode, ReadSettings

__all__ = ["AnnotateAndWrite", "Annotation", "AnnotationSettings", "Caption", "CaptionPolicy", "CaptionSettings",
           "ClipGate", "ClipGateSettings", "EncodeLatents", "EncodeText", "ReadDecode", "ReadSettings", "Step",
           "TextEmbeddingSettings", "WriteSettings"]
