"""Validation during training: sample the fixed held-out conditions with the models already
in memory, as `controlforge sample` would; re-annotate the samples for the controllability
curve and the stop signal; keep the best-scoring ControlNet in OUT/best. Also what
bench/reproduce.py uses to replay validation on saved checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from . import sampler, text_embeddings
from .checkpoints import save_model_atomic
from .config import TrainConfig

BEST_DIR = "best"  # OUT/best: the ControlNet that scored best at validation, beside the last one in OUT


def validation_batch(urls: list[str], cfg: TrainConfig, text: bool = False) -> dict[str, Any]:
    """Fixed validation conditions: the first samples of the first shard, centre-cropped;
    `text`: with their stored prompt embeddings (`text_embeds`, `text_pooled`) when every
    one has them (the run has no text encoders)."""
    import random

    import numpy as np
    import webdataset as wds

    from .data import collate, joint_crop_flip, to_tensors

    samples = []
    for sample in wds.WebDataset(urls[:1], shardshuffle=False, empty_check=False, nodesplitter=None).decode("pil"):
        image, cond = joint_crop_flip(np.asarray(sample["jpg"].convert("RGB")),
                                      np.asarray(sample[f"{cfg.condition}.png"].convert("RGB")),
                                      cfg.resolution, random.Random(0), False)
        item = {**dict(zip(("pixel_values", "conditioning_pixel_values"), to_tensors(image, cond))),
                "text": sample.get("txt", "")}
        if text and "text.npy" in sample and _same_text_model(sample.get("json"), cfg.pretrained_model):
            item["text_embeds"] = torch.from_numpy(np.asarray(sample["text.npy"], dtype=np.float32))
            if "text_pooled.npy" in sample:
                item["text_pooled"] = torch.from_numpy(np.asarray(sample["text_pooled.npy"], dtype=np.float32))
        samples.append(item)
        if len(samples) >= cfg.num_validation_images:
            break
    return collate(samples)


def _same_text_model(meta: Any, pretrained: str) -> bool:
    info = (json.loads(meta) if isinstance(meta, (bytes, str)) else meta or {}).get("text_embeddings") or {}
    return bool(info) and text_embeddings.same_model(info.get("model"), pretrained)


def run_validation(batch, cfg, accelerator, frozen, denoiser, controlnet, step, dtype) -> list:
    """Sample with the models already in memory (no second pipeline load), as `controlforge
    sample` would: through train/sampler.py in `--validation-mode` (default paper), or
    through the family's diffusers ControlNet pipeline for the families that sample so;
    save condition | result rows."""
    import numpy as np
    from PIL import Image

    family = frozen.family
    denoiser, controlnet = accelerator.unwrap_model(denoiser), accelerator.unwrap_model(controlnet)
    conditions = [Image.fromarray((c.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                  for c in batch["conditioning_pixel_values"]]
    mode = sampler.resolve_mode(cfg.validation_mode, family, "--validation-mode")
    with torch.autocast(accelerator.device.type, enabled=dtype != torch.float32):
        if family.SAMPLES_THROUGH_PIPELINE:
            images = _pipeline_validation(batch, cfg, accelerator.device, frozen, denoiser, controlnet, conditions)
        else:
            images = _sampler_validation(batch, cfg, accelerator.device, frozen, denoiser, controlnet, mode)
    size = cfg.resolution
    grid = Image.new("RGB", (2 * size, len(images) * size))
    for row, (cond, image) in enumerate(zip(conditions, images)):
        grid.paste(cond, (0, row * size))
        grid.paste(image, (size, row * size))
    folder = Path(cfg.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.png"
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
    return images


def _pipeline_validation(batch, cfg, device, frozen, denoiser, controlnet, conditions) -> list:
    """The family's diffusers ControlNet pipeline around the training objects (control in
    both CFG branches)."""
    family = frozen.family
    pipe = family.pipeline(frozen, denoiser, controlnet, family.sampling_scheduler(frozen))
    pipe.set_progress_bar_config(disable=True)
    prompts = ({"prompt": batch["text"]} if frozen.text_encoders else  # else the stored embeddings
               family.cached_prompt_args(frozen, pipe, batch["text_embeds"], batch.get("text_pooled"), device))
    return pipe(**prompts, **{family.CONTROL_IMAGE_ARG: conditions},
                num_inference_steps=cfg.validation_inference_steps, guidance_scale=cfg.validation_guidance_scale,
                generator=torch.Generator(device=device).manual_seed(cfg.seed), height=cfg.resolution,
                width=cfg.resolution, **family.EXTRA_PIPELINE_ARGS).images


def _sampler_validation(batch, cfg, device, frozen, denoiser, controlnet, mode: str) -> list:
    """train/sampler.py on the training objects, in `mode`; the negative branch gets the
    empty prompt (stored, when the run has no text encoders)."""
    import dataclasses

    family = frozen.family
    n = len(batch["text"])
    embeds = negative = None
    if not frozen.text_encoders:  # the stored embeddings of the prompts and of ""
        pooled = batch.get("text_pooled")
        embeds = (batch["text_embeds"].to(device), pooled.to(device) if pooled is not None else None)
        negative = family.empty_negative(frozen, n, device)
    scheduler = family.sampling_scheduler(frozen)
    condition = batch["conditioning_pixel_values"].to(device, next(denoiser.parameters()).dtype)
    result = sampler.sample(dataclasses.replace(frozen, denoiser=denoiser), scheduler,
                            [sampler.Control(controlnet, condition)], list(batch["text"]), "", mode,
                            cfg.validation_inference_steps, cfg.validation_guidance_scale, cfg.resolution,
                            cfg.resolution, torch.Generator().manual_seed(cfg.seed), embeds, negative)
    return result.images


def controllability_tracker(cfg: TrainConfig, resumed_at: int | None = None, log=print):
    """The tracker of the run's controllability (None where the condition has no metric).
    A run resumed at step `resumed_at` goes on from OUT/controllability.json: the
    validations up to that step (later ones belong to steps it trains again), so its
    record, stop signal and best pick are the uninterrupted run's."""
    from .metrics import METRICS, ConvergenceTracker

    metric = METRICS.get(cfg.condition)
    if metric is None:
        return None
    from stages.annotators import create

    annotator = create([cfg.condition], {cfg.condition: cfg.validation_annotator} if cfg.validation_annotator else {})
    tracker = ConvergenceTracker(metric.higher_is_better)
    tracker.annotator = annotator[cfg.condition]
    saved = Path(cfg.output_dir) / "controllability.json"
    if resumed_at is not None and saved.exists():
        try:
            record = json.loads(saved.read_text())
        except ValueError as exc:
            log(f"{saved}: unreadable ({exc}); the controllability record starts again at step {resumed_at}")
            return tracker
        if record.get("metric") == metric.name:
            tracker.restore(record, lambda step: step <= resumed_at)
    return tracker


