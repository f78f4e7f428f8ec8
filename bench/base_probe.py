"""Try a recipe for the circles base's UNet and text encoder quickly: train them on the
stored base's VAE latents (no VAE training) and probe colour following as training goes.

    python bench/base_probe.py OUT --stored --steps 0                     # judge the stored base
    python bench/base_probe.py OUT [--steps 1500 --every 500 --schedule zsnr-v --timesteps cubic
                                    --heads 1 --offset-noise 0.3 --guidance 2 5]   # from scratch
    python bench/base_probe.py OUT --stored --steps 800 --offset-noise 0.3 --timesteps cubic --lr 5e-4
                                                                          # go on from the stored base

Why: `bench/circles.py base` trains the VAE too and judges the base once, at the end (about
30 minutes on 2 cores). Finding a recipe that makes the base follow its prompts' colours
(issue 22 item 5) needs many tries and the curve, not one figure. Every `--every` steps this
samples the 56 (circle, background) colour pairs at each guidance scale and counts how often
the background is right, the circle is right, and both are (circles.top_two_colours); it
writes OUT/probe.json (command, settings, probes) and a contact sheet per probe
(OUT/step-N-gsG.png: a row per circle colour). A recipe that works here goes into
circles.py's NOISE_SCHEDULES / make_base and is made again, whole, by its script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

#: the recipes tried: scaled_linear is the stored base's; zsnr-v rescales it to zero terminal
#: SNR with v-prediction and trailing timesteps (Lin et al. 2024, "Common diffusion noise
#: schedules and sample steps are flawed"), so x_T carries no colour the model could read
SCHEDULES = {"scaled_linear": {},
             "zsnr-v": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")}


def colour_probe(frozen, guidance_scale: float, steps: int = 20):
    """(both right, background right, circle right) shares over circles.COLOUR_PAIRS, and the
    samples (circles.colour_samples)."""
    from circles import COLOUR_PAIRS, colour_samples, top_two_colours

    images = colour_samples(frozen, guidance_scale, steps)
    found = [top_two_colours(image) for image in images]  # (background, circle) as drawn
    n = len(COLOUR_PAIRS)
    return {"both": sum(f == (bg, fg) for f, (fg, bg) in zip(found, COLOUR_PAIRS)) / n,
            "background": sum(f[0] == bg for f, (_, bg) in zip(found, COLOUR_PAIRS)) / n,
            "circle": sum(f[1] == fg for f, (fg, _) in zip(found, COLOUR_PAIRS)) / n}, images


def contact_sheet(images, columns: int = 8):
    from PIL import Image

    side = images[0].size[0]
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (side * columns, side * rows))
    for i, image in enumerate(images):
        sheet.paste(image, (side * (i % columns), side * (i // columns)))
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=500, help="probe every this many steps (and at the end)")
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="zsnr-v")
    parser.add_argument("--timesteps", choices=("uniform", "cubic"), default="cubic",
                        help="cubic: t = (1 - u^3) T, most samples at high noise, where colours are decided")
    parser.add_argument("--heads", type=int, default=8, help="cross-attention heads per block (the stored base: 8)")
    parser.add_argument("--offset-noise", type=float, default=0.0,
                        help="std of a per-channel constant added to the training noise (0: none)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0, 5.0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", action="store_true",
                        help="save the trained base as a StableDiffusionPipeline folder, OUT/model (fp32)")
    parser.add_argument("--stored", action="store_true",
                        help="start from the stored base's UNet, text encoder and scheduler (--steps 0: judge it; "
                             "--steps N: train it on)")
    args = parser.parse_args(argv)

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)  # in-process callers (the test) keep their own setting


def _run(args, argv) -> int:
    import re

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    import circles
    from train.families import Frozen
    from train.families.sd import SD
    from train.sampler import DEFAULT_PROMPT

    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(str(circles.STORED_BASE), subfolder="vae", torch_dtype=torch.float32).eval()
    words = ([w for name in circles.COLOURS for w in name.split()] + "a circle on background".split()
             + re.findall(r"[a-z]+", DEFAULT_PROMPT))
    if args.stored:
        frozen = SD().load(str(circles.STORED_BASE), torch.float32)
        tokenizer, text_encoder = frozen.tokenizers[0], frozen.text_encoders[0]
        unet, scheduler = frozen.denoiser, frozen.scheduler
        unet.requires_grad_(True), text_encoder.requires_grad_(True)  # loaded frozen; --steps N fine-tunes them
    else:
        tokenizer = circles.word_tokenizer(args.out / "tokenizer", words)
        _, unet, text_encoder = circles.base_models(tokenizer)
        if args.heads != unet.config.attention_head_dim:
            torch.manual_seed(0)
            unet = UNet2DConditionModel.from_config({**unet.config, "attention_head_dim": args.heads})
        scheduler = circles.base_scheduler("scaled_linear", **SCHEDULES[args.schedule])
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.stored:  # the stored base's own schedule and UNet apply, not these options' defaults
        for unused in ("schedule", "heads", *(() if args.steps else ("timesteps", "offset_noise", "lr", "batch"))):
            settings.pop(unused)
    record = {"command": ["python", "bench/base_probe.py", *(argv if argv is not None else sys.argv[1:])],
              "settings": settings,
              "scheduler": dict(scheduler.config), "probes": []}

    def probe(step: int) -> None:
        frozen = Frozen(family=SD(), pretrained=str(args.out), tokenizers=[tokenizer], text_encoders=[text_encoder],
                        vae=vae, denoiser=unet, scheduler=scheduler)
        for guidance in args.guidance:
            with torch.no_grad():
                shares, images = colour_probe(frozen, guidance)
            contact_sheet(images).save(args.out / f"step-{step}-gs{guidance:g}.png")
            record["probes"].append({"step": step, "guidance_scale": guidance, **shares})
            print(f"step {step}, guidance {guidance:g}: both right {shares['both']:.2f}, background "
                  f"{shares['background']:.2f}, circle {shares['circle']:.2f}", flush=True)
        (args.out / "probe.json").write_text(json.dumps(record, indent=1))

    if not args.steps:
        probe(0)
        return 0
    training, _ = circles.circle_sets(args.images, 0, 0)
    pixels = circles._pixels(training)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    latents = latents * vae.config.scaling_factor
    info = circles.train_unet(unet, text_encoder, tokenizer, scheduler, latents, [c.caption for c in training],
                              args.steps, batch=args.batch, lr=args.lr, timesteps=args.timesteps,
                              offset_noise=args.offset_noise, every=args.every,
                              on_every=probe)
    probe(args.steps)
    record["unet"] = info
    if args.save:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                safety_checker=None, feature_extractor=None, requires_safety_checker=False
                                ).save_pretrained(args.out / "model", safe_serialization=True)
    (args.out / "probe.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
