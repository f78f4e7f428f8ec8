"""ControlNet training as the paper does it: a frozen base (denoiser, VAE, text encoders),
a trainable ControlNet copied from it, 50 % empty prompts; what differs between base
models (the ControlNet, the noise, the loss) is the family's (train/families/).

Runs as one process, under `accelerate launch` (DDP on several GPUs), or inside a
Ray Train worker: the same function, Accelerator handles the distribution.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from . import families
from .config import TrainConfig
from .data import cached_latents_match, expand_shards, make_dataset, make_hf_dataset, make_loader


class TrainError(RuntimeError):
    """A run that cannot start; the message says why and what to do."""


class PromptDropout:
    """Which prompts become '' this step, per sample, from its own generator, whose
    state is saved with every checkpoint so a resumed run draws the same."""

    def __init__(self, rate: float, seed: int):
        self.rate = rate
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, prompts: list[str]) -> list[str]:
        drop = torch.rand(len(prompts), generator=self.generator) < self.rate
        return ["" if d else p for p, d in zip(prompts, drop.tolist())]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def checkpoints(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _resume_path(cfg: TrainConfig) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        found = checkpoints(Path(cfg.output_dir))
        return found[-1] if found else None
    path = Path(cfg.resume)
    if not path.is_dir():
        raise TrainError(f"--resume {cfg.resume}: no such checkpoint folder")
    return path


def train(cfg: TrainConfig, log=print, batches: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`batches`: train on these, cycled, instead of streaming the shards (benchmarks
    compare the two)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    output_dir = Path(cfg.output_dir)
    trackers = cfg.report_to if cfg.report_to != "none" and _tracker_available(cfg.report_to) else None
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),  # gloo DDP when launched on CPUs
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, log_with=trackers,
                              project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                  logging_dir=str(output_dir / "logs")))
    set_seed(cfg.seed + accelerator.process_index)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    urls = expand_shards(cfg.shards) if not cfg.dataset else []
    try:
        frozen = families.load(cfg.pretrained_model, weight_dtype)
        family = frozen.family
        family.check_resolution(frozen, cfg.resolution)
        family.check_settings(frozen, cfg)
        controlnet = family.make_controlnet(frozen, cfg.controlnet, cfg.controlnet_init)
        if cfg.controlnet:
            family.check_controlnet(frozen, controlnet, cfg.controlnet)
    except families.FamilyError as exc:
        raise TrainError(str(exc)) from None
    vae, denoiser = frozen.vae, frozen.denoiser
    log(f"base model: {frozen.family.NAME} ({cfg.pretrained_model})")
    controlnet.train()
    params = [{"params": list(controlnet.parameters()), "lr": cfg.learning_rate}]
    if cfg.unlock_decoder:  # the reference code's sd_locked=False: decoder trains too, at its own lr
        decoder = [p for m in (*denoiser.up_blocks, denoiser.conv_norm_out, denoiser.conv_out) for p in m.parameters()]
        for p in decoder:
            p.requires_grad_(True)
        params.append({"params": decoder, "lr": cfg.decoder_learning_rate})
    denoiser.to(torch.float32 if cfg.unlock_decoder else weight_dtype)
    if cfg.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    optimizer = _optimizer(cfg, params)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    if cfg.unlock_decoder:
        denoiser = accelerator.prepare(denoiser)
    if cfg.compile:
        controlnet = torch.compile(controlnet)
    dropout = PromptDropout(cfg.prompt_dropout, cfg.seed + accelerator.process_index)
    accelerator.register_for_checkpointing(dropout)
    ema = None
    if cfg.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(accelerator.unwrap_model(controlnet).parameters(), decay=cfg.ema_decay)
        accelerator.register_for_checkpointing(ema)
    device = accelerator.device
    for module in (*frozen.text_encoders, vae) + (() if cfg.unlock_decoder else (denoiser,)):
        module.to(device)

    global_step = 0
    resume_from = _resume_path(cfg)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        global_step = json.loads((resume_from / "controlforge_state.json").read_text())["global_step"]
        log(f"resumed from {resume_from} at step {global_step}")
    use_latents = False
    if urls and cfg.cached_latents and getattr(vae.config, "shift_factor", None):
        log("not using cached latents: this base's VAE has a shift factor that they do not include; encoding")
    elif urls and cfg.cached_latents:
        latent_shape = [vae.config.latent_channels, *(cfg.resolution // frozen.vae_scale_factor,) * 2]
        use_latents, why = cached_latents_match(urls, cfg.pretrained_model, vae.config.scaling_factor, latent_shape,
                                                cfg.resolution)
        if use_latents and cfg.flip:
            raise TrainError("--flip with cached latents: a flipped image's latent is not the flipped latent; "
                             "pass --no-flip, or --no-cached-latents to encode every (flipped) image")
        log(f"using {why}: no VAE encoder in the loop" + ("; random flips off" if cfg.flip_enabled else "")
            if use_latents else f"encoding images with the VAE ({why})")
    data_args = (cfg.condition, cfg.resolution, cfg.train_batch_size, cfg.seed, cfg.shuffle_buffer, cfg.flip_enabled,
                 global_step * cfg.gradient_accumulation_steps)
    dataset = (make_hf_dataset(cfg.dataset, *data_args) if cfg.dataset
               else make_dataset(urls, *data_args, latents=use_latents, buckets=cfg.buckets))
    loader = itertools.cycle(batches) if batches else make_loader(dataset, cfg.dataloader_num_workers, cfg.seed)
    validation_urls = expand_shards(cfg.validation_shards) if cfg.validation_shards else urls
    validation = (_validation_batch(validation_urls, cfg) if validation_urls and cfg.num_validation_images
                  and accelerator.is_main_process else None)
    tracker = _controllability_tracker(cfg) if validation is not None else None
    if trackers and accelerator.is_main_process:
        accelerator.init_trackers("controlforge", config={k: v for k, v in cfg.model_dump().items()
                                                          if isinstance(v, (int, float, str, bool))})

    progress = tqdm(total=cfg.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="train")
    started, losses, samples_seen, first_step = time.perf_counter(), [], 0, global_step
    step_times: list[float] = []  # perf_counter at the end of each optimiser step (benchmarks)
    for batch in loader:
        if global_step >= cfg.max_train_steps:
            break
        with accelerator.accumulate(controlnet):
            loss = family.loss(batch, cfg, frozen, denoiser, controlnet, dropout, device, weight_dtype, log)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_([p for g in params for p in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float().item())
        samples_seen += len(batch["text"]) * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        if ema is not None:
            ema.to(device)
            ema.step(accelerator.unwrap_model(controlnet).parameters())
        global_step += 1
        step_times.append(time.perf_counter())
        elapsed = step_times[-1] - started
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}",
                             steps_s=f"{(global_step - first_step) / elapsed:.2f}",
                             samples_s=f"{samples_seen / elapsed:.1f}")
        accelerator.log({"loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
        if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps:
            save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_total_limit,
                            ema_model=ema, controlnet=controlnet)
        if global_step % cfg.validation_steps == 0 and cfg.num_validation_images:
            stop = 0
            if validation is not None:
                images = run_validation(validation, cfg, accelerator, frozen, denoiser, controlnet, global_step,
                                        weight_dtype)
                if tracker is not None:
                    stop = int(_track_controllability(tracker, validation, images, cfg, global_step, accelerator, log))
            if _broadcast_flag(accelerator, stop):
                log(f"stopping {cfg.stop_after_convergence} steps after sudden convergence (step {global_step})")
                break
    progress.close()
    accelerator.wait_for_everyone()
    checksums = _rank_checksums(accelerator, accelerator.unwrap_model(controlnet))
    if len(set(checksums)) > 1:
        raise TrainError(f"ControlNet weights differ across ranks after training: {checksums}")
    if ema is not None:
        ema.copy_to(accelerator.unwrap_model(controlnet).parameters())  # the saved model is the EMA one
    if accelerator.is_main_process:
        accelerator.unwrap_model(controlnet).save_pretrained(output_dir)  # config.json + safetensors
        (output_dir / "train_state.json").write_text(json.dumps(
            {"global_step": global_step, "world_size": accelerator.num_processes, "rank_checksums": checksums}))
        log(f"saved ControlNet to {output_dir} ({accelerator.num_processes} process(es), weights agree)")
    accelerator.end_training()
    return {"global_step": global_step, "losses": losses, "output_dir": str(output_dir), "step_times": step_times,
            "models": {"controlnet": accelerator.unwrap_model(controlnet),
                       "denoiser": accelerator.unwrap_model(denoiser),
                       "vae": vae, "text_encoder": frozen.text_encoders[0], "frozen": frozen}}


def _rank_checksums(accelerator, model) -> list[float]:
    """One number per rank summarising the weights: DDP keeps them equal, and we check."""
    total = torch.zeros(1, dtype=torch.float64, device=accelerator.device)
    for p in model.parameters():
        total += p.detach().double().sum()
    return [float(x) for x in accelerator.gather(total).cpu()]


def _optimizer(cfg: TrainConfig, params):
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from None
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def _tracker_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard" if name == "tensorboard" else "wandb") is not None


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int | None, ema_model=None,
                    controlnet=None) -> None:
    """Model, optimizer, lr schedule, RNG states (and our prompt-dropout generator) via
    accelerate, plus the step, plus `controlnet/`: the weights as a ControlNet folder that
    `from_pretrained` (and `controlforge sample`) loads directly (the EMA weights when
    EMA is on, as the final model). At most `keep` checkpoints stay."""
    path = output_dir / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        if controlnet is not None:
            model = accelerator.unwrap_model(controlnet)
            if ema_model is not None:
                ema_model.store(model.parameters())
                ema_model.copy_to(model.parameters())
            model.save_pretrained(path / "controlnet")
            if ema_model is not None:
                ema_model.restore(model.parameters())
        (path / "controlforge_state.json").write_text(json.dumps({"global_step": step}))
        if keep:
            for old in checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)


def _validation_batch(urls: list[str], cfg: TrainConfig) -> dict[str, Any]:
    """Fixed validation conditions: the first samples of the first shard, centre-cropped."""
    import random

    import numpy as np
    import webdataset as wds

    from .data import collate, joint_crop_flip, to_tensors

    samples = []
    for sample in wds.WebDataset(urls[:1], shardshuffle=False, empty_check=False, nodesplitter=None).decode("pil"):
        image, cond = joint_crop_flip(np.asarray(sample["jpg"].convert("RGB")),
                                      np.asarray(sample[f"{cfg.condition}.png"].convert("RGB")),
                                      cfg.resolution, random.Random(0), False)
        samples.append({**dict(zip(("pixel_values", "conditioning_pixel_values"), to_tensors(image, cond))),
                        "text": sample.get("txt", "")})
        if len(samples) >= cfg.num_validation_images:
            break
    return collate(samples)


def run_validation(batch, cfg, accelerator, frozen, denoiser, controlnet, step, dtype) -> list:
    """Sample with the models already in memory (no second pipeline load), through the
    family's diffusers ControlNet pipeline; save condition | result rows."""
    import numpy as np
    from PIL import Image

    family = frozen.family
    pipe = family.pipeline(frozen, accelerator.unwrap_model(denoiser), accelerator.unwrap_model(controlnet),
                           family.sampling_scheduler(frozen))
    pipe.set_progress_bar_config(disable=True)
    conditions = [Image.fromarray((c.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                  for c in batch["conditioning_pixel_values"]]
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed)
    with torch.autocast(accelerator.device.type, enabled=dtype != torch.float32):
        images = pipe(prompt=batch["text"], **{family.CONTROL_IMAGE_ARG: conditions},
                      num_inference_steps=cfg.validation_inference_steps, guidance_scale=cfg.validation_guidance_scale,
                      generator=generator, height=cfg.resolution, width=cfg.resolution,
                      **family.EXTRA_PIPELINE_ARGS).images
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


def _controllability_tracker(cfg: TrainConfig):
    from .metrics import METRICS, ConvergenceTracker

    metric = METRICS.get(cfg.condition)
    if metric is None:
        return None
    from stages.annotators import create

    annotator = create([cfg.condition], {cfg.condition: cfg.validation_annotator} if cfg.validation_annotator else {})
    tracker = ConvergenceTracker(metric.higher_is_better)
    tracker.annotator = annotator[cfg.condition]
    return tracker


def _track_controllability(tracker, batch, images, cfg, step, accelerator, log) -> bool:
    """Re-annotate the validation samples, log the metric, look for sudden convergence."""
    import numpy as np

    from .metrics import METRICS, controllability

    conditions = [(c.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for c in batch["conditioning_pixel_values"]]
    value = controllability(cfg.condition, tracker.annotator, conditions, images, seed=cfg.seed)
    before = tracker.converged_at
    tracker.add(step, value)
    name = METRICS[cfg.condition].name
    accelerator.log({f"controllability/{name}": value}, step=step)
    if tracker.converged_at is not None and before is None:
        log(f"sudden convergence detected at step {tracker.converged_at} ({name})")
    out = Path(cfg.output_dir)
    (out / "controllability.json").write_text(json.dumps({"metric": name, **tracker.to_json()}, indent=1))
    tracker.plot(out / "controllability.png", f"{cfg.condition} {name}")
    return tracker.should_stop(step, cfg.stop_after_convergence)


def _broadcast_flag(accelerator, flag: int) -> bool:
    """The main process decides; every rank must leave the loop together."""
    if accelerator.num_processes == 1:
        return bool(flag)
    from accelerate.utils import broadcast

    return bool(broadcast(torch.tensor([flag], device=accelerator.device)).item())

