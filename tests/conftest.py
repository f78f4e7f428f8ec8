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


@pytest.fixture(scope="session")
def family_builds(tmp_path_factory) -> dict:
    """Per family (sd, sdxl, sd3, flux): a tiny random-weight base saved locally and a build
    of 6 captioned pictures with that base's prompt embeddings (`--text-embeddings`), so a
    run may train and validate without text encoders. Shared by the tests that need it."""
    from pipeline.build import run_build
    from pipeline.config import BuildConfig
    from tiny_models import make_tiny_flux, make_tiny_sd, make_tiny_sd3, make_tiny_sdxl

    root = tmp_path_factory.mktemp("family_builds")
    write_synthetic(root / "in", 6, size=(96, 80))
    for i in range(6):
        (root / "in" / f"synth_{i:04d}.txt").write_text(f"a red square on a blue sky {i}" if i % 2 else "a cat")
    out = {}
    for name, make in (("sd", make_tiny_sd), ("sdxl", make_tiny_sdxl), ("sd3", make_tiny_sd3),
                       ("flux", make_tiny_flux)):
        base = make(root / name)
        run_build(BuildConfig(input=[str(root / "in")], output=str(root / f"out_{name}"), resolution=64, min_size=64,
                              caption_model="none", keep_captions=True, executor="local", samples_per_shard=3,
                              preview=0, report_samples=0, text_embeddings=str(base)), log=lambda *_: None)
        out[name] = (base, root / f"out_{name}")
    return out


def tiny_train_config(out, base, run, **kw):
    """A TrainConfig for a few steps at 64 px on `out`'s shards, validation at step 3 on 2
    images; `kw` overrides."""
    from train.config import TrainConfig

    values = dict(shards=[str(out)], pretrained_model=str(base), output_dir=str(run), resolution=64,
                  train_batch_size=2, max_train_steps=3, checkpointing_steps=100, validation_steps=3,
                  num_validation_images=2, validation_inference_steps=2, dataloader_num_workers=0, shuffle_buffer=4,
                  report_to="none", learning_rate=1e-3)
    values.update(kw)
    return TrainConfig(**values)
