"""A fill50k-like task that shows whether a ControlNet trainer learns, and the tiny
Stable-Diffusion-shaped base model it is trained on.

The task (as in the ControlNet paper's fill50k): one filled circle of one colour on a
background of another, captioned "a red circle on a light blue background". The base
model learns to draw such pictures from their captions, at no particular place; a
ControlNet trained on Canny edges of the circle must learn *where* to draw it.

    python bench/circles.py data DIR [--train 6000 --heldout 64]   # images + sidecar .txt
    python bench/circles.py base OUT [--vae-minutes 12 --unet-minutes 20]  # train a base, save it

The base is a `StableDiffusionPipeline` folder (AutoencoderKL with a 4x factor, a
UNet2DConditionModel, a CLIPTextModel with a real CLIPTokenizer over a small word
vocabulary, DDPM scheduler), so `controlforge train/sample/eval --pretrained-model OUT`
load it like any SD 1.x base. `bench/circles_base/` is one made by this script (fp16).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: colours chosen so that every pair differs by >= 90 in some channel: Canny finds every edge
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 210), "yellow": (240, 220, 30),
           "purple": (130, 40, 160), "light blue": (140, 200, 250), "white": (245, 245, 245), "black": (15, 15, 15)}
SIZE = 64
STORED_BASE = Path(__file__).resolve().parent / "circles_base"


@dataclass(frozen=True)
class Circle:
    """Centre and radius as fractions of the image side."""

    fg: str
    bg: str
    cx: float
    cy: float
    r: float

    @property
    def caption(self) -> str:
        return f"a {self.fg} circle on a {self.bg} background"

    def grid_key(self, size: int = SIZE) -> tuple:
        return (self.fg, self.bg, round(self.cx * size), round(self.cy * size), round(self.r * size))

    def draw(self, size: int = SIZE, supersample: int = 4) -> Image.Image:
        """Anti-aliased by drawing at `supersample` x the size and shrinking."""
        big = size * supersample
        image = Image.new("RGB", (big, big), COLOURS[self.bg])
        x, y, r = self.cx * big, self.cy * big, self.r * big
        ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[self.fg])
        return image.resize((size, size), Image.Resampling.LANCZOS)


def random_circle(rng: np.random.Generator) -> Circle:
    fg, bg = rng.choice(len(COLOURS), 2, replace=False)
    names = list(COLOURS)
    r = float(rng.uniform(0.12, 0.38))
    cx, cy = (float(rng.uniform(r, 1 - r)) for _ in range(2))
    return Circle(names[fg], names[bg], round(cx, 4), round(cy, 4), round(r, 4))


def circle_sets(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[Circle], list[Circle]]:
    """Training circles and held-out ones; no held-out circle matches a training one on
    the pixel grid (same colours, centre and radius)."""
    train = [random_circle(rng) for rng in [np.random.default_rng(seed)] for _ in range(n_train)]
    seen = {c.grid_key() for c in train}
    rng, heldout = np.random.default_rng(seed + 7919), []
    while len(heldout) < n_heldout:
        circle = random_circle(rng)
        if circle.grid_key() not in seen:
            heldout.append(circle)
            seen.add(circle.grid_key())
    return train, heldout


def write_circles(folder: Path, circles: list[Circle], size: int = SIZE) -> list[Path]:
    """NNNNN.png + NNNNN.txt (the caption) per circle, and circles.jsonl with the parameters."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with open(folder / "circles.jsonl", "w") as listing:
        for i, circle in enumerate(circles):
            path = folder / f"{i:05d}.png"
            circle.draw(size).save(path)
            (folder / f"{i:05d}.txt").write_text(circle.caption + "\n")
            listing.write(json.dumps({"file": path.name, **asdict(circle)}) + "\n")
            paths.append(path)
    return paths


# ---- the base model -------------------------------------------------------------------

def word_tokenizer(folder: Path, words: list[str], max_length: int = 16):
    """A real CLIPTokenizer (vocab.json + merges.txt) over single characters plus merges
    that join the given words, so each caption is a handful of tokens."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars)]
    merges: list[str] = []
    for word in sorted(set(words)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            merge = f"{current} {symbol}"
            if merge not in merges:
                merges.append(merge)
            current += symbol
            if current not in tokens:
                tokens.append(current)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def base_models(tokenizer):
    """Untrained VAE (factor 4: 64 px -> 16x16x4 latents), UNet and text encoder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=SIZE, mid_block_add_attention=False)
    unet = UNet2DConditionModel(sample_size=SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_attention_heads=4, num_hidden_layers=2,
                                                max_position_embeddings=tokenizer.model_max_length,
                                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.eos_token_id))
    return vae, unet, text_encoder


def _pixels(circles: list[Circle]):
    import torch

    arrays = np.stack([np.asarray(c.draw()) for c in circles])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _sobel(x):
    import torch.nn.functional as F

    gx = x[..., :, 1:] - x[..., :, :-1]
    gy = x[..., 1:, :] - x[..., :-1, :]
    return F.pad(gx, (0, 1)), F.pad(gy, (0, 0, 0, 1))


