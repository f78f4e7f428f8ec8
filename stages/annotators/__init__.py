"""Condition annotators. Importing this package registers every built-in one."""

from .base import REGISTRY, Annotator, AnnotatorError, create, register, sample_seed
from . import (anyline, canny, depth, depth_anything, dwpose, face_mesh, hed, lineart, lineart_standard,  # noqa: F401
               mlsd, normal, openpose, sam, scribble, seg, shuffle, teed)  # (register)
from .weights import MissingWeightsError

__all__ = ["REGISTRY", "Annotator", "AnnotatorError", "MissingWeightsError", "create", "register", "sample_seed"]