def track_controllability(tracker, batch, images, cfg, step, accelerator, log, controlnet=None) -> bool:
    """Re-annotate the validation samples, log the metric, look for sudden convergence; keep
    the ControlNet that scored best so far in OUT/best (the weights validation sampled
    with, not the EMA copy), so a run that overshoots still has its best model."""
    import numpy as np

    from .metrics import METRICS, controllability_scores

    conditions = [(c.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for c in batch["conditioning_pixel_values"]]
    own, shuffled = controllability_scores(cfg.condition, tracker.annotator, conditions, images, seed=cfg.seed)
    before = tracker.converged_at
    tracker.add_scores(step, own, shuffled)  # the stop signal: own vs shuffled, paired over the images
    value = tracker.values[-1]
    name = METRICS[cfg.condition].name
    accelerator.log({f"controllability/{name}": value, f"controllability/{name}_shuffled": tracker.shuffled_values[-1]},
                    step=step)
    if tracker.converged_at is not None and before is None:
        log(f"sudden convergence detected at step {tracker.converged_at} ({name})")
    out = Path(cfg.output_dir)
    if controlnet is not None and tracker.last_is_best() and _beats_saved_best(out / BEST_DIR, step, tracker):
        best = out / BEST_DIR
        best.mkdir(parents=True, exist_ok=True)
        save_model_atomic(accelerator.unwrap_model(controlnet), best,
                          {"global_step": step, "metric": name, "value": value,
                           "shuffled": tracker.shuffled_values[-1] if tracker.shuffled_values else None,
                           "picked_by": "the best controllability on the validation samples so far"})
    partial = out / "controllability.json.partial"  # replaced whole: a kill mid-write leaves the last record
    partial.write_text(json.dumps({"metric": name, **tracker.to_json()}, indent=1))
    os.replace(partial, out / "controllability.json")
    tracker.plot(out / "controllability.png", f"{cfg.condition} {name}")
    return tracker.should_stop(step, cfg.stop_after_convergence)


def _beats_saved_best(folder: Path, step: int, tracker) -> bool:
    """Whether the latest score beats OUT/best's, as saved before a resume (a best saved at a
    later step than this one is another run's, and does not count)."""
    try:
        saved = json.loads((folder / "train_state.json").read_text())  # save_model_atomic's summary
    except (OSError, ValueError):
        return True
    if not saved or saved.get("global_step", step) >= step or saved.get("value") is None:
        return True
    value = tracker.values[-1]
    return value > saved["value"] if tracker.higher_is_better else value < saved["value"]
