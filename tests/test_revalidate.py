"""bench/revalidate.py replays the trainer's validation on a finished run's checkpoints.
Random weights (tiny SD base): this checks the replay's plumbing and exactness, not quality."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def test_revalidation_reproduces_the_trainers_own_validation(family_builds, tmp_path):
    from conftest import tiny_train_config
    from revalidate import main as revalidate

    from train.checkpoints import STATE_FILE
    from train.trainer import train

    base, out = family_builds["sd"]
    run = tmp_path / "run"
    train(tiny_train_config(out, base, run, max_train_steps=4, checkpointing_steps=2, validation_steps=2,
                            validation_shards=[str(out)]), log=lambda *_: None)
    trained = json.loads((run / "controllability.json").read_text())
    assert trained["steps"] == [2, 4]

    def replay(name: str, every: int) -> dict:
        assert revalidate([str(run), "--output", str(tmp_path / name), "--every", str(every), "--pretrained-model",
                           str(base), "--validation-shards", str(out), "--resolution", "64",
                           "--num-validation-images", "2", "--validation-inference-steps", "2"]) == 0
        return json.loads((tmp_path / name / "controllability.json").read_text())

    again = replay("all", 2)
    assert again["steps"] == [2, 4]
    assert again["own_scores"] == trained["own_scores"] and again["shuffled_scores"] == trained["shuffled_scores"], \
        "the same batch, seed, sampler and weights give the same validation as the trainer's"
    assert replay("every4", 4)["steps"] == [4], "only checkpoints at multiples of --every"

    (run / "checkpoint-2" / STATE_FILE).unlink()  # a save that did not finish
    assert replay("whole", 2)["steps"] == [4], "an incomplete checkpoint is skipped"
