"""`controlforge train`: flags are generated from TrainConfig, so YAML keys and flags never drift."""

from __future__ import annotations

import argparse
import sys
import types
import typing

from pydantic import BaseModel

from common.config import ConfigError, load_config

from .config import TrainConfig


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
        help_text = f"{field.description or ''} (default {field.get_default(call_default_factory=True)!r})".strip()
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(base) is list:
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        elif typing.get_origin(base) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(base), default=None, help=help_text)
        else:
            parser.add_argument(flag, type=base if base in (int, float) else str, default=None, help=help_text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of the settings below; flags override it")
    add_model_flags(parser, TrainConfig)


def run_from_args(args: argparse.Namespace) -> int:
    from .trainer import TrainError, train

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command")}
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
