"""Condition annotators. Importing this package registers every built-in one."""

from .base import REGISTRY, Annotator, AnnotatorError, create, register, sample_seed
from . import canny, depth, face_mesh, hed, lineart, mlsd, normal, openpose, scribble, seg  # noqa: F401  (register)
from .weights import MissingWeightsError

__all__ = ["REGISTRY", "Annotator", "AnnotatorError", "MissingWeightsError", "create", "register", "sample_seed"]
