"""Big bases on one GPU: peak GPU memory and steps/s of ControlNet training on SDXL,
SD3-medium and Flux-dev shaped bases (random weights, the real architectures and sizes),
bf16 at 1024 px, batch 1 and 4, with and without cached prompt embeddings, gradient
checkpointing and 8-bit Adam, a validation included in each run's peak.

    python bench/train_gpu_memory.py --family sdxl,sd3,flux     # one H100/H200 class GPU
    python bench/train_gpu_memory.py --count                    # parameter counts only (meta device, any machine)
    python bench/train_gpu_memory.py --tiny --family sd3        # the same script on tiny bases, 64 px, CPU

Nothing is downloaded: each base is built from its published config with random weights
(normal, std 0.02; built on the meta device, then filled in bf16 on the CPU and saved), with
stand-in tokenizers of the real classes. Speed and memory are the real models'; outputs mean
nothing. Per family: one build of 1024 px synthetic pictures with canny and the base's
prompt embeddings (`build --text-embeddings`), then each setting in a fresh process
(`controlforge train` in-process there), printing steps/s over the steps after a warm-up
and torch.cuda.max_memory_allocated of the whole run (validation included).

Goals (issue 25): SDXL ControlNet under 24 GB, SD3-medium under 40 GB, Flux-dev under 80 GB
at batch 1 including validation.
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
WARMUP = 3
GOALS_GIB = {"sdxl": 24, "sd3": 40, "flux": 80}

#: setting -> TrainConfig fields (mixed precision bf16 throughout)
SETTINGS = {
    "encode prompts": {"cached_text_embeddings": False},
    "cached embeddings": {},
    "cached + gradient checkpointing": {"gradient_checkpointing": True},
    "cached + checkpointing + 8-bit Adam": {"gradient_checkpointing": True, "use_8bit_adam": True},
}

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", decoder_start_token_id=0)
VAE_16 = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, sample_size=1024,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False)


def real_modules(family: str) -> dict:
    """The family's modules at their published sizes, on the meta device (no memory):
    name -> module, plus "_pipeline" (the diffusers class) and "_scheduler"."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    schedulers = {"sdxl": lambda: EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                        beta_end=0.012, steps_offset=1, timestep_spacing="leading"),
                  "sd3": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
                  "flux": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)}
    if family not in schedulers:
        raise ValueError(f"unknown family {family!r}: sdxl, sd3 or flux")
    scheduler = schedulers[family]()  # a scheduler's tensors must be real: made outside the meta device
    with torch.device("meta"):
        if family == "sdxl":
            return {"_pipeline": StableDiffusionXLPipeline, "_scheduler": scheduler,
                    "unet": UNet2DConditionModel(
                        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                        addition_embed_type="text_time", addition_time_embed_dim=256,
                        projection_class_embeddings_input_dim=2816),
                    "vae": AutoencoderKL(**{**VAE_16, "latent_channels": 4, "use_quant_conv": True,
                                            "use_post_quant_conv": True, "scaling_factor": 0.13025}),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                    "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))}
        if family == "sd3":  # SD3-medium
            return {"_pipeline": StableDiffusion3Pipeline, "_scheduler": scheduler,
                    "transformer": SD3Transformer2DModel(
                        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
                    "vae": AutoencoderKL(**VAE_16, shift_factor=0.0609, scaling_factor=1.5305),
                    "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
                    "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
                    "text_encoder_3": T5EncoderModel(T5Config(**T5_XXL))}
        if family == "flux":  # Flux-dev
            return {"_pipeline": FluxPipeline, "_scheduler": scheduler,
                    "transformer": FluxTransformer2DModel(
                        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                    "vae": AutoencoderKL(**VAE_16, shift_factor=0.1159, scaling_factor=0.3611),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                    "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL))}


def parameter_counts(family: str) -> dict[str, int]:
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in real_modules(family).items() if not name.startswith("_")}


def make_real_shaped(family: str, folder: Path) -> Path:
    """The base saved as a diffusers pipeline folder: weights filled in bf16 on the CPU."""
    import torch

    from tiny_models import make_tiny_clip_tokenizer, make_tiny_t5_tokenizer

    modules = real_modules(family)
    pipeline_class, scheduler = modules.pop("_pipeline"), modules.pop("_scheduler")
    generator = torch.Generator().manual_seed(0)
    for module in modules.values():
        module.to(torch.bfloat16)  # still on meta: the CPU storage is made in bf16 only (Flux: 24 GB, not 48)
        module.to_empty(device="cpu")
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.normal_(0.0, 0.02, generator=generator)
            for buffer in module.buffers():  # to_empty leaves them uninitialised (SD3's sin-cos table): zeros
                if buffer.is_floating_point():
                    buffer.zero_()
    tokenizers = {}
    for name in [n.replace("text_encoder", "tokenizer") for n in modules if n.startswith("text_encoder")]:
        t5 = isinstance(modules[name.replace("tokenizer", "text_encoder")], torch.nn.Module) and \
            type(modules[name.replace("tokenizer", "text_encoder")]).__name__ == "T5EncoderModel"
        tokenizer = make_tiny_t5_tokenizer(folder / name) if t5 else make_tiny_clip_tokenizer(folder / name)
        tokenizer.model_max_length = 77
        tokenizers[name] = tokenizer
    extra = {"feature_extractor": None, "image_encoder": None} if family == "sd3" else {}
    pipeline_class(scheduler=scheduler, **modules, **tokenizers, **extra).save_pretrained(folder)
    return folder


def make_base(family: str, folder: Path, tiny: bool) -> Path:
    if tiny:
        import tiny_models

        return getattr(tiny_models, f"make_tiny_{family}")(folder)
    return make_real_shaped(family, folder)


def make_shards(work: Path, base: Path, resolution: int, count: int) -> Path:
    """`count` synthetic pictures at `resolution`, canny, with the base's prompt embeddings."""
    from conftest import write_synthetic
    from pipeline.build import run_build
    from pipeline.config import BuildConfig

    write_synthetic(work / "in", count, size=(resolution + resolution // 8, resolution))
    for i in range(count):
        (work / "in" / f"synth_{i:04d}.txt").write_text(f"a synthetic picture of shapes, number {i}")
    run_build(BuildConfig(input=[str(work / "in")], output=str(work / "shards"), resolution=resolution,
                          min_size=resolution, caption_model="none", keep_captions=True, executor="local", preview=0,
                          report_samples=0, text_embeddings=str(base)), log=lambda *_: None)
    return work / "shards"


def child(args: argparse.Namespace) -> None:
    import torch

    from train.config import TrainConfig
    from train.trainer import train

    steps = WARMUP + args.steps
    cfg = TrainConfig(shards=[args.shards], pretrained_model=args.base, output_dir=args.out,
                      resolution=args.resolution, train_batch_size=args.batch, max_train_steps=steps,
                      checkpointing_steps=10**6, validation_steps=steps, num_validation_images=1,
                      validation_inference_steps=2, report_to="none", shuffle_buffer=8, prompt_dropout=0.1,
                      mixed_precision="no" if args.tiny else "bf16", **json.loads(args.setting))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, log=lambda *_: None)
    times = result["step_times"]
    rate = (len(times) - WARMUP) / (times[-1] - times[WARMUP - 1]) if len(times) > WARMUP else float("nan")
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"steps_s": rate, "peak_gib": peak / 2**30}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sdxl,sd3,flux", help="comma-separated: sdxl, sd3, flux")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after the warm-up")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--only", default="", help="comma-separated setting prefixes")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per setting")
    parser.add_argument("--count", action="store_true", help="print the real-shaped modules' parameter counts and stop")
    parser.add_argument("--tiny", action="store_true", help="tiny bases at 64 px, fp32: checks the script on a CPU")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("setting", "base", "shards", "batch", "run"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    families = [f for f in args.family.split(",") if f]
    if args.count:
        for family in families:
            counts = parameter_counts(family)
            print(json.dumps({"family": family, **{k: round(v / 1e9, 3) for k, v in counts.items()}},), flush=True)
        return
    if args.child:
        args.batch, args.out = int(args.batch), args.run
        return child(args)
    import torch

    if args.tiny:
        args.resolution, args.steps, args.batches = 64, min(args.steps, 2), "1,2"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows = []
    for family in families:
        work = Path(tempfile.mkdtemp(prefix=f"cf-bench-mem-{family}-"))
        started = time.perf_counter()
        base = make_base(family, work / "base", args.tiny)
        shards = make_shards(work, base, args.resolution, 16)
        print(f"{family}: base and shards made in {time.perf_counter() - started:.0f} s; {device}, "
              f"{args.resolution} px, {args.steps} timed steps after {WARMUP}, a validation at the end; "
              f"goal: under {GOALS_GIB[family]} GB at batch 1", flush=True)
        print(f"  {'setting':<38} {'batch':>5} {'steps/s':>8} {'peak GPU GiB':>13}", flush=True)
        for label, setting in SETTINGS.items():
            if args.only and not any(label.startswith(o) for o in args.only.split(",")):
                continue
            if setting.get("use_8bit_adam"):
                try:
                    import bitsandbytes  # noqa: F401
                except ImportError:
                    print(f"  {label:<38} not run: bitsandbytes is not installed", flush=True)
                    continue
            for batch in [int(b) for b in args.batches.split(",")]:
                command = [sys.executable, __file__, "--child", "--setting", json.dumps(setting), "--base", str(base),
                           "--run", str(work / f"run-{len(rows)}"), "--shards", str(shards), "--steps",
                           str(args.steps), "--batch", str(batch), "--resolution", str(args.resolution),
                           *(["--tiny"] if args.tiny else [])]
                row = {"family": family, "setting": label, "batch": batch, "device": device}
                try:
                    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout,
                                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                    if done.returncode:
                        lines = done.stderr.strip().splitlines()
                        row["error"] = lines[-1][:200] if lines else "?"
                    else:
                        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
                except subprocess.TimeoutExpired:
                    row["error"] = f"not finished in {args.timeout} s"
                rows.append(row)
                shown = (f"{row['steps_s']:>8.2f} {row['peak_gib']:>13.2f}" if "steps_s" in row
                         else f"  {row['error']}")
                print(f"  {label:<38} {batch:>5} {shown}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