def _cosine_lr(optimizer, base_lr: float, progress: float, warmup: float = 0.03) -> None:
    lr = base_lr * (progress / warmup if progress < warmup else 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup))))
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_vae(vae, pixels, seconds: float, batch: int = 32, lr: float = 2e-3, log=print) -> dict:
    """Reconstruction (MSE + L1 + L1 on image gradients, for sharp edges) + a tiny KL,
    cosine lr over a wall-clock budget."""
    import torch
    import torch.nn.functional as F

    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    started, step, loss = time.perf_counter(), 0, torch.tensor(0.0)
    while (elapsed := time.perf_counter() - started) < seconds:
        _cosine_lr(optimizer, lr, elapsed / seconds)
        x = pixels[torch.randint(0, len(pixels), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample
        gx, gy = _sobel(x)
        hx, hy = _sobel(y)
        loss = (F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x) + 0.5 * (F.l1_loss(hx, gx) + F.l1_loss(hy, gy))
                + 1e-6 * posterior.kl().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 200 == 0:
            log(f"  vae step {step} ({elapsed:.0f}s): loss {loss.item():.4f}")
    vae.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - started, 1), "final_loss": float(loss)}


def sharpen_posterior(vae, shift: float = -10.0) -> None:
    """Lower the encoder's log-variance so encoding is (nearly) deterministic.

    With a tiny KL weight the posterior keeps a std of about 9 % of the latents' spread.
    The UNet is trained on latent means, but ControlNet trainers (ours, diffusers') encode
    with `latent_dist.sample()`: that noise, as large as the diffusion noise at t < 100,
    is a mismatch the ControlNet then spends its first hundreds of steps learning to
    undo instead of learning the condition. SD's own VAE has a negligible posterior std;
    this makes ours match (the decoder, trained on samples, is unaffected)."""
    import torch

    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] += shift


def train_unet(unet, text_encoder, tokenizer, scheduler, latents, captions: list[str], seconds: float,
               batch: int = 64, lr: float = 1e-3, empty_rate: float = 0.1, log=print) -> dict:
    """Noise prediction on cached latents; the small text encoder learns with the UNet
    (a frozen random one follows colours poorly); 10 % empty captions for CFG."""
    import torch
    import torch.nn.functional as F

    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ids = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(2)
    started, step, loss = time.perf_counter(), 0, torch.tensor(0.0)
    while (elapsed := time.perf_counter() - started) < seconds:
        _cosine_lr(optimizer, lr, elapsed / seconds)
        index = torch.randint(0, len(latents), (batch,), generator=gen)
        text_ids = ids[index].clone()
        text_ids[torch.rand(batch, generator=gen) < empty_rate] = ids[-1]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        prediction = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=text_encoder(text_ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if step % 200 == 0:
            log(f"  unet step {step} ({elapsed:.0f}s): loss {loss.item():.4f}")
    unet.eval()
    text_encoder.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - started, 1), "final_loss": float(loss)}


def make_base(out: Path, vae_seconds: float, unet_seconds: float, n_images: int = 6000, seed: int = 0,
              fp16: bool = True, log=print) -> dict:
    """Train VAE then UNet (+ text encoder) on circles drawn from `seed`, save a
    StableDiffusionPipeline folder; returns what was done (also in OUT/circles_base.json)."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from train.sampler import DEFAULT_PROMPT

    torch.manual_seed(seed)
    out = Path(out)
    circles, _ = circle_sets(n_images, 0, seed)
    words = [w for name in COLOURS for w in name.split()] + "a circle on background".split() + re.findall(r"[a-z]+", DEFAULT_PROMPT)
    tokenizer = word_tokenizer(out / "tokenizer", words)
    vae, unet, text_encoder = base_models(tokenizer)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000)
    pixels = _pixels(circles)
    log(f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e3:.0f}k parameters, {vae_seconds:.0f} s")
    vae_info = train_vae(vae, pixels, vae_seconds, log=log)
    sharpen_posterior(vae)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    log(f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e3:.0f}k parameters, {unet_seconds:.0f} s")
    unet_info = train_unet(unet, text_encoder, tokenizer, scheduler, latents, [c.caption for c in circles],
                           unet_seconds, log=log)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    info = {"images": n_images, "seed": seed, "vae": vae_info, "unet": unet_info, "scaling_factor": scaling,
            "posterior_log_variance_shift": -10.0,
            "fp16": fp16, "torch_threads": torch.get_num_threads()}
    (out / "circles_base.json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write training and held-out circles (images + captions)")
    data.add_argument("out")
    data.add_argument("--train", type=int, default=6000)
    data.add_argument("--heldout", type=int, default=64)
    data.add_argument("--seed", type=int, default=0)
    base = sub.add_parser("base", help="train and save the tiny base model")
    base.add_argument("out")
    base.add_argument("--vae-minutes", type=float, default=12)
    base.add_argument("--unet-minutes", type=float, default=20)
    base.add_argument("--images", type=int, default=6000)
    base.add_argument("--fp32", action="store_true", help="save in float32 (default float16)")
    args = parser.parse_args()
    if args.command == "data":
        train, heldout = circle_sets(args.train, args.heldout, args.seed)
        write_circles(Path(args.out) / "train", train)
        write_circles(Path(args.out) / "heldout", heldout)
        print(f"wrote {len(train)} training and {len(heldout)} held-out circles under {args.out}")
    else:
        print(json.dumps(make_base(Path(args.out), args.vae_minutes * 60, args.unet_minutes * 60, args.images,
                                   fp16=not args.fp32), indent=1))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
