"""ControlNet training as the paper does it: frozen SD (UNet, VAE, text encoder), a
trainable copy of the UNet encoder joined by zero convolutions
(`ControlNetModel.from_unet`), noise-prediction MSE, 50 % empty prompts.

Runs as one process, under `accelerate launch` (DDP on several GPUs), or inside a
Ray Train worker: the same function, Accelerator handles the distribution.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

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


def load_frozen(pretrained: str, dtype: torch.dtype):
    """SD 1.x/2.x parts as a tuple (tokenizer, text encoder, VAE, UNet, noise scheduler);
    other families: `families.load`."""
    from . import families

    try:
        frozen = families.load(pretrained, dtype)
    except families.FamilyError as exc:
        raise TrainError(str(exc)) from None
    if len(frozen.text_encoders) != 1:
        raise TrainError(f"{pretrained}: a {frozen.family.NAME} base; use train.families.load for it")
    return frozen.tokenizers[0], frozen.text_encoders[0], frozen.vae, frozen.unet, frozen.scheduler


def make_controlnet(unet, controlnet: str | None = None, vae_scale_factor: int = 8, init: str = "zero"):
    """The trainable copy of the UNet encoder. Its condition encoder must shrink the
    condition image by the VAE's factor (SD's is 8; a tiny base may use 4), so its stride-2
    convolutions are cut to log2(factor). `init="random"` re-initialises the zero
    convolutions (an ablation of the paper's design: noise reaches the UNet at step 0)."""
    from diffusers import ControlNetModel

    if controlnet:
        try:
            return ControlNetModel.from_pretrained(controlnet)
        except (OSError, ValueError, TypeError) as exc:
            raise TrainError(f"cannot load ControlNet {controlnet!r} (made for another kind of base model?): "
                             f"{type(exc).__name__}: {str(exc)[:200]}") from None
    levels = int(round(math.log2(vae_scale_factor)))
    if 2 ** levels != vae_scale_factor or levels < 1:
        raise TrainError(f"the VAE's downsampling factor {vae_scale_factor} is not a power of two >= 2")
    channels = (16, 32, 96, 256, 256, 256)[:levels + 1]
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    try:
        families.initialise((*net.controlnet_down_blocks, net.controlnet_mid_block,
                             net.controlnet_cond_embedding.conv_out), init)
    except families.FamilyError as exc:
        raise TrainError(str(exc)) from None
    return net


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


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
        families.check_resolution(frozen, cfg.resolution)
        if hasattr(frozen.family, "check"):
            frozen.family.check(frozen, cfg)
        if hasattr(frozen.family, "make_controlnet"):
            controlnet = frozen.family.make_controlnet(frozen, cfg.controlnet, cfg.controlnet_init)
        else:
            controlnet = make_controlnet(frozen.unet, cfg.controlnet, frozen.vae_scale_factor, cfg.controlnet_init)
        if cfg.controlnet:
            families.check_controlnet(frozen, controlnet, cfg.controlnet)
    except families.FamilyError as exc:
        raise TrainError(str(exc)) from None
    vae, unet, noise_scheduler = frozen.vae, frozen.unet, frozen.scheduler
    log(f"base model: {frozen.family.NAME} ({cfg.pretrained_model})")
    controlnet.train()
    params = [{"params": list(controlnet.parameters()), "lr": cfg.learning_rate}]
    if cfg.unlock_decoder:  # the reference code's sd_locked=False: decoder trains too, at its own lr
        decoder = [p for m in (*unet.up_blocks, unet.conv_norm_out, unet.conv_out) for p in m.parameters()]
        for p in decoder:
            p.requires_grad_(True)
        params.append({"params": decoder, "lr": cfg.decoder_learning_rate})
    unet.to(torch.float32 if cfg.unlock_decoder else weight_dtype)
    if cfg.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    optimizer = _optimizer(cfg, params)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    if cfg.unlock_decoder:
        unet = accelerator.prepare(unet)
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
    for module in (*frozen.text_encoders, vae) + (() if cfg.unlock_decoder else (unet,)):
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
            step_loss = getattr(frozen.family, "loss", _step)  # flow-matching families bring their own
            loss = step_loss(batch, cfg, frozen, unet, controlnet, dropout, device, weight_dtype, log)
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
                images = run_validation(validation, cfg, accelerator, frozen, unet, controlnet, global_step,
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
            "models": {"controlnet": accelerator.unwrap_model(controlnet), "unet": accelerator.unwrap_model(unet),
                       "vae": vae, "text_encoder": frozen.text_encoders[0], "frozen": frozen}}


def _rank_checksums(accelerator, model) -> list[float]:
    """One number per rank summarising the weights: DDP keeps them equal, and we check."""
    total = torch.zeros(1, dtype=torch.float64, device=accelerator.device)
    for p in model.parameters():
        total += p.detach().double().sum()
    return [float(x) for x in accelerator.gather(total).cpu()]


def _step(batch, cfg, frozen, unet, controlnet, dropout, device, dtype, log=print):
    vae, noise_scheduler = frozen.vae, frozen.scheduler
    sizes = batch.get("sizes")
    if frozen.family.NAME == "sdxl" and not (sizes or {}).get("recorded") and "sizes" not in frozen.notes:
        frozen.notes.add("sizes")
        log("note: these shards do not record each sample's original size and crop offset (json orig_width/"
            "orig_height, crop_top/crop_left); SDXL's time_ids use the image size and no crop for those")
    with torch.no_grad():
        if "latents" in batch:  # cached at build time: mean x scaling factor
            latents = batch["latents"].to(device).float()
        else:
            latents = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist.sample()
            latents = (latents * vae.config.scaling_factor).float()
        hidden, added = frozen.family.conditioning(frozen, dropout(batch["text"]), device, sizes,
                                                   tuple(batch["pixel_values"].shape[-2:]))  # (h, w): buckets too
    noise = torch.randn_like(latents)
    timesteps = sample_timesteps(cfg.timestep_sampling, latents.shape[0], noise_scheduler.config.num_train_timesteps,
                                 device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    down, mid = controlnet(noisy, timesteps, encoder_hidden_states=hidden.float(), added_cond_kwargs=_cast(added, torch.float32),
                           controlnet_cond=batch["conditioning_pixel_values"].to(device), return_dict=False)
    unet_dtype = next(unet.parameters()).dtype
    prediction = unet(noisy.to(unet_dtype), timesteps, encoder_hidden_states=hidden.to(unet_dtype),
                      added_cond_kwargs=_cast(added, unet_dtype),
                      down_block_additional_residuals=None if cfg.only_mid_control else [d.to(unet_dtype) for d in down],
                      mid_block_additional_residual=mid.to(unet_dtype), return_dict=False)[0]
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def _cast(added: dict | None, dtype: torch.dtype) -> dict | None:
    return None if added is None else {k: v.to(dtype) for k, v in added.items()}


def sample_timesteps(how: str, batch: int, total: int, device) -> torch.Tensor:
    """`uniform` as the paper; `cubic` as T2I-Adapter: t = (1 - u^3) T puts most samples at
    high noise, where the layout is decided and the condition carries the most information."""
    if how == "cubic":
        u = torch.rand(batch, device=device)
        return ((1 - u ** 3) * total).long().clamp(0, total - 1)
    return torch.randint(0, total, (batch,), device=device).long()


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


def run_validation(batch, cfg, accelerator, frozen, unet, controlnet, step, dtype) -> list:
    """Sample with the models already in memory (no second pipeline load), through the
    family's diffusers ControlNet pipeline; save condition | result rows."""
    import numpy as np
    from diffusers import DDIMScheduler
    from PIL import Image

    scheduler = (frozen.family.sampling_scheduler(frozen) if hasattr(frozen.family, "sampling_scheduler")
                 else DDIMScheduler.from_config(frozen.scheduler.config))  # no reload from disk per validation
    pipe = frozen.family.pipeline(frozen, accelerator.unwrap_model(unet), accelerator.unwrap_model(controlnet), scheduler)
    pipe.set_progress_bar_config(disable=True)
    conditions = [Image.fromarray((c.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                  for c in batch["conditioning_pixel_values"]]
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed)
    with torch.autocast(accelerator.device.type, enabled=dtype != torch.float32):
        control = {getattr(frozen.family, "CONTROL_IMAGE_ARG", "image"): conditions}
        images = pipe(prompt=batch["text"], **control, num_inference_steps=cfg.validation_inference_steps,
                      guidance_scale=cfg.validation_guidance_scale, generator=generator, height=cfg.resolution,
                      width=cfg.resolution, **getattr(frozen.family, "EXTRA_PIPELINE_ARGS", {})).images
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

