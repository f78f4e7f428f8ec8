"""Exploratory: the CI learn test's training (tests/test_learns.py) with a checkpoint every
--every steps, each scored as the test scores it, so one run gives the whole curve. Made to
find settings under which a ControlNet rises within the test's 3 minutes on the
prompt-following base (curves.json: none found).

    python bench/results/learn_test/prompt-following-base/learn_curve.py --out WORK [--lr 1e-3] [--steps 600]
"""
import json, sys, time, argparse
from pathlib import Path
ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
p = argparse.ArgumentParser()
p.add_argument("--base", default=str(ROOT / "bench" / "circles_base"))
p.add_argument("--lr", default="2e-3"); p.add_argument("--batch", type=int, default=32)
p.add_argument("--steps", type=int, default=400); p.add_argument("--warmup", type=int, default=50)
p.add_argument("--every", type=int, default=50); p.add_argument("--from-step", type=int, default=150)
p.add_argument("--guidance", default="5"); p.add_argument("--mode", default="paper")
p.add_argument("--heldout", type=int, default=24); p.add_argument("--out", required=True)
p.add_argument("--timesteps", default="cubic"); p.add_argument("--scale", default="1"); p.add_argument("--extra", default="")
a = p.parse_args()
from circles import learn_test_shards
from pipeline.cli import main
root = Path(a.out); root.mkdir(parents=True, exist_ok=True)
if not (root / "heldout-shards").exists():
    learn_test_shards(root, a.heldout)
t = time.perf_counter()
cn = root / f"cn-{a.lr}-{a.batch}-{a.warmup}-{a.timesteps}{a.extra.replace(' ','')}"
if not cn.exists():
    assert main(["train", "--shards", str(root / "train-shards"), "--pretrained-model", a.base,
             "--output-dir", str(cn), "--resolution", "64", "--train-batch-size", str(a.batch),
             "--max-train-steps", str(a.steps), "--learning-rate", a.lr, "--lr-scheduler", "constant_with_warmup",
             "--lr-warmup-steps", str(a.warmup), "--timestep-sampling", a.timesteps, "--checkpointing-steps", str(a.every),
             "--num-validation-images", "0", "--dataloader-num-workers", "0", "--report-to", "none",
             "--shuffle-buffer", "500", "--checkpoints-total-limit", "100", *a.extra.split()]) == 0
print("train s", round(time.perf_counter() - t, 1), flush=True)
shard = next((root / "heldout-shards" / "shards").glob("*.tar"))
def score(net, out):
    if not (out / "report.json").exists():
        assert main(["sample", "--pretrained-model", a.base, *(["--controlnet", net, "--scale", a.scale] if net else []), "--shard", str(shard),
                 "--num", str(a.heldout), "--prompt-mode", "auto", "--steps", "20", "--guidance-scale", a.guidance,
                 "--mode", a.mode, "--resolution", "64", "--output", str(out)]) == 0
        assert main(["eval", str(out), "--condition", "canny", "--shuffled"]) == 0
    r = json.loads((out / "report.json").read_text()); return r["mean"], r["shuffled_mean"]
tag = f"g{a.guidance}-{a.mode}" + (f"-x{a.scale}" if a.scale != "1" else "")
res = {"base": score(None, root / f"base-{tag}")}
for s in range(a.from_step, a.steps + 1, a.every):
    res[s] = score(str(cn / f"checkpoint-{s}" / "controlnet"), cn / f"s{s}-{tag}")
    print(s, [round(x, 3) for x in res[s]], flush=True)
print(cn.name, tag, json.dumps({k: [round(x, 3) for x in v] for k, v in res.items()}))
