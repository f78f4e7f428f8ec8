"""Condition annotators. Importing this package registers every built-in one."""

from .base import REGISTRY, Annotator, AnnotatorError, create, register, sample_seed
from . import (anyline, canny, color_grid, depth, depth_anything, dwpose, face_mesh, hed, lineart,  # noqa: F401
               lineart_standard, mlsd, normal, openpose, sam, scribble, seg, shuffle, teed)  # (register)
from .weights import MissingWeightsError

__all__ = ["REGISTRY", "Annotator", "AnnotatorError", "MissingWeightsError", "create", "register", "sample_seed"]
