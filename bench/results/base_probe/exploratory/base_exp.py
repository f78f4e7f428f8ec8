"""Experiment: train the circles base UNet+TE on the stored VAE's latents with a chosen
noise schedule; probe colour following every K steps."""
import argparse, json, sys, time, re
from pathlib import Path
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/bench")
import numpy as np, torch
from circles import *  # noqa
import circles as C
from diffusers import AutoencoderKL, DDPMScheduler
from train.families import Frozen
from train.families.sd import SD
from train.sampler import sample, DEFAULT_PROMPT

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=3000)
p.add_argument("--every", type=int, default=250)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--zsnr", action="store_true")
p.add_argument("--v", action="store_true")
p.add_argument("--beta", default="scaled_linear")
p.add_argument("--spacing", default="leading")
p.add_argument("--gs", type=float, nargs="+", default=[5.0])
p.add_argument("--out", default=None)
p.add_argument("--timesteps", default="uniform")
p.add_argument("--heads", type=int, default=8)
p.add_argument("--te-layers", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
vae = AutoencoderKL.from_pretrained(str(C.STORED_BASE), subfolder="vae", torch_dtype=torch.float32).eval()
circles, _ = circle_sets(6000, 0, 0)
pix = C._pixels(circles)
with torch.no_grad():
    lat = torch.cat([vae.encode(pix[i:i+256]).latent_dist.mean for i in range(0, len(pix), 256)]) * vae.config.scaling_factor
print("latent std", float(lat.std()), flush=True)
words = [w for name in COLOURS for w in name.split()] + "a circle on background".split() + re.findall(r"[a-z]+", DEFAULT_PROMPT)
tok = word_tokenizer(Path("/tmp/exp_tok"), words)
_, unet, te = base_models(tok)
if a.heads != 8 or a.te_layers != 2:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    cfg = dict(unet.config); cfg["attention_head_dim"] = a.heads
    unet = UNet2DConditionModel.from_config(cfg)
    tc = te.config; tc.num_hidden_layers = a.te_layers
    te = CLIPTextModel(tc)
print("unet params", sum(p.numel() for p in unet.parameters()), "heads", a.heads, flush=True)
kw = dict(beta_schedule=a.beta, beta_start=0.00085 if a.beta == "scaled_linear" else 1e-4, beta_end=0.012 if a.beta == "scaled_linear" else 0.02,
          prediction_type="v_prediction" if a.v else "epsilon", rescale_betas_zero_snr=a.zsnr, timestep_spacing=a.spacing)
sch = DDPMScheduler(num_train_timesteps=1000, **kw)
print(kw, flush=True)
names = list(COLOURS); palette = np.array([COLOURS[n] for n in names], np.float32)
pairs = [(fg, bg) for fg in names for bg in names if fg != bg]
caps = [f"a {fg} circle on a {bg} background" for fg, bg in pairs]
def probe(step):
    for gs in a.gs:
        probe_gs(step, gs)
    if a.out:
        torch.save({"unet": unet.state_dict(), "te": te.state_dict()}, f"{a.out}/model.pt")
def probe_gs(step, gs):
    frozen = Frozen(family=SD(), pretrained="x", tokenizers=[tok], text_encoders=[te], vae=vae, denoiser=unet, scheduler=sch)
    t0 = time.time()
    with torch.no_grad():
        imgs = sample(frozen, SD().sampling_scheduler(frozen), [], caps, "", "paper", 20, gs, SIZE, SIZE,
                      [torch.Generator().manual_seed(i) for i in range(len(pairs))]).images
    both = bgr = fgr = 0
    for im, (fg, bg) in zip(imgs, pairs):
        px = np.asarray(im, np.float32).reshape(-1, 3)
        counts = np.bincount(np.argmin(((px[:, None] - palette[None]) ** 2).sum(-1), 1), minlength=len(names))
        f, s = np.argsort(-counts)[:2]
        bgr += names[f] == bg; fgr += names[s] == fg; both += names[f] == bg and names[s] == fg
    n = len(pairs)
    print(f"PROBE step {step} gs {gs}: both {both/n:.2f} bg {bgr/n:.2f} fg {fgr/n:.2f} ({time.time()-t0:.0f}s)", flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        w = 8; sheet = Image.new("RGB", (64*w, 64*7))
        for i, im in enumerate(imgs): sheet.paste(im, (64*(i % w), 64*(i//w)))
        sheet.save(f"{a.out}/step{step}-gs{gs}.png")
info = train_unet(unet, te, tok, sch, lat, [c.caption for c in circles], a.steps, batch=a.batch, lr=a.lr, timesteps=a.timesteps, every=a.every, on_every=probe,
                  log=lambda m: print(m, flush=True))
probe(a.steps)
print(info)
