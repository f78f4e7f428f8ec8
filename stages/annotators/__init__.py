"""Condition annotators. Importing this package registers every built-in one."""

from .base import REGISTRY, Annotator, AnnotatorError, create, register, sample_seed
from . import canny  # noqa: F401  (registers)

__all__ = ["REGISTRY", "Annotator", "AnnotatorError", "create", "register", "sample_seed"]
