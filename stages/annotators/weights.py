"""Where annotator weights come from: one setting per annotator, a hub id or a local folder.

A missing file is one clear error that names the file and the setting to change,
never a stack trace from deep inside a library. Checkpoints are read by torch.load,
whose default in the pinned torch is weights_only=True: no pickled code runs.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_REPO = "lllyasviel/Annotators"


class MissingWeightsError(FileNotFoundError):
    """Annotator weights that cannot be found; the message says what and how to fix it."""


def resolve_weight_files(source: str, files: tuple[str, ...], condition: str, repo: str = DEFAULT_REPO) -> Path:
    """The local folder holding `files`, from a folder or a hub repo (via the HF cache);
    `repo`: where the default files come from, named when a folder lacks them."""
    setting = f"annotator_params.{condition}.weights"
    if os.path.isdir(source):
        missing = [f for f in files if not os.path.isfile(os.path.join(source, f))]
        if missing:
            raise MissingWeightsError(
                f"{condition}: weight file(s) {', '.join(missing)} not found in {source}; put them there "
                f"(from the hub repo {repo}) or point {setting} at a folder that has them")
        return Path(source)
    from huggingface_hub import hf_hub_download

    folder = None
    for name in files:
        try:
            folder = Path(hf_hub_download(source, name)).parent
        except Exception as exc:  # offline, unknown repo, missing file: all the same to a user
            raise MissingWeightsError(
                f"{condition}: cannot get weight file {name} from {source!r} ({type(exc).__name__}). "
                f"Without hub access, download {name} from {source} elsewhere, copy it into a folder and set "
                f"{setting} to that folder (YAML: annotator_params: {{{condition}: {{weights: /path/to/folder}}}})"
            ) from None
    return folder


def torch_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")
