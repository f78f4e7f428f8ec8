"""Where does the stored base decide colours? bg/fg right of the decoded x0 prediction at each DDIM step."""
import sys, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import circles
from circles import COLOURS, top_two_colours
from diffusers import DDIMScheduler
from train.families.sd import SD
torch.set_num_threads(1)
path = sys.argv[1] if len(sys.argv) > 1 else str(circles.STORED_BASE)
gs = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
f = SD().load(path, torch.float32)
tok, te, unet, vae = f.tokenizers[0], f.text_encoders[0], f.denoiser, f.vae
sched = DDIMScheduler.from_config(f.scheduler.config); sched.set_timesteps(20)
pairs = [(fg, bg) for fg in COLOURS for bg in COLOURS if fg != bg]
caps = [f"a {fg} circle on a {bg} background" for fg, bg in pairs]
ids = tok(caps + [""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
with torch.no_grad():
    emb = te(ids)[0]
cond, unc = emb[:-1], emb[-1:].expand(len(pairs), -1, -1)
x = torch.cat([torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(len(pairs))]) * sched.init_noise_sigma
from PIL import Image
import numpy as np
def judge(lat):
    img = vae.decode(lat / vae.config.scaling_factor).sample
    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    found = [top_two_colours(Image.fromarray(a)) for a in arr]
    return (sum(f[0] == bg for f, (_, bg) in zip(found, pairs)) / 56, sum(f[1] == fg for f, (fg, _) in zip(found, pairs)) / 56,
            sum(f == (bg, fg) for f, (fg, bg) in zip(found, pairs)) / 56, found)
first = None
with torch.no_grad():
    for i, t in enumerate(sched.timesteps):
        e = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, unc])).sample
        c, u = e.chunk(2); e = u + gs * (c - u)
        out = sched.step(e, t, x); x = out.prev_sample
        bg, fg, both, found = judge(out.pred_original_sample)
        if first is None: first = found
        stay = sum(a[0] == b[0] for a, b in zip(first, found)) / 56
        print(f"step {i} t={int(t)}: x0-pred bg {bg:.2f} fg {fg:.2f} both {both:.2f}; bg same as step 0: {stay:.2f}", flush=True)
