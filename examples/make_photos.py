"""Writes the bundled example: public-domain / CC0 photos that ship inside scikit-image,
as JPEGs with sidecar captions, so the quick start runs offline.

    python examples/make_photos.py examples/photos
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = {  # skimage.data name -> caption (licences from skimage.data's docstrings)
    "astronaut": "an astronaut in a white spacesuit posing in front of an american flag",  # public domain (NASA)
    "chelsea": "a tabby cat lying down and looking at the camera",  # CC0, Stefan van der Walt
    "coffee": "a cup of coffee with latte art on a saucer",  # CC0, Rachel Michetti
    "rocket": "a rocket on its launch pad under a blue sky",  # public domain (SpaceX)
    "hubble_deep_field": "a field of distant galaxies in deep space",  # public domain (NASA)
    "camera": "a black and white photo of a man with a camera on a tripod",  # CC0, Lav Varshney
    "coins": "a grid of old coins on a dark background",  # no known copyright restrictions
}


def write_photos(folder: str | Path) -> list[Path]:
    import skimage.data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, caption in PHOTOS.items():
        image = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
        path = folder / f"{name}.jpg"
        image.save(path, quality=90)
        (folder / f"{name}.txt").write_text(caption + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_photos(sys.argv[1] if len(sys.argv) > 1 else "examples/photos"):
        print(path)
