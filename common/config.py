"""Typed configs from YAML plus command-line overrides: shared by every command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel


class ConfigError(ValueError):
    """A config that cannot run: the message says which field and why."""


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                model: type[BaseModel]) -> Any:
    """YAML file (if any), then CLI overrides (None values are 'not given'), validated as `model`."""
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(loaded).__name__}")
        data.update(loaded or {})
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return model.model_validate(data)
    except Exception as exc:  # pydantic.ValidationError: keep its field-by-field message
        where = f" (from {path})" if path else ""
        raise ConfigError(f"invalid {model.__name__}{where}:\n{exc}") from None
