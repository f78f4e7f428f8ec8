"""The build's licence record: enforced before any work, resolved once per build.

`enforce` runs first (declared and model-card licences only: no hashing) so that a
`--licence-policy commercial` build with a non-commercial annotator stops before it
lists or fetches anything. `resolve` runs after the weights are found: it hashes each
weight file once, hands every annotator the short reference its samples' json carries,
and returns the records the manifest keeps. A resumed build whose weights changed since
it began would mix maps from two models in one dataset: it stops and says so.
"""

from __future__ import annotations

from typing import Any

from stages.annotators import REGISTRY, Annotator
from stages.annotators.licences import LicencePolicyError, LicenceRecord, check_policy


def enforce(policy: str, annotators: dict[str, Annotator]) -> None:
    """Raise LicencePolicyError naming every condition the policy refuses."""
    records = [a.licence_record(name, hash_weights=False) for name, a in annotators.items()]
    check_policy(records, policy, {name: _registered(a.alternative()) for name, a in annotators.items()})


def _registered(alternative: str | None) -> str | None:
    """Suggest only what this install can build (a condition name, or a setting of one)."""
    if alternative is None:
        return None
    return alternative if alternative.split()[0] in REGISTRY else None


def resolve(annotators: dict[str, Annotator], recorded: dict[str, Any] | None, output: str) -> dict[str, Any]:
    """{condition: record} with sha256s; each annotator gets its json reference. `recorded`:
    what the manifest holds from an earlier run of this build (None for a new one)."""
    records: dict[str, LicenceRecord] = {name: a.licence_record(name) for name, a in annotators.items()}
    changed = [name for name, record in records.items()
               if recorded and name in recorded and recorded[name].get("weights_sha256") != record.weights_sha256]
    if changed:
        raise LicencePolicyError(
            f"the weights of {', '.join(changed)} changed since {output} was started (their sha256 differs from "
            "manifest.json's licences): the dataset would mix two models; use a new --output, or --overwrite")
    for name, annotator in annotators.items():
        annotator.licence_ref = records[name].reference()
    return {name: record.as_json() for name, record in records.items()}
