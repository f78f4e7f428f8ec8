"""A deep annotator behind the `image -> condition` contract: weights from one
setting (hub id or folder), loaded once per worker, output fitted to the image."""

from __future__ import annotations

import contextlib
import copy
import functools
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from ..models.precision import PRECISIONS, resolve, torch_dtype
from .base import Annotator, AnnotatorError
from .weights import DEFAULT_REPO, resolve_weight_files, torch_device


def fit(detected: Any, image: np.ndarray, mode: str, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """The detector's map at exactly the image's size and channel count.

    controlnet-aux resizes to multiples of 64; conditions must match the stored image."""
    arr = np.asarray(detected)
    if arr.ndim == 3 and mode == "L":
        arr = arr[..., 0]
    elif arr.ndim == 2 and mode == "RGB":
        arr = np.repeat(arr[..., None], 3, axis=2)
    height, width = image.shape[:2]
    if arr.shape[:2] != (height, width):
        arr = cv2.resize(arr, (width, height), interpolation=interpolation)
    return np.ascontiguousarray(arr.astype(np.uint8))


def aux_resized(image: np.ndarray, resolution: int) -> np.ndarray:
    """What controlnet-aux's calls do first: HWC3, then resize_image to the detect resolution."""
    from controlnet_aux.util import HWC3, resize_image

    return resize_image(HWC3(image), resolution)


def aux_tensor(array: np.ndarray):
    """HWC array -> (1, C, H, W) float32 CPU tensor, as controlnet-aux's from_numpy().float() + rearrange."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).float().permute(2, 0, 1)[None]


class DetectorAnnotator(Annotator):
    """A network annotator. `single` is the reference path (controlnet-aux's own call,
    one image); `annotate_batch` runs one forward pass per batch of same-shaped inputs:
    `prepare` each image into the network's input (1, C, H, W), stack, `forward`, then
    `finish` each image on its own. By default `finish` replays the image's slice of the
    batched output through `single`, with the controlnet-aux network swapped for a stand-in
    that checks `prepare` built the very input controlnet-aux builds: pre- and
    post-processing are controlnet-aux's own, only the forward pass is batched."""

    #: weight files the default method needs, relative to the weights folder / repo
    files: ClassVar[tuple[str, ...]] = ()
    uses_model: ClassVar[bool] = True
    #: "auto" precision picks fp16 on CUDA for networks that tolerate it (else fp32)
    half_safe: ClassVar[bool] = True
    #: fp32 | fp16 | bf16 | auto; set with set_precision() before setup()
    precision: str = "fp32"
    #: low precision through torch.autocast, weights left fp32 (networks that build fp32 tensors in forward)
    autocast: ClassVar[bool] = False
    #: images per forward pass on a CPU (None: the whole batch). 1 for full-resolution conv nets: on a
    #: CPU their batched activations (8 x 64 x 256^2 floats = 134 MB a layer) leave the caches and a
    #: batch of 8 ran 1.2-2x slower than 8 single passes; GPUs always take the whole batch
    cpu_batch: int | None = 1

    def __init__(self, weights: str = DEFAULT_REPO, detect_resolution: int = 512, device: str | None = None,
                 batch_size: int | None = None, **params: Any):
        super().__init__(weights=weights, detect_resolution=detect_resolution, **params)
        if batch_size is not None:  # a throughput setting, not recorded: maps match across batch sizes
            if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
                raise AnnotatorError(f"{self.name} batch_size must be a positive integer, got {batch_size!r}")
            self.batch_size = batch_size
        self.weights = weights
        self.detect_resolution = detect_resolution
        self.device = device
        self.model = None

    def required_files(self) -> tuple[str, ...]:
        return self.files

    def weights_setting(self) -> str | None:
        return self.weights if self.required_files() else None

    def weight_files(self) -> list:
        if not self.required_files():
            return []
        folder = resolve_weight_files(self.weights, self.required_files(), self.name)
        return [folder / name for name in self.required_files()]

    def check_weights(self) -> None:
        if self.required_files():
            resolve_weight_files(self.weights, self.required_files(), self.name)

    def setup(self) -> None:
        if self.model is not None or not self.required_files():
            return
        folder = resolve_weight_files(self.weights, self.required_files(), self.name)
        model = self.load(folder)
        self.device = torch_device(self.device)
        self.model = model.to(self.device) if hasattr(model, "to") else model
        self.cast()

    def load(self, folder: Path) -> Any:
        raise NotImplementedError

    def run(self, image: np.ndarray, **kwargs: Any) -> np.ndarray:
        """Call a controlnet-aux detector on our image at its native size."""
        self.setup()
        return self.model(image, detect_resolution=self.detect_resolution, image_resolution=min(image.shape[:2]),
                          output_type="np", **kwargs)

    # -- precision ---------------------------------------------------------------------------

    def set_precision(self, precision: str) -> None:
        """fp32, fp16, bf16 or auto (fp16 on CUDA where `half_safe`, else fp32); before setup()."""
        if precision not in PRECISIONS:
            raise AnnotatorError(f"{self.name} precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if self.model is not None and precision != self.precision:
            raise AnnotatorError(f"{self.name}: set_precision() must come before setup() (weights already loaded)")
        self.precision = precision

    def resolved_precision(self) -> str:
        return resolve(self.precision, torch_device(self.device), self.half_safe)

    def torch_dtype(self):
        return torch_dtype(self.resolved_precision())

    def cast(self) -> None:
        """Cast the batched network to the precision (fp32: left exactly as loaded)."""
        if self.resolved_precision() != "fp32" and not self.autocast:
            self.network().to(self.torch_dtype())

    def precision_context(self):
        """(input dtype, context) for the batched forward pass."""
        import torch

        if self.autocast and self.resolved_precision() != "fp32":
            return torch.float32, torch.autocast(torch.device(self.device).type, dtype=self.torch_dtype())
        return self.torch_dtype(), contextlib.nullcontext()

    # -- batched path ------------------------------------------------------------------------

    #: where the batched network sits on self.model ("" = self.model itself; dotted for nesting)
    net_path: str = ""

    def network(self) -> Any:
        net = self.model
        for part in filter(None, self.net_path.split(".")):
            net = getattr(net, part)
        return net

    def single(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        if self.resolved_precision() == "fp32":
            return self.single(image, rng)
        return self.annotate_batch([image], [rng])[0]  # controlnet-aux's own call feeds fp32 only

    def prepare(self, image: np.ndarray) -> Any:
        """The network's input for one image: a float32 CPU tensor (1, C, H, W)."""
        raise NotImplementedError

    def forward(self, batch: Any) -> Any:
        return self.network()(batch)

    def finish(self, output: Any, image: np.ndarray, prepared: Any, rng: np.random.Generator) -> tuple:
        replay = _replay_class()(prepared, output)
        with self.replaying(replay):
            result = self.single(image, rng)
        replay.verify(self.name)
        return result

    @contextlib.contextmanager
    def replaying(self, replay):
        """self.model with the network at net_path swapped for `replay` (a shallow copy: the
        loaded detector is left alone)."""
        original = self.model
        self.model = _swapped(original, self.net_path, replay)
        try:
            yield
        finally:
            self.model = original

    def annotate_batch(self, images: list[np.ndarray], rngs: list[np.random.Generator]) -> list:
        """One forward pass per group of images whose inputs share a shape (on a CPU, per
        `cpu_batch` of them); order kept."""
        import torch

        self.setup()
        if not images:
            return []
        on_cpu = torch.device(torch_device(self.device)).type == "cpu"
        step = (self.cpu_batch if on_cpu else None) or len(images)
        if step == 1 and self.resolved_precision() == "fp32":
            return [self.single(image, rng) for image, rng in zip(images, rngs)]  # see cpu_batch
        prepared = [self.prepare(image) for image in images]
        groups: dict[tuple, list[int]] = {}
        for index, tensor in enumerate(prepared):
            groups.setdefault(tuple(tensor.shape), []).append(index)
        chunks = [ids[start:start + step] for ids in groups.values() for start in range(0, len(ids), step)]
        results: list = [None] * len(images)
        for indices in chunks:
            dtype, context = self.precision_context()
            batch = torch.cat([prepared[i] for i in indices]).to(self.device, dtype)
            with torch.no_grad(), context:
                outputs = _tree(self.forward(batch), lambda t: t.float().cpu())
            for row, index in enumerate(indices):
                mine = _tree(outputs, lambda t, row=row: t[row:row + 1])
                results[index] = self.finish(mine, images[index], prepared[index], rngs[index])
        return results


def _tree(value: Any, fn) -> Any:
    """fn on every tensor in nested lists / tuples (a network's outputs)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_tree(v, fn) for v in value)
    return fn(value) if hasattr(value, "shape") else value


def _swapped(root: Any, path: str, value: Any) -> Any:
    if not path:
        return value
    head, _, rest = path.partition(".")
    clone = copy.copy(root)
    setattr(clone, head, _swapped(getattr(root, head), rest, value))
    return clone


@functools.cache
def _replay_class():
    import torch

    class Replay(torch.nn.Module):
        """Stands in for a controlnet-aux network inside its own call: checks that the input
        that call built equals ours, and returns this image's slice of the batched output."""

        def __init__(self, expected, output):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # CPU: inputs stay there
            self.expected, self.output, self.calls, self.error = expected, output, 0, None

        def forward(self, x, *args, **kwargs):
            self.calls += 1
            if self.calls > 1 or x.shape != self.expected.shape or not torch.equal(x, self.expected):
                self.error = f"network call {self.calls}: input {tuple(x.shape)}, prepared {tuple(self.expected.shape)}"
                raise RuntimeError(self.error)
            return self.output

        def verify(self, name: str) -> None:
            if self.error or self.calls != 1:  # raised inside controlnet-aux, which may swallow it (M-LSD does)
                raise RuntimeError(f"{name}: batched path diverged from controlnet-aux's call "
                                   f"({self.error or f'{self.calls} network calls'})")

    return Replay
