"""Shared fixtures: Ray kept in a temporary folder and started once, a tiny random
BLIP saved locally, real photos from scikit-image and synthetic images."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_RAY_HOME = tempfile.mkdtemp(prefix="cf-ray-")
os.environ["RAY_TMPDIR"] = _RAY_HOME  # Ray's sockets and logs stay out of /tmp/ray
os.environ["HOME"] = _RAY_HOME  # and its auth token out of the real ~/.ray
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from pipeline.executors import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_blip

    return make_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


REAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def write_real_photos(folder: Path, names=REAL_PHOTOS, captions: bool = False) -> list[Path]:
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.jpg"
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").save(path, quality=92)
        if captions:
            (folder / f"{name}.txt").write_text(f"a photo called {name}\n")
        paths.append(path)
    return paths


def synthetic_image(seed: int, size=(384, 320)) -> Image.Image:
    """Shapes over a gradient with noise: edges in known places, distinct bytes per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    img = np.concatenate([x + 0 * y, y + 0 * x, np.full((h, w, 1), rng.integers(0, 255))], axis=2)
    img = img + rng.normal(0, 4, img.shape)
    x0, y0 = rng.integers(0, max(1, w // 2)), rng.integers(0, max(1, h // 2))
    img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 255, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_synthetic(folder: Path, count: int, start: int = 0, size=(384, 320)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"synth_{i:04d}.jpg"
        synthetic_image(i, size).save(path, quality=90)
        paths.append(path)
    return paths
