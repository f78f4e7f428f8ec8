"""The trainer learns. Unlike the other training tests (random weights, mechanics only),
this one checks quality and fails if the ControlNet does not learn: a few hundred steps
of `controlforge train` on the circles task (bench/circles.py), on a tiny base that was
pretrained on circles, must make samples follow held-out Canny conditions clearly better
than the base model does with the same prompts and seeds, and better than the same samples
score against other samples' conditions.

The base is the first stored base (bench/circles_base_first). On today's stored base, which
follows its prompts, and on the same run saved before its prompt phase, the ControlNet does
not rise within 250 steps at lr 2e-3; on the stored base it rises at 450-500 steps at lr
1-1.5e-3, beyond the test's 3 minutes (bench/results/learn_test/prompt-following-base/)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

#: 250 steps x 32 at lr 2e-3 (measured on 2 cores, one run each, the same held-out set: F1 0.356
#: at 250 steps, 0.336 at 275, 0.444 at 300; 450 x 32 at 1e-3 gave 0.434 in 3.7 minutes; 250 at
#: 3e-3 diverged to the base's 0.116). The test takes 2.2-2.6 minutes; three consecutive passes
#: with their margins: bench/results/learn_test/passes.json (bench/learn_test_passes.py)
STEPS, BATCH, LR, HELDOUT = 250, 32, "2e-3", 24
#: the thresholds: F1 >= base + OVER_BASE and >= BASE_RATIO x base, >= SHUFFLED_RATIO x shuffled;
#: the base's F1 against its own and shuffled conditions within CHANCE_TOLERANCE
OVER_BASE, BASE_RATIO, SHUFFLED_RATIO, CHANCE_TOLERANCE = 0.1, 1.8, 1.6, 0.08


@pytest.fixture(scope="module")
def circles_shards(tmp_path_factory):
    from circles import learn_test_shards

    return learn_test_shards(tmp_path_factory.mktemp("circles"), HELDOUT)


def _sample_and_eval(root: Path, out: Path, controlnet: str | None) -> dict:
    from circles import FIRST_BASE as BASE

    from pipeline.cli import main

    shard = next((root / "heldout-shards" / "shards").glob("*.tar"))
    assert main(["sample", "--pretrained-model", str(BASE), *(["--controlnet", controlnet] if controlnet else []),
                 "--shard", str(shard), "--num", str(HELDOUT), "--prompt-mode", "auto", "--steps", "20",
                 "--guidance-scale", "5", "--resolution", "64", "--output", str(out)]) == 0
    assert main(["eval", str(out), "--condition", "canny", "--shuffled"]) == 0
    return json.loads((out / "report.json").read_text())


def test_a_few_hundred_steps_make_samples_follow_held_out_conditions(circles_shards, tmp_path):
    from circles import FIRST_BASE as BASE

    from pipeline.cli import main

    root = circles_shards
    started = time.perf_counter()
    assert main(["train", "--shards", str(root / "train-shards"), "--pretrained-model", str(BASE),
                 "--output-dir", str(tmp_path / "cn"), "--resolution", "64", "--train-batch-size", str(BATCH),
                 "--max-train-steps", str(STEPS), "--learning-rate", LR, "--lr-scheduler", "constant_with_warmup",
                 "--lr-warmup-steps", "50", "--timestep-sampling", "cubic", "--checkpointing-steps", str(STEPS),
                 "--num-validation-images", "0", "--dataloader-num-workers", "0", "--report-to", "none",
                 "--shuffle-buffer", "500"]) == 0
    train_seconds = time.perf_counter() - started
    base = _sample_and_eval(root, tmp_path / "base", None)
    trained = _sample_and_eval(root, tmp_path / "controlnet", str(tmp_path / "cn"))
    f1, base_f1, shuffled = trained["mean"], base["mean"], trained["shuffled_mean"]
    print(f"edge F1 on {HELDOUT} held-out conditions after {STEPS} steps: ControlNet {f1:.3f}, base {base_f1:.3f}, "
          f"ControlNet against shuffled conditions {shuffled:.3f}")
    # how far each threshold is cleared (> 0: passed), recorded for bench/learn_test_passes.py
    margins = {"base_at_chance": CHANCE_TOLERANCE - abs(base["shuffled_mean"] - base_f1),
               "f1_over_base_plus": f1 - (base_f1 + OVER_BASE), "f1_over_base_times": f1 - BASE_RATIO * base_f1,
               "f1_over_shuffled_times": f1 - SHUFFLED_RATIO * shuffled}
    if os.environ.get("CONTROLFORGE_ARTIFACTS"):
        Path(os.environ["CONTROLFORGE_ARTIFACTS"], "learn_test.json").write_text(json.dumps(
            {"base": BASE.name, "steps": STEPS, "batch": BATCH, "lr": LR, "heldout": HELDOUT, "f1": f1, "base_f1": base_f1,
             "shuffled_f1": shuffled, "base_shuffled_f1": base["shuffled_mean"], "margins": margins,
             "train_seconds": round(train_seconds, 1)}, indent=1))
    assert margins["base_at_chance"] >= 0, "the base ignores the condition: chance level"
    assert margins["f1_over_base_plus"] >= 0 and margins["f1_over_base_times"] >= 0, \
        "the ControlNet follows its conditions better than the base"
    assert margins["f1_over_shuffled_times"] >= 0, "and it follows its own condition, not just draws sharper circles"
