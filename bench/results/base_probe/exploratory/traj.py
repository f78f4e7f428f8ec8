"""Where does a base decide colours? Background / circle right in the decoded x0 prediction
at each DDIM step of circles.colour_samples (the 56 colour pairs), and how many backgrounds
are already those of step 0.

    python bench/results/base_probe/exploratory/traj.py [BASE] [GUIDANCE]
"""
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import circles  # noqa: E402
from circles import COLOUR_PAIRS, colour_samples, top_two_colours  # noqa: E402
from train.families.sd import SD  # noqa: E402

torch.set_num_threads(1)
path = sys.argv[1] if len(sys.argv) > 1 else str(circles.STORED_BASE)
guidance = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
frozen = SD().load(path, torch.float32)
first = []


def judge(index, t, stepped):
    decoded = frozen.vae.decode(stepped.pred_original_sample / frozen.vae.config.scaling_factor).sample
    arrays = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    found = [top_two_colours(Image.fromarray(a)) for a in arrays]  # (background, circle)
    first[:] = first or found
    n = len(COLOUR_PAIRS)
    bg = sum(f[0] == b for f, (_, b) in zip(found, COLOUR_PAIRS)) / n
    fg = sum(f[1] == c for f, (c, _) in zip(found, COLOUR_PAIRS)) / n
    both = sum(f == (b, c) for f, (c, b) in zip(found, COLOUR_PAIRS)) / n
    stay = sum(a[0] == b[0] for a, b in zip(first, found)) / n
    print(f"step {index} t={int(t)}: x0-pred bg {bg:.2f} fg {fg:.2f} both {both:.2f}; bg same as step 0: {stay:.2f}",
          flush=True)


with torch.no_grad():
    colour_samples(frozen, guidance, on_step=judge)
