"""`controlforge train`: flags are generated from TrainConfig, so YAML keys and flags never drift."""

from __future__ import annotations

import argparse
import sys

from common.config import ConfigError, load_config
from common.flags import add_model_flags, overrides_from

from .config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of the settings below; flags override it")
    add_model_flags(parser, TrainConfig)


def run_from_args(args: argparse.Namespace) -> int:
    from .trainer import TrainError, train

    overrides = overrides_from(args)
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
    return 0
