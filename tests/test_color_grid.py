"""color_grid (T2I-Adapter's colour condition): cells hold their region's mean colour, the
map has the image's size, no shapes survive, and bad settings are one clear error."""

from __future__ import annotations

import numpy as np
import pytest

from stages.annotators import REGISTRY, AnnotatorError, create


def test_each_cell_is_its_regions_mean_colour():
    image = np.zeros((64, 96, 3), np.uint8)
    for row in range(2):  # 2 x 3 flat blocks of 32 px
        for col in range(3):
            image[32 * row:32 * (row + 1), 32 * col:32 * (col + 1)] = (40 * col + 10, 100 * row + 20, 7 * col)
    grid, used = create(["color_grid"], {"color_grid": {"cells": 2}})["color_grid"](image, np.random.default_rng(0))
    assert grid.shape == image.shape and grid.dtype == np.uint8 and used == {}
    assert np.array_equal(grid, image)  # 2 cells on the short side: 2 x 3 cells of 32 px, one per block
    wrong = create(["color_grid"], {"color_grid": {"cells": 3}})["color_grid"](image, np.random.default_rng(0))[0]
    assert not np.array_equal(wrong, image)  # cells that straddle blocks mix them
    noisy = np.random.default_rng(1).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    grid, _ = create(["color_grid"], {"color_grid": {"cells": 4}})["color_grid"](noisy, np.random.default_rng(0))
    cell = noisy[16:32, 32:48].reshape(-1, 3).mean(0)
    assert np.abs(grid[16:32, 32:48].reshape(-1, 3) - cell).max() <= 1  # area averaging
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) <= 16


def test_shapes_do_not_survive_but_colour_does():
    image = np.full((64, 64, 3), 30, np.uint8)
    image[20:44, 20:44] = (255, 0, 0)  # a red square spanning cells partly
    grid, _ = create(["color_grid"])["color_grid"](image, np.random.default_rng(0))  # 8 cells of 8 px
    assert grid[31, 31, 0] == 255 and grid[2, 2, 0] == 30
    assert grid[20, 20, 0] not in (30, 255)  # a cell the edge crosses is a mix: the edge is gone


def test_registered_without_weights_and_bad_settings_are_clear():
    cls = REGISTRY["color_grid"]
    assert cls.mode == "RGB" and not cls.uses_model and cls.weights_licence is None
    record = create(["color_grid"])["color_grid"].licence_record("color_grid")
    assert record.weights is None and record.commercial
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(AnnotatorError, match="color_grid cells"):
            create(["color_grid"], {"color_grid": {"cells": bad}})
