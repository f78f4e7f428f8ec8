"""ControlNet training speed and GPU memory on an SD 1.5-shaped base, per setting.

    python bench/train_gpu.py --shards DIR [--steps 30] [--batch 8] [--resolution 512]
    python bench/train_gpu.py --tiny            # the same script on a tiny base at 64 px (a CPU check)

The base has SD 1.5's architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M)
with RANDOM weights, built from configs here (nothing is downloaded): the speed and memory
are the real model's, its outputs meaningless. Its tokenizer is a byte-level one with the
real class and 77 tokens. Each setting runs `controlforge train` in a fresh process,
streaming the given shards (a 512 px canny build); printed per setting: steps/s and
samples/s over the steps after the first 5 (warm-up, compilation), and the peak GPU memory
(torch.cuda.max_memory_allocated) of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
WARMUP = 5

SETTINGS = {
    "fp32 (TF32 matmuls)": {"mixed_precision": "no"},
    "bf16": {"mixed_precision": "bf16"},
    "bf16 + gradient checkpointing": {"mixed_precision": "bf16", "gradient_checkpointing": True},
    "bf16 + 8-bit Adam": {"mixed_precision": "bf16", "use_8bit_adam": True},
    "bf16 + torch.compile": {"mixed_precision": "bf16", "compile": True},
}


def make_sd15_shaped(folder: Path, tiny: bool = False) -> Path:
    """SD 1.5's architecture (or the tests' tiny one) with random weights, saved as a pipeline folder."""
    if tiny:
        from tiny_models import make_tiny_sd

        return make_tiny_sd(folder)
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny_models import make_tiny_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = make_tiny_clip_tokenizer(folder / "tokenizer")
    tokenizer.model_max_length = 77
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(folder)
    return folder


def child(args: argparse.Namespace) -> None:
    import torch

    from train.config import TrainConfig
    from train.trainer import train

    setting = json.loads(args.setting)
    cfg = TrainConfig(shards=[args.shards], pretrained_model=args.base, output_dir=args.out,
                      resolution=args.resolution, train_batch_size=args.batch, max_train_steps=WARMUP + args.steps,
                      checkpointing_steps=10**6, num_validation_images=0, report_to="none",
                      dataloader_num_workers=2, shuffle_buffer=64, **setting)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, log=lambda *_: None)
    times = result["step_times"]
    rate = (len(times) - WARMUP) / (times[-1] - times[WARMUP - 1])
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"steps_s": rate, "peak_gib": peak / 2**30}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="a build's folder (512 px, canny); made here with --tiny")
    parser.add_argument("--steps", type=int, default=30, help="timed steps, after 5 warm-up steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="tiny base at 64 px: checks the script on a CPU")
    parser.add_argument("--only", default="", help="comma-separated setting prefixes")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per setting")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("setting", "base", "out"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    work = Path(tempfile.mkdtemp(prefix="cf-bench-gpu-"))
    if args.tiny:
        args.resolution, args.steps, args.batch = 64, min(args.steps, 10), min(args.batch, 4)
        if not args.shards:
            from conftest import write_synthetic

            from pipeline.build import run_build
            from pipeline.config import BuildConfig

            write_synthetic(work / "in", 32, size=(96, 80))
            run_build(BuildConfig(input=[str(work / "in")], output=str(work / "shards"), resolution=64, min_size=64,
                                  caption_model="none", executor="local", preview=0, report_samples=0),
                      log=lambda *_: None)
            args.shards = str(work / "shards")
    if not args.shards:
        parser.error("--shards DIR is needed (or --tiny)")
    started = time.perf_counter()
    base = make_sd15_shaped(work / "base", args.tiny)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"base built in {time.perf_counter() - started:.0f} s; {device}, {args.resolution} px, batch {args.batch}, "
          f"{args.steps} timed steps after {WARMUP}", flush=True)
    only = [o for o in args.only.split(",") if o]
    print(f"{'setting':<32} {'steps/s':>8} {'samples/s':>10} {'peak GPU GiB':>13}", flush=True)
    for label, setting in SETTINGS.items():
        if only and not any(label.startswith(o) for o in only):
            continue
        if setting.get("use_8bit_adam"):
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                print(f"{label:<32} not run: bitsandbytes is not installed", flush=True)
                continue
        command = [sys.executable, __file__, "--child", "--setting", json.dumps(setting), "--base", str(base),
                   "--out", str(work / f"out-{len(label)}"), "--shards", args.shards, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--resolution", str(args.resolution)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        except subprocess.TimeoutExpired:
            print(f"{label:<32} not finished in {args.timeout} s", flush=True)
            continue
        if done.returncode:
            print(f"{label:<32} failed: {done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else '?'}",
                  flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{label:<32} {row['steps_s']:>8.2f} {row['steps_s'] * args.batch:>10.1f} {row['peak_gib']:>13.2f}",
              flush=True)


if __name__ == "__main__":
    main()
