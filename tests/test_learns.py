"""The trainer learns. Unlike the other training tests (random weights, mechanics only),
this one checks quality and fails if the ControlNet does not learn: a few hundred steps
of `controlforge train` on the circles task (bench/circles.py), on the stored tiny base
that was pretrained on circles (bench/circles_base), must make samples follow held-out
Canny conditions clearly better than the base model does with the same prompts and
seeds, and better than the same samples score against other samples' conditions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

#: the rise needs about 12k samples (quick run: F1 0.13 at step 200, 0.53 at 400, batch 32);
#: on 2 cores this takes about 4.5 minutes, over the 3 the issue asked for (see README)
STEPS, BATCH, LR, HELDOUT = 450, 32, "1e-3", 24


@pytest.fixture(scope="module")
def circles_shards(tmp_path_factory):
    from circles import circle_sets, write_circles

    from pipeline.build import run_build
    from pipeline.config import BuildConfig

    root = tmp_path_factory.mktemp("circles")
    train, heldout = circle_sets(2000, HELDOUT, seed=1)
    for split, circles in (("train", train), ("heldout", heldout)):
        write_circles(root / split, circles)
        run_build(BuildConfig(input=[str(root / split)], output=str(root / f"{split}-shards"), resolution=64, min_size=64,
                              conditions=["canny"], keep_captions=True, caption_model="none", samples_per_shard=1000,
                              executor="local", preview=0), log=lambda *_: None)
    return root


def _sample_and_eval(root: Path, out: Path, controlnet: str | None) -> dict:
    from circles import STORED_BASE

    from pipeline.cli import main

    shard = next((root / "heldout-shards" / "shards").glob("*.tar"))
    assert main(["sample", "--pretrained-model", str(STORED_BASE), *(["--controlnet", controlnet] if controlnet else []),
                 "--shard", str(shard), "--num", str(HELDOUT), "--prompt-mode", "auto", "--steps", "20",
                 "--guidance-scale", "5", "--resolution", "64", "--output", str(out)]) == 0
    assert main(["eval", str(out), "--condition", "canny", "--shuffled"]) == 0
    return json.loads((out / "report.json").read_text())


def test_a_few_hundred_steps_make_samples_follow_held_out_conditions(circles_shards, tmp_path):
    from circles import STORED_BASE

    from pipeline.cli import main

    root = circles_shards
    assert main(["train", "--shards", str(root / "train-shards"), "--pretrained-model", str(STORED_BASE),
                 "--output-dir", str(tmp_path / "cn"), "--resolution", "64", "--train-batch-size", str(BATCH),
                 "--max-train-steps", str(STEPS), "--learning-rate", LR, "--lr-scheduler", "constant_with_warmup",
                 "--lr-warmup-steps", "50", "--timestep-sampling", "cubic", "--checkpointing-steps", str(STEPS),
                 "--num-validation-images", "0", "--dataloader-num-workers", "1", "--report-to", "none",
                 "--shuffle-buffer", "500"]) == 0
    base = _sample_and_eval(root, tmp_path / "base", None)
    trained = _sample_and_eval(root, tmp_path / "controlnet", str(tmp_path / "cn"))
    f1, base_f1, shuffled = trained["mean"], base["mean"], trained["shuffled_mean"]
    print(f"edge F1 on {HELDOUT} held-out conditions after {STEPS} steps: ControlNet {f1:.3f}, base {base_f1:.3f}, "
          f"ControlNet against shuffled conditions {shuffled:.3f}")
    assert base["shuffled_mean"] == pytest.approx(base_f1, abs=0.08), "the base ignores the condition: chance level"
    assert f1 >= base_f1 + 0.1 and f1 >= 1.8 * base_f1, "the ControlNet follows its conditions better than the base"
    assert f1 >= 1.6 * shuffled, "and it follows its own condition, not just draws sharper circles"
