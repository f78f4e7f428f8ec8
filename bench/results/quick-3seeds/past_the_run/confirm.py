"""Does the stop signal fire at validation spacing 250 in seeds 1 and 2 of the quick run on
the stored base, given one validation past the run's end? In that run (1200 steps) their first
significant validation at spacing 250 is at step 1000 and the confirming one would be at 1250.

This continues each seed's main training from its last checkpoint (a copy of the run folder)
to step 1250 with reproduce.py's own `train` (the same flags; resume is the straight run bit
for bit on CPU, one torch thread per process as the quick run's workers had), so the trainer
validates at 1250 as a 1250-step run would, then replays the stop signal at every spacing
from the continued record (ConvergenceTracker.replay), as the report does.

    python bench/results/quick-3seeds/past_the_run/confirm.py RUN COPY [--seeds 1 2] [--steps 1250]

RUN: the finished `reproduce.py --quick --seeds 3` folder; COPY: a new folder for the copies.
Writes COPY/confirm.json and prints it.
"""
import argparse
import json
import os
import shutil
import sys
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def continue_seed(run_dir: str, copy_dir: str, seed: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import reproduce

    run, copy = Path(run_dir), Path(copy_dir)
    state = json.loads((run / "state.json").read_text())
    s = {k: v for k, v in state["settings"].items() if k in reproduce.MODES["quick"]}
    base = state["done"]["base model"]["result"]
    runs = copy / "work" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if not (copy / "work" / "shards").exists():
        try:
            (copy / "work" / "shards").symlink_to(run / "work" / "shards")
        except FileExistsError:
            pass
    target = runs / f"main-s{seed}"
    if not target.exists():
        shutil.copytree(run / "work" / "runs" / f"main-s{seed}", target)
    reproduce.train(SimpleNamespace(work=copy / "work"), s, base, "main", seed, steps)
    record = reproduce.trainer_convergence(str(target))
    curve = state["done"]  # the evaluation curve of the finished run (every 200 steps, 64 conditions)
    evaluation = {k: curve[f"eval seed {seed} step {k}"]["result"] for k in range(200, s["steps"] + 1, 200)}
    signal = reproduce.stop_signal(record, evaluation, curve["sample base"]["result"]["f1"])
    tail = {step: {"own": round(v, 3), "shuffled": round(sh, 3), "p": p} for step, v, sh, p in
            zip(record["steps"], record["values"], record["shuffled_values"], record["p_values"]) if step >= 900}
    return {"seed": seed, "continued_to": steps, "fired_as_run": record["sudden_convergence_step"],
            "stop_signal": signal, "validations_from_900": tail}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run"), p.add_argument("copy")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2]), p.add_argument("--steps", type=int, default=1250)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with get_context("spawn").Pool(len(a.seeds)) as pool:
        results = pool.starmap(continue_seed, [(a.run, a.copy, seed, a.steps) for seed in a.seeds])
    out = {"command": sys.argv, "seeds": results}
    Path(a.copy, "confirm.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
