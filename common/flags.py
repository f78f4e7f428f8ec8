"""Command-line flags generated from a typed config, so YAML keys, flags and defaults
are written once (in the config) and never drift apart."""

from __future__ import annotations

import argparse
import json
import types
import typing

from pydantic import BaseModel


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per field of `model`: `--field-name`, typed from its annotation, with the
    field's description and default as help. Every flag defaults to None (not given), so
    a YAML value is only overridden by a flag the user typed."""
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        help_text = f"{field.description or ''} ({default})".strip()
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(base) is list:  # `--input a b` and `--input a --input b` alike
            parser.add_argument(flag, nargs="+", action="extend", default=None, help=help_text)
        elif typing.get_origin(base) is dict or base is dict:
            parser.add_argument(flag, type=_json_object, default=None, metavar="JSON", help=help_text)
        elif typing.get_origin(base) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(base), default=None, help=help_text)
        else:
            parser.add_argument(flag, type=base if base in (int, float) else str, default=None, help=help_text)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


#: flags that say how a command runs or reports, not what it does: never config fields
NOT_CONFIG = ("config", "func", "command", "debug")


def overrides_from(args: argparse.Namespace) -> dict[str, typing.Any]:
    """The config fields a parsed command line sets (None = not given)."""
    return {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
