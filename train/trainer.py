"""ControlNet training as the paper does it: a frozen base (denoiser, VAE, text encoders),
a trainable ControlNet copied from it, 50 % empty prompts; what differs between base
models (the ControlNet, the noise, the loss) is the family's (train/families/).

Runs as one process, under `accelerate launch` (DDP on several GPUs), or inside a
Ray Train worker: the same function, Accelerator handles the distribution.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from . import families, sampler, text_embeddings
from .bad_samples import BadDataError, BadSampleTally
from .checkpoints import latest_complete, load_rank_state, read_state, save_checkpoint, save_model_atomic
from .config import TrainConfig
from .data import (cached_latents_match, expand_shards, loader_workers, make_dataset, make_hf_dataset, make_loader,
                   missing_members)
from .errors import TrainError
from .validation import controllability_tracker, run_validation, track_controllability, validation_batch


class PromptDropout:
    """Which prompts become '' this step, per sample, from its own generator, whose
    state is saved with every checkpoint so a resumed run draws the same."""

    def __init__(self, rate: float, seed: int):
        self.rate = rate
        self.generator = torch.Generator().manual_seed(seed)

    def drops(self, n: int) -> list[bool]:
        """Which of `n` prompts are dropped this step (cached embeddings: replaced by the
        stored empty-prompt one); the same draws as `__call__`."""
        return (torch.rand(n, generator=self.generator) < self.rate).tolist()

    def __call__(self, prompts: list[str]) -> list[str]:
        return ["" if d else p for p, d in zip(prompts, self.drops(len(prompts)))]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])




def _resume_path(cfg: TrainConfig, log) -> Path | None:
    """`latest`: the newest complete checkpoint (incomplete ones are moved aside, with a
    line each); a named folder must be complete."""
    from .checkpoints import incomplete_reason

    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        found = latest_complete(Path(cfg.output_dir), log)
        if found is None:
            log(f"--resume latest: no complete checkpoint in {cfg.output_dir}; starting from step 0")
        return found
    path = Path(cfg.resume)
    if not path.is_dir():
        raise TrainError(f"--resume {cfg.resume}: no such checkpoint folder")
    why = incomplete_reason(path)
    if why:
        raise TrainError(f"--resume {cfg.resume}: incomplete checkpoint ({why}); pass an earlier one, or "
                         f"--resume latest to take the newest complete one")
    return path


def _nonfinite_message(what: str, value: float, step: int, cfg: TrainConfig, saved: int | None) -> str:
    last = f"the last checkpoint, checkpoint-{saved}, is from before it" if saved else "no checkpoint was saved"
    return (f"{what} is {value} at step {step}: stopped there, and nothing is saved after it ({last}); lower "
            f"--learning-rate (now {cfg.learning_rate:g}), or use --mixed-precision bf16/no instead of fp16, then "
            f"--resume latest")


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
        family = families.detect(cfg.pretrained_model)
        sampler.resolve_mode(cfg.validation_mode, family, "--validation-mode")  # refused before any model loads
        frozen, cached, text_why = load_base(cfg, family, urls, weight_dtype)
        family.check_resolution(frozen, cfg.resolution)
        family.check_settings(frozen, cfg)
        controlnet = family.make_controlnet(frozen, cfg.controlnet, cfg.controlnet_init)
        if cfg.controlnet:
            family.check_controlnet(frozen, controlnet, cfg.controlnet)
    except (families.FamilyError, ValueError) as exc:
        raise TrainError(str(exc)) from None
    vae, denoiser = frozen.vae, frozen.denoiser
    log(f"base model: {frozen.family.NAME} ({cfg.pretrained_model})")
    if cached is not None:
        log(f"using {cached.describe()}: the text encoders are not loaded")
    elif text_why:
        log(f"encoding prompts with the text encoders ({text_why})")
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

    global_step, saved_step, skipped_steps = 0, None, 0
    tally = BadSampleTally(cfg.max_bad_fraction, log)
    resume_from = _resume_path(cfg, log) if accelerator.is_main_process else None
    resume_from = _broadcast_path(accelerator, resume_from)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = read_state(resume_from)
        global_step = saved_step = state["global_step"]
        skipped_steps = state.get("skipped_steps", 0)
        tally.load_state_dict(state.get("bad_samples", {}))
        rank_state = load_rank_state(resume_from, accelerator.process_index)
        if rank_state is not None:  # accelerate restored rank 0's generator on every rank
            dropout.load_state_dict(rank_state["dropout"])
            tally.per_shard = dict(rank_state.get("bad_per_shard", {}))
        log(f"resumed from {resume_from} at step {global_step}")
    if urls:
        missing = missing_members(urls[0], cfg.condition)
        if missing:
            raise TrainError(f"{urls[0]}: its first sample has no {missing}; set --condition to one the shards have")
    use_latents = False
    if urls and cfg.cached_latents:
        latent_shape = [vae.config.latent_channels, *(cfg.resolution // frozen.vae_scale_factor,) * 2]
        use_latents, why = cached_latents_match(urls, cfg.pretrained_model, vae.config.scaling_factor, latent_shape,
                                                cfg.resolution, float(getattr(vae.config, "shift_factor", None) or 0.0))
        if use_latents and cfg.flip:
            raise TrainError("--flip with cached latents: a flipped image's latent is not the flipped latent; "
                             "pass --no-flip, or --no-cached-latents to encode every (flipped) image")
        log(f"using {why}: the images skip the VAE encoder" + ("; random flips off" if cfg.flip_enabled else "")
            if use_latents else f"encoding images with the VAE ({why})")
    data_args = (cfg.condition, cfg.resolution, cfg.train_batch_size, cfg.seed, cfg.shuffle_buffer, cfg.flip_enabled,
                 global_step * cfg.gradient_accumulation_steps)
    dataset = (make_hf_dataset(cfg.dataset, *data_args) if cfg.dataset
               else make_dataset(urls, *data_args, latents=use_latents, buckets=cfg.buckets,
                                 max_bad_fraction=cfg.max_bad_fraction,
                                 text=cached is not None and ("pooled" if "pooled_shape" in cached.info else True)))
    if batches:
        loader = itertools.cycle(batches)
    else:
        workers, line = loader_workers(cfg.dataloader_num_workers)
        if accelerator.is_main_process:
            log(line)
        loader = make_loader(dataset, workers, cfg.seed)
    validation_urls = expand_shards(cfg.validation_shards) if cfg.validation_shards else urls
    validation = (validation_batch(validation_urls, cfg, text=cached is not None) if validation_urls
                  and cfg.num_validation_images and accelerator.is_main_process else None)
    if validation is not None and cached is not None and "text_embeds" not in validation:
        log("the validation samples hold no prompt embeddings of this base: loading the text encoders for validation")
        load_text_encoders(frozen, cfg, weight_dtype, device)
    tracker = (controllability_tracker(cfg, global_step if resume_from is not None else None, log)
               if validation is not None else None)
    if trackers and accelerator.is_main_process:
        accelerator.init_trackers("controlforge", config={k: v for k, v in cfg.model_dump().items()
                                                          if isinstance(v, (int, float, str, bool))})

    progress = tqdm(total=cfg.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="train")
    started, losses, samples_seen, first_step = time.perf_counter(), [], 0, global_step
    step_times: list[float] = []  # perf_counter at the end of each optimiser step (benchmarks)
    try:  # the bar ends its line before any stop message
        for batch in _batches(loader):
            if global_step >= cfg.max_train_steps:
                break
            tally.take(batch)
            with accelerator.accumulate(controlnet):
                loss = family.loss(batch, cfg, frozen, denoiser, controlnet, dropout, device, weight_dtype, log)
                _stop_on_bad_data_or_loss(accelerator, loss, tally, cfg, global_step + 1, saved_step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_([p for g in params for p in g["params"]], cfg.max_grad_norm)
                    if norm is not None and not math.isfinite(float(norm)) and accelerator.scaler is None:
                        raise TrainError(_nonfinite_message("the gradient norm", float(norm), global_step + 1, cfg,
                                                            saved_step))
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
            skipped_steps += int(accelerator.optimizer_step_was_skipped)  # fp16 loss scaling: overflow, step skipped
            step_times.append(time.perf_counter())
            elapsed = step_times[-1] - started
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}",
                                 steps_s=f"{(global_step - first_step) / elapsed:.2f}",
                                 samples_s=f"{samples_seen / elapsed:.1f}")
            accelerator.log({"loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
            # validation before the checkpoint: a checkpoint's step is always in the controllability
            # record, and a run killed between the two resumes from the checkpoint before and
            # validates this step again, as the uninterrupted run did
            stop = 0
            if global_step % cfg.validation_steps == 0 and cfg.num_validation_images:
                if validation is not None:
                    images = run_validation(validation, cfg, accelerator, frozen, denoiser, controlnet, global_step,
                                            weight_dtype)
                    if tracker is not None:
                        stop = int(track_controllability(tracker, validation, images, cfg, global_step, accelerator,
                                                          log, controlnet))
                stop = _broadcast_flag(accelerator, stop)
            if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps:
                save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_total_limit,
                                rank_state={"dropout": dropout.state_dict(), "bad_per_shard": tally.per_shard},
                                state={"skipped_steps": skipped_steps, "bad_samples": tally.state_dict()},
                                ema_model=ema, controlnet=controlnet)
                saved_step = global_step
            if stop:
                log(f"stopping {cfg.stop_after_convergence} steps after sudden convergence (step {global_step})")
                break
    finally:
        progress.close()
    accelerator.wait_for_everyone()
    checksums = _rank_checksums(accelerator, accelerator.unwrap_model(controlnet))
    if len(set(checksums)) > 1:
        raise TrainError(f"ControlNet weights differ across ranks after training: {checksums}")
    if ema is not None:
        ema.copy_to(accelerator.unwrap_model(controlnet).parameters())  # the saved model is the EMA one
    bad_per_shard = _merged_counts(accelerator, tally.per_shard)
    if accelerator.is_main_process:
        save_model_atomic(accelerator.unwrap_model(controlnet), output_dir,  # config.json + safetensors
                          {"global_step": global_step, "world_size": accelerator.num_processes,
                           "rank_checksums": checksums, "skipped_steps": skipped_steps,
                           "bad_samples": {**tally.state_dict(), "per_shard": bad_per_shard}})
        if tally.bad:
            log(f"bad samples: {tally.summary()}, skipped; per shard: "
                + ", ".join(f"{Path(u).name} {n}" for u, n in sorted(bad_per_shard.items())))
        if skipped_steps:
            log(f"{skipped_steps} step(s) skipped by the fp16 loss scaler (gradients overflowed)")
        log(f"saved ControlNet to {output_dir} ({accelerator.num_processes} process(es), weights agree)")
    accelerator.end_training()
    return {"global_step": global_step, "losses": losses, "output_dir": str(output_dir), "step_times": step_times,
            "bad_samples": {**tally.state_dict(), "per_shard": bad_per_shard}, "skipped_steps": skipped_steps,
            "models": {"controlnet": accelerator.unwrap_model(controlnet),
                       "denoiser": accelerator.unwrap_model(denoiser),
                       "vae": vae, "text_encoder": frozen.text_encoders[0] if frozen.text_encoders else None,
                       "frozen": frozen}}


def load_base(cfg: TrainConfig, family, urls: list[str], dtype: torch.dtype) -> tuple[Any, Any, str]:
    """(frozen base, cached prompt embeddings or None, why not cached): the base with its
    prompts as a run on `urls` uses them. The shards' stored embeddings when they fit the base
    (its text encoders then not loaded, `frozen.empty_text` set), else the text encoders.
    The trainer and bench/revalidate.py both call this, so a replay prompts as the run did."""
    cached, why = _cached_text(urls, cfg, family)
    frozen = family.load(cfg.pretrained_model, dtype, text=cached is None)  # cached: no text encoders
    if cached is not None and (misfit := text_embeddings.fit_base(cached, frozen)):
        cached, why = None, misfit
        load_text_encoders(frozen, cfg, dtype)
    if cached is not None:
        frozen.empty_text = cached.empty
    return frozen, cached, why


def load_text_encoders(frozen, cfg: TrainConfig, dtype: torch.dtype, device=None) -> None:
    """Give a base loaded without them its tokenizers and text encoders (on `device` if given)."""
    frozen.tokenizers, frozen.text_encoders = families.load_text(frozen.family, cfg.pretrained_model, dtype)
    if device is not None:
        for module in frozen.text_encoders:
            module.to(device)


def _cached_text(urls: list[str], cfg: TrainConfig, family) -> tuple[Any, str]:
    """The shards' cached prompt embeddings when they fit this base (then its text encoders
    are not loaded), else None; and why not ('' when there is nothing to say)."""
    if not urls:
        return None, ""
    if not cfg.cached_text_embeddings:
        return None, "--no-cached-text-embeddings"
    return text_embeddings.cached_text(urls, cfg.pretrained_model, family)


def _batches(loader):
    """The loader's batches; a worker that read only bad samples ends the run with its message."""
    try:
        yield from loader
    except BadDataError as exc:
        raise TrainError(str(exc)) from None


