"""The build's plan: from a BuildConfig, where each model runs (one decision, made here)
and the list of steps with their own settings. This is the list the executors run.

    read_decode -> [caption] -> [clip_gate] -> [encode_latents] -> [encode_text] -> annotate_and_write

Decode first, then the model steps that read only the JPEGs and captions (captioner, CLIP
gate, VAE latents, prompt embeddings), then the step that makes every condition map and writes the shard: on a CPU
task, or with GPUs as the actor that holds the network annotators (the CPU annotators
run there too). So the models see no samples a cheaper gate would drop, and condition
maps never cross a task boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import BuildConfig
from stages.annotators import Annotator, create as create_annotators
from stages.read.http_fetch import HttpOptions
from stages.read.readers import InputRef
from stages.steps import (AnnotateAndWrite, Annotation, AnnotationSettings, Caption, CaptionPolicy, CaptionSettings,
                          ClipGate, ClipGateSettings, EncodeLatents, EncodeText, ReadDecode, ReadSettings, Step,
                          TextEmbeddingSettings, WriteSettings)
from stages.transform.decode import ResizeSpec


@dataclass(frozen=True)
class Placement:
    """Where the models run. GPUs 0 everywhere: the whole build runs in CPU tasks."""

    captioning: bool = False
    caption_gpus: float = 0.0  # GPUs per captioner actor
    caption_actors: int = 1
    annotator_gpus: float = 0.0  # GPU share of the actor holding the network annotators (0: in the CPU tasks)
    annotator_actors: int = 1  # actors holding the network annotators (and the GPU model gates)


def place(cfg: BuildConfig, refs: list[InputRef], annotators: dict[str, Annotator],
          cluster_gpus: float | None = None, local_gpus: int = 0) -> Placement:
    """The one placement decision of a build. `cluster_gpus`: the Ray cluster's GPUs, None
    for the local executor, where `local_gpus` (this machine's CUDA devices) decides: with
    one, the network annotators run batched on it, else one image at a time on the CPU.
    The captioner is skipped when every input already has a caption that is kept; by
    default it gets a GPU per actor and an actor per GPU, and the network annotators share
    half a GPU."""
    gpus = cluster_gpus or 0.0
    captioning = cfg.captioning and not (cfg.keep_captions and all(r.kind == "file" and r.caption is not None
                                                                   for r in refs))
    caption_gpus, caption_actors = 0.0, 1
    if captioning:
        caption_gpus = cfg.caption_num_gpus if cfg.caption_num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
        caption_actors = cfg.caption_concurrency or (max(1, int(gpus // caption_gpus)) if caption_gpus > 0 else 1)
    annotator_gpus = 0.0
    if cluster_gpus is not None and any(a.uses_model for a in annotators.values()):
        annotator_gpus = cfg.annotator_num_gpus if cfg.annotator_num_gpus is not None else (0.5 if gpus >= 1 else 0.0)
    elif local_gpus and any(a.uses_model for a in annotators.values()):
        annotator_gpus = 1.0
    annotator_actors = max(1, int(gpus // annotator_gpus)) if cluster_gpus and annotator_gpus > 0 else 1
    return Placement(captioning, caption_gpus, caption_actors, annotator_gpus, annotator_actors)


def read_settings(cfg: BuildConfig) -> ReadSettings:
    return ReadSettings(
        resize=ResizeSpec(cfg.resolution, cfg.resize_mode, cfg.min_size, cfg.max_aspect, cfg.max_pixels),
        http=HttpOptions(timeout=cfg.fetch_timeout, retries=cfg.fetch_retries, user_agent=cfg.user_agent,
                         respect_opt_out=cfg.respect_opt_out, allow_addresses=tuple(cfg.allow_address)),
        captions=CaptionPolicy(cfg.caption_model if cfg.captioning else None, cfg.keep_captions),
        jpeg_quality=cfg.jpeg_quality, image_column=cfg.image_column, caption_column=cfg.caption_column,
        bucket_resolution=cfg.resolution if cfg.resize_mode == "keep_ratio" else None,
        phash=cfg.near_duplicates is not None)


def make_steps(cfg: BuildConfig, placement: Placement = Placement(),
               annotators: dict[str, Annotator] | None = None) -> list[Step]:
    """The build's steps. `annotators`: the build's annotators, made once by the caller
    (made here from the config when not given)."""
    if annotators is None:
        annotators = create_annotators(cfg.conditions, cfg.annotator_params)
    for annotator in annotators.values():
        if annotator.uses_model:
            annotator.set_precision(cfg.annotator_dtype)
    model_gpus = placement.annotator_gpus or placement.caption_gpus
    steps: list[Step] = [ReadDecode(read_settings(cfg))]
    if placement.captioning:
        steps.append(Caption(CaptionSettings(cfg.caption_model, cfg.caption_prompt, cfg.caption_max_tokens,
                                             cfg.caption_beams, cfg.caption_batch_size, cfg.annotator_dtype),
                             placement.caption_gpus))
    if cfg.min_clip_score is not None:
        steps.append(ClipGate(ClipGateSettings(cfg.clip_model, cfg.min_clip_score, cfg.annotator_dtype), model_gpus))
    if cfg.latents:
        steps.append(EncodeLatents(cfg.latents, model_gpus))
    if cfg.text_embeddings:  # the training family's own encoder (train/ is below this floor; stages/ is not)
        from train.text_embeddings import PromptEncoder

        steps.append(EncodeText(TextEmbeddingSettings(cfg.text_embeddings, output=cfg.output), PromptEncoder,
                                model_gpus))
    on_gpu = {n: a for n, a in annotators.items() if a.uses_model} if placement.annotator_gpus else {}
    on_cpu = {n: a for n, a in annotators.items() if n not in on_gpu}
    gates = AnnotationSettings(cfg.seed, cfg.min_depth_std, cfg.min_condition_coverage)
    steps.append(AnnotateAndWrite(WriteSettings(cfg.output, cfg.seed, tuple(cfg.conditions)),
                                  Annotation(on_cpu, gates) if on_cpu else None,
                                  Annotation(on_gpu, gates, placement.annotator_gpus) if on_gpu else None))
    gate_actors = placement.annotator_actors if placement.annotator_gpus else placement.caption_actors
    for step in steps:  # one pool per actor step: an actor per GPU share it asks for
        step.concurrency = (placement.caption_actors if isinstance(step, Caption) else
                            placement.annotator_actors if isinstance(step, AnnotateAndWrite) else gate_actors)
    return steps
