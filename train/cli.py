"""`controlforge train`: flags are generated from TrainConfig, so YAML keys and flags never drift."""

from __future__ import annotations

import argparse
import os
import sys

from common.config import ConfigError, load_config
from common.flags import add_model_flags, overrides_from

from .config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of the settings below; flags override it")
    add_model_flags(parser, TrainConfig)
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback of a stop (a full disk is otherwise one line)")


def disk_full_line(error: OSError, output_dir: str) -> str:
    """Where the disk is full, what is free, the newest complete checkpoint, and how to go on."""
    import tempfile

    from common.disk_full import disk_full_message, full_path

    from .checkpoints import checkpoints, incomplete_reason

    complete = [p for p in checkpoints(output_dir) if incomplete_reason(p) is None] if os.path.isdir(output_dir) else []
    done = (f"the newest complete checkpoint is {complete[-1].name}" if complete
            else "no complete checkpoint was saved yet")
    path = full_path(error, [os.path.abspath(output_dir), tempfile.gettempdir()])
    return disk_full_message(path, done, error, resume="rerun the same command with --resume latest"
                             if complete else "rerun the same command")


def run_from_args(args: argparse.Namespace) -> int:
    from common.disk_full import DISK_FULL_EXIT, find_disk_full

    from .trainer import TrainError, train

    overrides = overrides_from(args)
    cfg = None
    try:
        cfg = load_config(args.config, overrides, model=TrainConfig)
        if not cfg.shards and not cfg.dataset:
            raise ConfigError("no data: pass --shards (a build folder, .tar files, brace patterns or URLs) or --dataset")
        if cfg.ray:
            from .ray_train import train_on_ray

            train_on_ray(cfg)
        else:
            train(cfg)
    except (ConfigError, TrainError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a full disk while saving (on Ray too: found inside Ray's wrappers)
        error = find_disk_full(exc)
        if error is None or cfg is None or getattr(args, "debug", False):
            raise
        print(f"error: {disk_full_line(error, cfg.output_dir)}", file=sys.stderr)
        return DISK_FULL_EXIT
    return 0
