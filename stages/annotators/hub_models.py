"""Loading transformers models for annotators with the same clear missing-weights error."""

from __future__ import annotations

from typing import Any

from .weights import MissingWeightsError


def check(source: str, condition: str) -> None:
    """Cheap: finds the model's config (local folder or HF cache/hub) without loading weights."""
    from transformers.utils import cached_file

    try:
        found = cached_file(source, "config.json")
    except (OSError, ValueError) as exc:
        raise _missing(source, condition, exc) from None
    if found is None:  # transformers 5 returns None for a local folder without the file
        raise _missing(source, condition, FileNotFoundError(f"no config.json in {source}"))


def model_files(source: str) -> list:
    """The weight files of a transformers model: in its folder, or its snapshot in the HF cache."""
    import os

    from .licences import model_files as files_in

    if os.path.isdir(source):
        return files_in(source)
    from huggingface_hub import snapshot_download

    return files_in(snapshot_download(source, local_files_only=True))


def load_model(annotator: Any, processor_class: Any, model_class: Any) -> None:
    """A transformers annotator's processor and model, loaded once from its `weights`,
    on its device and in its precision (its `cast`)."""
    if annotator.model is not None:
        return
    from .weights import torch_device

    annotator.processor = from_pretrained(processor_class, annotator.weights, annotator.name)
    annotator.device = torch_device(annotator.device)
    annotator.model = from_pretrained(model_class, annotator.weights, annotator.name).to(annotator.device).eval()
    annotator.cast()


def from_pretrained(loader: Any, source: str, condition: str) -> Any:
    try:
        return loader.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise _missing(source, condition, exc) from None


def _missing(source: str, condition: str, exc: Exception) -> MissingWeightsError:
    return MissingWeightsError(
        f"{condition}: cannot load model {source!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
        f"Without hub access, download it elsewhere (`huggingface-cli download {source} --local-dir DIR`), "
        f"copy DIR here and set annotator_params.{condition}.weights to it")
