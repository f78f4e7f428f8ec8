"""Canny and the annotator registry: classical behaviour checked for real."""

from __future__ import annotations

import numpy as np
import pytest

from stages.annotators import REGISTRY, AnnotatorError, create, sample_seed


def square_image(size=128, lo=32, hi=96) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[lo:hi, lo:hi] = 255
    return img


def test_canny_finds_the_square_outline_and_nothing_else():
    canny = create(["canny"])["canny"]
    edges, used = canny(square_image(), np.random.default_rng(0))
    assert edges.shape == (128, 128) and edges.dtype == np.uint8
    ys, xs = np.nonzero(edges)
    assert len(ys) > 200  # four sides of 64 px
    # every edge pixel lies within one pixel of the square's border
    on_border = (np.minimum(np.abs(ys[:, None] - [31, 32, 95, 96]).min(1), np.abs(xs[:, None] - [31, 32, 95, 96]).min(1)) <= 1)
    assert on_border.all()
    assert edges[64, 64] == 0 and edges[5, 5] == 0
    assert 50 <= used["low_threshold"] <= used["high_threshold"] <= 250


def test_canny_thresholds_are_random_per_image_but_seeded():
    canny = create(["canny"], {"canny": {"low_threshold": [10, 200], "high_threshold": [100, 250]}})["canny"]
    draws = [canny(square_image(), np.random.default_rng(sample_seed(0, f"{k:016x}", "canny")))[1] for k in range(20)]
    assert len({(d["low_threshold"], d["high_threshold"]) for d in draws}) > 10
    again = [canny(square_image(), np.random.default_rng(sample_seed(0, f"{k:016x}", "canny")))[1] for k in range(20)]
    assert draws == again
    assert sample_seed(0, "00000000000000ab", "canny") != sample_seed(1, "00000000000000ab", "canny")
    assert sample_seed(0, "00000000000000ab", "canny") != sample_seed(0, "00000000000000ab", "hed")


def test_registry_rejects_unknown_names_and_bad_params():
    assert "canny" in REGISTRY
    with pytest.raises(AnnotatorError, match="unknown condition"):
        create(["canny", "nonsense"])
    with pytest.raises(AnnotatorError, match="canny"):
        create(["canny"], {"canny": {"low_threshold": [200, 100]}})
    with pytest.raises(AnnotatorError, match="canny"):
        create(["canny"], {"canny": {"sigma": 3}})
