"""Score each seed's OUT/best (the trainer's pick by validation) on set (a), as reproduce.py
scores every checkpoint (the same sampler, prompts, seeds and eval), beside the last checkpoint.
With validation every 50 steps `best` may sit between the evaluated checkpoints (every 250),
so it is sampled here.

    python bench/results/generalisation-stored-val50/score_best.py RUN   # writes RUN/best.json
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import reproduce  # noqa: E402

run_dir = Path(sys.argv[1])
state = json.loads((run_dir / "state.json").read_text())
s, done = state["settings"], state["done"]
run = SimpleNamespace(work=run_dir / "work", out=run_dir, log=print)
base = done["base model"]["result"]
out = {"what": __doc__.split("\n\n")[0], "seeds": {}}
for seed in s["seeds"]:
    best = run.work / "runs" / f"main-s{seed}" / "best"
    picked = json.loads((best / "train_state.json").read_text())
    scored = reproduce.sample_and_eval(run, run.work / "samples" / f"best-s{seed}", base, str(best), s["curve_samples"])
    out["seeds"][seed] = {"best_step": picked["global_step"], "best_validation_f1": picked["value"],
                          "best_set_a": scored, "last_set_a": done[f"eval seed {seed} step {s['steps']}"]["result"]}
(run_dir / "best.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
