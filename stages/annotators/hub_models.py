"""Loading transformers models for annotators with the same clear missing-weights error."""

from __future__ import annotations

from typing import Any

from .weights import MissingWeightsError


def check(source: str, condition: str) -> None:
    from transformers.utils import cached_file

    from_pretrained(lambda: cached_file(source, "config.json"), source, condition)


def from_pretrained(loader: Any, source: str, condition: str) -> Any:
    try:
        return loader() if callable(loader) and not hasattr(loader, "from_pretrained") else loader.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise MissingWeightsError(
            f"{condition}: cannot load model {source!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            f"Without hub access, download it elsewhere (`huggingface-cli download {source} --local-dir DIR`), "
            f"copy DIR here and set annotator_params.{condition}.weights to it") from None