def _stop_on_bad_data_or_loss(accelerator, loss, tally: BadSampleTally, cfg: TrainConfig, step: int,
                              saved_step: int | None) -> None:
    """Before the backward pass: a non-finite loss on any rank, or too many bad samples
    over all ranks, stops every rank together (one small all-reduce per micro-batch)."""
    flags = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0, tally.new_bad, tally.new_read],
                         dtype=torch.float64)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum").cpu()
    tally.commit(int(flags[1]), int(flags[2]))
    if flags[0] > 0:
        raise TrainError(_nonfinite_message("the loss", float(loss.detach().float().mean()), step, cfg, saved_step))
    if tally.exceeded():
        raise TrainError(f"too many bad samples: {tally.summary()}, more than --max-bad-fraction "
                         f"{cfg.max_bad_fraction:g}; shards with bad samples: "
                         + ", ".join(sorted(tally.per_shard)) + "; check them with `controlforge verify` "
                         f"(stopped at step {step}; raise --max-bad-fraction to go on anyway)")


def _broadcast_path(accelerator, path: Path | None) -> Path | None:
    """The main process picks the checkpoint (and moves incomplete ones aside); every rank loads that one."""
    if accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list

    chosen = broadcast_object_list([str(path) if path else None], from_process=0)[0]
    return Path(chosen) if chosen else None


def _merged_counts(accelerator, counts: dict[str, int]) -> dict[str, int]:
    if accelerator.num_processes == 1:
        return dict(counts)
    from accelerate.utils import gather_object

    merged: dict[str, int] = {}
    for part in gather_object([counts]):
        for url, n in part.items():
            merged[url] = merged.get(url, 0) + n
    return merged


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


def _broadcast_flag(accelerator, flag: int) -> bool:
    """The main process decides; every rank must leave the loop together."""
    if accelerator.num_processes == 1:
        return bool(flag)
    from accelerate.utils import broadcast

    return bool(broadcast(torch.tensor([flag], device=accelerator.device)).item())

