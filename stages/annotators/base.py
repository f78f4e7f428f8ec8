"""The annotator contract and registry.

An annotator is `image -> condition image`: a pure call on an RGB uint8 array
and a seeded random generator, returning the condition array and the parameters
it used (recorded in the sample's json). Adding a condition is one module that
defines an `Annotator` subclass and decorates it with `@register`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

REGISTRY: dict[str, type["Annotator"]] = {}


class AnnotatorError(ValueError):
    """Unknown condition names or bad annotator parameters."""


class Annotator:
    #: condition name, as in SCHEMA.md (`KEY.<name>.png`)
    name: ClassVar[str]
    #: "L" (single-channel 8-bit) or "RGB"
    mode: ClassVar[str] = "L"
    #: bump when the output for the same input and parameters changes
    version: ClassVar[str] = "1"
    #: holds a network: on a cluster with GPUs it runs in a GPU actor, else in the CPU shard task
    uses_model: ClassVar[bool] = False
    #: output dtype (uint16 for 16-bit depth)
    dtype: type = np.uint8
    #: images per call when run as a batched step (a GPU actor)
    batch_size: int = 8
    #: licence of the code that draws the map (SPDX id): OpenCV, controlnet-aux, transformers, ours
    code_licence: ClassVar[str] = "Apache-2.0"
    #: licence of the default weights (SPDX id, or a name and a link where there is none);
    #: None: the annotator needs no weights
    weights_licence: ClassVar[str | None] = None
    #: where the default weights come from (a URL)
    weights_source: ClassVar[str | None] = None
    #: a condition to suggest when these weights may not be used commercially
    permissive_alternative: ClassVar[str | None] = None

    def __init__(self, **params: Any):
        self.params = params
        #: the licence and weights fingerprint each sample's json carries (set by the build)
        self.licence_ref: dict[str, Any] = {}

    def setup(self) -> None:
        """Load weights; called once per worker before the first image."""

    def check_weights(self) -> None:
        """Cheap check on the driver that the weights can be found (raises MissingWeightsError)."""

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError

    def annotate_batch(self, images: list[np.ndarray], rngs: list[np.random.Generator]) -> list:
        """Several images at once; networks that batch override this."""
        return [self(image, rng) for image, rng in zip(images, rngs)]

    def describe(self, used: dict[str, Any]) -> dict[str, Any]:
        """What goes into the sample's json: settings, then the values drawn for this image,
        then the licence reference (when the build has resolved it)."""
        return {"annotator": type(self).__name__, "version": self.version, "params": {**self.params, **used},
                **self.licence_ref}

    # -- licences (stages/annotators/licences.py) ----------------------------------------------

    def weights_setting(self) -> str | None:
        """The weights this annotator loads as its setting names them (hub id or folder); None: none."""
        return None

    def weight_files(self) -> list:
        """The files it loads (resolved local paths), for their sha256."""
        return []

    def declared_weights(self) -> tuple[str | None, str | None]:
        """(licence, source) of the default weights of this annotator as configured."""
        return self.weights_licence, self.weights_source

    def alternative(self) -> str | None:
        """A permissively licensed condition to suggest in its place."""
        return self.permissive_alternative

    def licence_record(self, condition: str, hash_weights: bool = True):
        """Its code's licence, the weights it loads, their licence and source, and (when
        `hash_weights`) each file's sha256."""
        from .licences import LicenceRecord, sha256_files, weights_licence

        weights = self.weights_setting()
        if weights is None:
            return LicenceRecord(condition, type(self).__name__, self.code_licence, None, None, None, {})
        licence, source = weights_licence(weights, *self.declared_weights())
        digests = sha256_files(self.weight_files()) if hash_weights else {}
        return LicenceRecord(condition, type(self).__name__, self.code_licence, weights, licence, source, digests)


def register(cls: type[Annotator]) -> type[Annotator]:
    REGISTRY[cls.name] = cls
    return cls


def sample_seed(build_seed: int, key: str, condition: str) -> int:
    """A per-sample, per-condition seed: a rebuild draws the same random parameters.
    63 bits, so it fits a signed int64 column when the json is read by Arrow."""
    digest = np.random.SeedSequence([build_seed, int(key, 16), *condition.encode()]).generate_state(2, np.uint32)
    return (int(digest[0]) << 32 | int(digest[1])) >> 1


def create(names: list[str], params: dict[str, dict[str, Any]] | None = None) -> dict[str, Annotator]:
    """Instantiate the named annotators, in the order given; unknown names are one clear error."""
    params = params or {}
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise AnnotatorError(f"unknown condition(s) {unknown}; available: {sorted(REGISTRY)}")
    stray = sorted(set(params) - set(REGISTRY))
    if stray:
        raise AnnotatorError(f"annotator_params for unknown condition(s) {stray}; available: {sorted(REGISTRY)}")
    made = {}
    for name in names:
        try:
            made[name] = REGISTRY[name](**params.get(name, {}))
        except TypeError as exc:
            raise AnnotatorError(f"bad annotator_params for {name!r}: {exc}") from None
    return made
