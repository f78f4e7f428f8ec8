"""Line drawings: controlnet-aux lineart (realistic, `coarse` option) and lineart_anime."""

from __future__ import annotations

from .base import register
from .detector import DetectorAnnotator, fit


@register
class Lineart(DetectorAnnotator):
    name = "lineart"
    mode = "L"
    files = ("sk_model.pth", "sk_model2.pth")

    def __init__(self, coarse: bool = False, **common):
        super().__init__(coarse=coarse, **common)
        self.coarse = coarse

    def load(self, folder):
        from controlnet_aux import LineartDetector

        return LineartDetector.from_pretrained(str(folder))

    def __call__(self, image, rng):
        return fit(self.run(image, coarse=self.coarse), image, self.mode), {}


@register
class LineartAnime(DetectorAnnotator):
    name = "lineart_anime"
    mode = "L"
    files = ("netG.pth",)

    def load(self, folder):
        from controlnet_aux import LineartAnimeDetector

        return LineartAnimeDetector.from_pretrained(str(folder))

    def __call__(self, image, rng):
        return fit(self.run(image), image, self.mode), {}
