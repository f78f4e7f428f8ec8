"""Line drawings: controlnet-aux lineart (realistic, `coarse` option) and lineart_anime."""

from __future__ import annotations

from .base import register
import cv2
import numpy as np

from .detector import DetectorAnnotator, aux_resized, aux_tensor, fit


@register
class Lineart(DetectorAnnotator):
    name = "lineart"
    mode = "L"
    files = ("sk_model.pth", "sk_model2.pth")
    batch_size = 16
    # from carolineec/informative-drawings, which states no licence that we could confirm
    weights_licence = "unknown"
    weights_source = "https://huggingface.co/lllyasviel/Annotators/blob/main/sk_model.pth"
    permissive_alternative = "lineart_standard"

    def __init__(self, coarse: bool = False, **common):
        super().__init__(coarse=coarse, **common)
        self.coarse = coarse
        self.net_path = "model_coarse" if coarse else "model"

    def load(self, folder):
        from controlnet_aux import LineartDetector

        return LineartDetector.from_pretrained(str(folder))

    def single(self, image, rng):
        return fit(self.run(image, coarse=self.coarse), image, self.mode), {}

    def prepare(self, image):
        return aux_tensor(aux_resized(image, self.detect_resolution)) / 255.0


@register
class LineartAnime(DetectorAnnotator):
    name = "lineart_anime"
    mode = "L"
    files = ("netG.pth",)
    batch_size = 16
    # from Mukosame/Anime2Sketch, whose licence we could not confirm
    weights_licence = "unknown"
    weights_source = "https://huggingface.co/lllyasviel/Annotators/blob/main/netG.pth"
    permissive_alternative = "lineart_standard"
    cpu_batch = None  # its U-Net's deep layers are a few pixels wide: batch 8 ran at 0.63x on a 2-core CPU
    net_path = "model"

    def load(self, folder):
        from controlnet_aux import LineartAnimeDetector

        return LineartAnimeDetector.from_pretrained(str(folder))

    def single(self, image, rng):
        return fit(self.run(image), image, self.mode), {}

    def prepare(self, image):
        """controlnet-aux's lineart_anime: the detect-size image, cubic-resized up to multiples of 256, in [-1, 1]."""
        small = aux_resized(image, self.detect_resolution)
        height, width = (256 * int(np.ceil(float(n) / 256.0)) for n in small.shape[:2])
        return aux_tensor(cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)) / 127.5 - 1.0
