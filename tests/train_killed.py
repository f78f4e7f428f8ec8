"""Run `controlforge train` in this process and SIGKILL it at a chosen point (a test helper).

    python tests/train_killed.py CONFIG.json save:N   # while writing checkpoint-N's optimizer state
    python tests/train_killed.py CONFIG.json loss:K   # at the K-th loss (micro-batch) of the run

A real kill, at a point a test can name: the process gets no chance to clean up.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_while_saving(step: int) -> None:
    """torch.save of checkpoint-N's optimizer.bin writes half its bytes, then the process dies."""
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and f"checkpoint-{step}" in str(f) and str(f).endswith("optimizer.bin"):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            _die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def kill_at_loss(count: int) -> None:
    from train import families

    real_detect = families.detect

    def detect(*args, **kwargs):
        family = real_detect(*args, **kwargs)
        real_loss, calls = family.loss, [0]

        def loss(*a, **k):
            calls[0] += 1
            if calls[0] == count:
                _die()
            return real_loss(*a, **k)

        family.loss = loss  # this instance only: the trainer gets it from families.detect
        return family

    families.detect = detect  # the trainer calls families.detect (then family.load): it gets this one


def main() -> None:
    from train.config import TrainConfig
    from train.trainer import train

    cfg = TrainConfig(**json.loads(Path(sys.argv[1]).read_text()))
    kind, n = sys.argv[2].split(":")
    {"save": kill_while_saving, "loss": kill_at_loss}[kind](int(n))
    train(cfg, log=lambda *_: None)
    sys.exit("train_killed.py: the run ended before the kill point")


if __name__ == "__main__":
    main()
