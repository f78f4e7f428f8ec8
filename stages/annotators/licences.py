"""What made each condition map, and under which licence: recorded and enforced.

Every annotator declares the licence of its code and of its default weights (and where
those weights come from). A build resolves what each annotator will actually load, once
on the driver: the weights' sha256, and their licence. The declared licence holds only
for the declared weights; weights from another hub repo or a local folder take the
licence their model card states (`license:` in a README.md's front matter), else
`unknown`. The record goes into the manifest, each sample's json (a short reference)
and the dataset card; `--licence-policy commercial` refuses, before any work, every
condition whose weights are not cleared for commercial use.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"
#: licences that allow commercial use (SPDX ids); anything else, `unknown` included, does not
COMMERCIAL = frozenset({"Apache-2.0", "MIT", "BSD-2-Clause", "BSD-3-Clause", "ISC", "CC0-1.0", "CC-BY-4.0",
                        "Unlicense", "Zlib", "PSF-2.0", "MPL-2.0"})
#: model-card licence ids (huggingface.co's list) -> SPDX
_HUB_IDS = {"apache-2.0": "Apache-2.0", "mit": "MIT", "bsd-2-clause": "BSD-2-Clause", "bsd-3-clause": "BSD-3-Clause",
            "isc": "ISC", "cc0-1.0": "CC0-1.0", "cc-by-4.0": "CC-BY-4.0", "cc-by-nc-4.0": "CC-BY-NC-4.0",
            "cc-by-nc-sa-4.0": "CC-BY-NC-SA-4.0", "cc-by-sa-4.0": "CC-BY-SA-4.0", "unlicense": "Unlicense",
            "mpl-2.0": "MPL-2.0", "gpl-3.0": "GPL-3.0", "agpl-3.0": "AGPL-3.0"}
POLICIES = ("any", "commercial")
#: weight files a transformers folder may hold
_MODEL_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|onnx|tflite)$")


class LicencePolicyError(ValueError):
    """A condition whose weights the chosen --licence-policy does not allow."""


@dataclass(frozen=True)
class LicenceRecord:
    """One condition: who drew it, from which weights, under which licences."""

    condition: str
    annotator: str
    code_licence: str
    weights: str | None  # the weights setting (hub id or folder); None = no weights
    weights_licence: str | None
    weights_source: str | None
    weights_sha256: dict[str, str]  # file name -> sha256 of the file loaded

    @property
    def commercial(self) -> bool:
        licences = [self.code_licence] + ([self.weights_licence or UNKNOWN] if self.weights else [])
        return all(licence in COMMERCIAL for licence in licences)

    @property
    def digest(self) -> str | None:
        """A short fingerprint of all the weight files (12 hex digits), or None without weights."""
        if not self.weights_sha256:
            return None
        joined = "\n".join(f"{name} {sha}" for name, sha in sorted(self.weights_sha256.items()))
        return hashlib.sha256(joined.encode()).hexdigest()[:12]

    def reference(self) -> dict[str, Any]:
        """What each sample's json carries: the licence and the weights' fingerprint."""
        ref: dict[str, Any] = {"licence": self.weights_licence if self.weights else self.code_licence}
        if self.digest:
            ref["weights_sha256"] = self.digest
        return ref

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "commercial": self.commercial, "digest": self.digest}


def hub_repo(source: str | None) -> str | None:
    """`owner/name` of a huggingface.co URL, else None."""
    match = re.match(r"https?://huggingface\.co/([^/]+/[^/]+)", source or "")
    return match.group(1) if match else None


def card_licence(folder: str | os.PathLike) -> str:
    """The `license:` of a model card (README.md front matter) in `folder`, as SPDX where known."""
    readme = Path(folder) / "README.md"
    try:
        text = readme.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return UNKNOWN
    front = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    found = re.search(r"^license:\s*['\"]?([^'\"\n]+?)['\"]?\s*$", front.group(1), re.M) if front else None
    if not found:
        return UNKNOWN
    value = found.group(1).strip()
    return _HUB_IDS.get(value.lower(), value)


def weights_licence(weights: str, declared: str | None, source: str | None) -> tuple[str, str]:
    """(licence, source) of the weights a setting names: the declared licence when it names
    the declared repo; a folder's or a cached hub repo's model card; else unknown."""
    if declared is not None and weights == hub_repo(source):
        return declared, source or weights
    if os.path.isdir(weights):
        return card_licence(weights), os.path.abspath(weights)
    try:  # another hub repo: its card, if it is in the local cache (never a download here)
        from huggingface_hub import hf_hub_download

        return card_licence(Path(hf_hub_download(weights, "README.md", local_files_only=True)).parent), \
            f"https://huggingface.co/{weights}"
    except Exception:
        return UNKNOWN, f"https://huggingface.co/{weights}"


def sha256_files(paths) -> dict[str, str]:
    """{file name: sha256} of the files (read in 1 MiB blocks)."""
    digests = {}
    for path in sorted(Path(p) for p in paths):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests[path.name] = digest.hexdigest()
    return digests


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files in a model folder (transformers / diffusers layouts), recursively."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and _MODEL_FILES.match(p.name))


def check_policy(records: list[LicenceRecord], policy: str, alternatives: dict[str, str | None]) -> None:
    """Under `commercial`, one error naming every condition whose weights are not cleared,
    their licence, and a permissive alternative where there is one."""
    if policy not in POLICIES:
        raise LicencePolicyError(f"licence policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "any":
        return
    refused = []
    for record in records:
        if record.commercial:
            continue
        what = (f"its weights {record.weights} are licensed {record.weights_licence}"
                if record.weights and record.code_licence in COMMERCIAL
                else f"its code is licensed {record.code_licence}")
        if record.weights_licence == UNKNOWN:
            what += " (no licence is known for them: a local folder needs a model card README.md with `license:`)"
        alternative = alternatives.get(record.condition)
        hint = f"; use {alternative} instead" if alternative else ""
        refused.append(f"{record.condition}: {what}, not cleared for commercial use{hint}")
    if refused:
        raise LicencePolicyError("--licence-policy commercial refuses " + "; ".join(refused))
