"""Face meshes as the public MediaPipe-face ControlNets were trained on: controlnet-aux's
`mediapipe_face` map, made without mediapipe.

MediaPipe's own models (Apache-2.0, from the mediapipe 0.10.21 wheel: see
mediapipe_weights.py) run through LiteRT on the CPU, in MediaPipe's face-mesh order:

1. BlazeFace short range finds faces: the image letterboxed to 128 x 128, 896 SSD anchors
   decoded here (box + 6 keypoints each), scores through a sigmoid, overlapping boxes
   suppressed with OpenCV (IoU 0.3) and each kept box blended with the boxes it
   overlaps, weighted by score (close to MediaPipe's "weighted" NMS).
2. Each face's region: the box 1.5 x, made square on its long side, turned so that the
   eyes (keypoints 0 and 1) are level; cut out at 192 x 192 and given to face_landmark
   (468 points and a face-presence logit, kept above probability 0.5).
3. The pupils (controlnet-aux draws them: its FaceMesh runs with refine_landmarks) come
   from iris_landmark on a 64 x 64 cut of each eye (2.3 x its corner span, the image's
   right-hand eye mirrored), as MediaPipe's iris pipeline does: points 468 and 473.
   (MediaPipe 0.10's refine_landmarks runs face_landmark_with_attention instead, whose
   custom ops (Landmarks2TransformMatrix...) exist only inside mediapipe: LiteRT cannot
   load it. So the 468 points here are face_landmark's, without that model's refined
   lips and eyelids, and the two maps can differ slightly (not measured: mediapipe
   cannot be installed beside numpy 2).
4. Drawn as controlnet-aux draws them (mediapipe_face_common.py): on black, at
   controlnet-aux's detect resolution, the face oval, eyes, eyebrows and lips as 2 px
   lines (cv2.line, 8-connected) in its colours, pupils as 4 x 4 squares; faces under
   64 px (their landmarks' box, at that resolution) dropped; then resized bilinearly to
   the image's size. Colours below are the RGB values of its output (it draws BGR
   specs and flips the channels at the end).

The json records the face count and each face's 468 landmarks (x, y in [0, 1] of the
image, 4 decimals; like openpose's keypoints). A picture with no face gives a black map;
`keep_empty: false` drops it instead (`no_face`).

CPU only (`uses_model = False`): TFLite models of 0.2-2.6 MB that LiteRT runs on the
CPU in about 7 ms for a 512 px image with a face (2 shared cores); a GPU actor would only add a hop, so they run in the CPU shard tasks.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..transform.decode import Rejected
from . import mediapipe_weights
from .base import Annotator, AnnotatorError, register
from .weights import MissingWeightsError

DETECTOR, LANDMARKS, IRIS = "face_detection_short_range.tflite", "face_landmark.tflite", "iris_landmark.tflite"
#: the default `weights`: the folder mediapipe_weights fills (resolved when the annotator runs)
DEFAULT_WEIGHTS = f"mediapipe=={mediapipe_weights.MEDIAPIPE_VERSION}"

# -- the drawing: MediaPipe's face-mesh contours (public landmark topology, written as polylines) --
# each entry: (RGB colour, polylines over the 468 landmark indices); drawn in this order
_OVAL = ([10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
          176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109, 10],)
_LEFT_EYE = ([263, 249, 390, 373, 374, 380, 381, 382, 362], [263, 466, 388, 387, 386, 385, 384, 398, 362])
_LEFT_EYEBROW = ([276, 283, 282, 295, 285], [300, 293, 334, 296, 336])
_RIGHT_EYE = ([33, 7, 163, 144, 145, 153, 154, 155, 133], [33, 246, 161, 160, 159, 158, 157, 173, 133])
_RIGHT_EYEBROW = ([46, 53, 52, 65, 55], [70, 63, 105, 66, 107])
_LIPS = ([61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291], [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291],
         [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308], [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308])
#: "left"/"right" are the subject's (MediaPipe's naming): the left eye is on the image's right
CONTOURS = (
    ((10, 200, 10), _OVAL),
    ((10, 200, 180), _LEFT_EYE),
    ((10, 220, 180), _LEFT_EYEBROW),
    ((180, 200, 10), _RIGHT_EYE),
    ((180, 220, 10), _RIGHT_EYEBROW),
    ((10, 180, 10), _LIPS),
)
#: pupil colours: the subject's right pupil (refined point 468), left pupil (473)
RIGHT_PUPIL, LEFT_PUPIL = (250, 200, 10), (10, 200, 250)
LINE_THICKNESS = 2
PUPIL_HALF = 2
#: controlnet-aux's min_face_size_pixels, at the detect resolution
MIN_FACE_PIXELS = 64
#: MediaPipe's landmark-presence threshold (FaceMesh's min_tracking_confidence default)
PRESENCE = 0.5
#: landmark indices of the eye corners: (image-left eye, image-right eye)
EYE_CORNERS = ((33, 133), (362, 263))
#: semantic landmarks the tests and users may want
NOSE_TIP, UPPER_LIP, LOWER_LIP, CHIN, FOREHEAD = 1, 13, 14, 152, 10


def detect_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The (height, width) controlnet-aux works at: short side scaled to `resolution`,
    both sides rounded to a multiple of 64."""
    k = resolution / min(height, width)
    return max(64, int(np.round(height * k / 64)) * 64), max(64, int(np.round(width * k / 64)) * 64)


def ssd_anchors() -> np.ndarray:
    """BlazeFace short range's 896 anchor centres (x, y in [0, 1]): a 16 x 16 grid (stride 8)
    with 2 anchors a cell, then an 8 x 8 grid (three stride-16 layers merged) with 6; all of
    size 1 (fixed anchor size), row by row."""
    parts = []
    for grid, per_cell in ((16, 2), (8, 6)):
        ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
        centres = np.stack([(xs.ravel() + 0.5) / grid, (ys.ravel() + 0.5) / grid], axis=1)
        parts.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(parts).astype(np.float32)


def crop_matrix(center: tuple[float, float], size: float, angle: float, out: int) -> np.ndarray:
    """The 2 x 3 affine taking pixel indices of an out x out crop to pixel indices of the image,
    for a square of `size` px centred on `center` (continuous coordinates: pixel i spans
    [i, i+1)) and turned by `angle` radians (MediaPipe's rect rotation)."""
    cos, sin = math.cos(angle), math.sin(angle)
    rot = np.array([[cos, -sin], [sin, cos]]) * (size / out)
    # image = center + rot @ (crop_index + 0.5 - out/2), then -0.5 back to an index
    offset = np.asarray(center) + rot @ np.array([0.5 - out / 2, 0.5 - out / 2]) - 0.5
    return np.hstack([rot, offset[:, None]])


def project(points: np.ndarray, center, size: float, angle: float, out: int) -> np.ndarray:
    """Points in crop coordinates (continuous, 0..out) -> image coordinates (continuous)."""
    cos, sin = math.cos(angle), math.sin(angle)
    rot = np.array([[cos, -sin], [sin, cos]]) * (size / out)
    return (points[:, :2] - out / 2) @ rot.T + np.asarray(center)


def _rotation(start: np.ndarray, end: np.ndarray) -> float:
    """MediaPipe's rect rotation: the angle that makes start -> end point along +x."""
    angle = -math.atan2(-(end[1] - start[1]), end[0] - start[0])
    return angle - 2 * math.pi * math.floor((angle + math.pi) / (2 * math.pi))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x0, y0, x1, y1) box with many."""
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


@register
class FaceMesh(Annotator):
    name = "face_mesh"
    mode = "RGB"
    version = "1"
    # TFLite on the CPU through LiteRT, a few ms a face: it runs in the CPU shard tasks, a GPU
    # actor would gain nothing (see the module docstring)
    uses_model = False
    code_licence = "Apache-2.0"  # ours; after controlnet-aux's mediapipe_face and MediaPipe's graphs (both Apache-2.0)
    # the models' LICENSE in the wheel and github.com/google-ai-edge/mediapipe/blob/master/LICENSE: Apache-2.0
    weights_licence = "Apache-2.0"
    weights_source = mediapipe_weights.SOURCE
    #: the tests' and the pipeline's handle on the files
    files = mediapipe_weights.MODELS

    def __init__(self, weights: str = DEFAULT_WEIGHTS, max_faces: int = 1, min_confidence: float = 0.5,
                 detect_resolution: int = 512, keep_empty: bool = True):
        if not isinstance(max_faces, (int, np.integer)) or isinstance(max_faces, bool) or max_faces < 1:
            raise AnnotatorError(f"face_mesh max_faces must be a positive integer, got {max_faces!r}")
        if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) \
                or not 0 < min_confidence < 1:
            raise AnnotatorError(f"face_mesh min_confidence must be a number in (0, 1), got {min_confidence!r}")
        if not isinstance(detect_resolution, (int, np.integer)) or isinstance(detect_resolution, bool) \
                or detect_resolution < 64:
            raise AnnotatorError(f"face_mesh detect_resolution must be an integer >= 64, got {detect_resolution!r}")
        if not isinstance(weights, str):
            raise AnnotatorError(f"face_mesh weights must be a folder (or {DEFAULT_WEIGHTS!r}), got {weights!r}")
        super().__init__(weights=weights, max_faces=int(max_faces), min_confidence=float(min_confidence),
                         detect_resolution=int(detect_resolution), keep_empty=bool(keep_empty))
        self.weights = weights
        self.max_faces, self.min_confidence = int(max_faces), float(min_confidence)
        self.detect_resolution, self.keep_empty = int(detect_resolution), bool(keep_empty)
        self.anchors = ssd_anchors()
        self.nets: dict[str, Any] | None = None

    # -- weights -------------------------------------------------------------------------------

    def folder(self) -> Path:
        """The weights folder; the default one is fetched once when it lacks the files."""
        setting = f"annotator_params.{self.name}.weights"
        if self.weights == DEFAULT_WEIGHTS:
            folder = mediapipe_weights.default_dir()
            if not mediapipe_weights.problems(folder):
                return folder
            try:
                mediapipe_weights.fetch(folder)
            except (mediapipe_weights.FetchError, OSError) as exc:
                raise MissingWeightsError(
                    f"{self.name}: the MediaPipe models ({', '.join(self.files)}) are not in {folder} and could "
                    f"not be fetched ({exc}). Run `{mediapipe_weights.command()}` where pip can reach PyPI, or "
                    f"`{mediapipe_weights.command('DIR')}` and set {setting} to DIR") from None
            return folder
        folder = Path(self.weights)
        wrong = mediapipe_weights.problems(folder) if folder.is_dir() else list(self.files)
        if wrong:
            raise MissingWeightsError(
                f"{self.name}: weight file(s) {', '.join(wrong)} not found in {folder} (the setting {setting}); "
                f"run `{mediapipe_weights.command(folder)}` to put MediaPipe {mediapipe_weights.MEDIAPIPE_VERSION}'s "
                f"models there, or point {setting} at a folder that has them (or leave it unset: "
                f"{mediapipe_weights.default_dir()})")
        return folder

    def check_weights(self) -> None:
        self.folder()

    def weights_setting(self) -> str:
        """The folder the models are loaded from (no fetch here: see weight_files)."""
        return str(mediapipe_weights.default_dir()) if self.weights == DEFAULT_WEIGHTS else self.weights

    def weight_files(self) -> list:
        folder = self.folder()  # the default folder is fetched first: the files must be there to be hashed
        return [folder / name for name in self.files]

    def licence_record(self, condition: str, hash_weights: bool = True):
        """The default folder holds the wheel's files, each checked against its measured sha256:
        its licence is the declared one even before it is filled (another folder's is its
        model card's, which mediapipe_weights writes: `license: apache-2.0`)."""
        record = super().licence_record(condition, hash_weights)
        if self.weights == DEFAULT_WEIGHTS:
            record = dataclasses.replace(record, weights_licence=self.weights_licence,
                                         weights_source=self.weights_source)
        return record

    def setup(self) -> None:
        if self.nets is not None:
            return
        from ai_edge_litert.interpreter import Interpreter

        folder = self.folder()
        nets = {}
        for key, name in (("detector", DETECTOR), ("landmarks", LANDMARKS), ("iris", IRIS)):
            net = Interpreter(model_path=str(folder / name), num_threads=1)
            net.allocate_tensors()
            nets[key] = net
        self.nets = nets

    def __getstate__(self) -> dict[str, Any]:
        """Shipped to workers without the interpreters (not picklable); setup() loads them there."""
        return {**self.__dict__, "nets": None}

    def _run(self, key: str, tensor: np.ndarray) -> list[np.ndarray]:
        net = self.nets[key]
        net.set_tensor(net.get_input_details()[0]["index"], tensor[None].astype(np.float32))
        net.invoke()
        return [net.get_tensor(d["index"]).reshape(-1) for d in net.get_output_details()]

    # -- the pipeline --------------------------------------------------------------------------

    def detect(self, image: np.ndarray) -> list[dict[str, Any]]:
        """BlazeFace on the whole image: [{box (x0, y0, x1, y1), keypoints (6, 2), score}] in pixels
        (continuous coordinates), best first, at most max_faces."""
        height, width = image.shape[:2]
        side = max(height, width)
        offset = ((side - width) / 2, (side - height) / 2)
        # letterbox: the image centred in a side x side square (zero border), scaled to 128
        scale = 128 / side
        matrix = np.array([[scale, 0, scale * (offset[0] + 0.5) - 0.5], [0, scale, scale * (offset[1] + 0.5) - 0.5]])
        tensor = cv2.warpAffine(image, matrix, (128, 128), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        outputs = {d["name"]: d for d in self.nets["detector"].get_output_details()}
        raw_boxes, raw_scores = self._detector_outputs(tensor.astype(np.float32) / 127.5 - 1, outputs)
        scores = 1 / (1 + np.exp(-np.clip(raw_scores.astype(np.float64), -100, 100)))  # MediaPipe clips at 100
        keep = scores >= self.min_confidence
        if not keep.any():
            return []
        raw, anchors, scores = raw_boxes[keep], self.anchors[keep], scores[keep]
        # offsets in 128-px units from the anchor centre (w/h: anchors are size 1); x before y
        centre = raw[:, 0:2] / 128 + anchors
        size = raw[:, 2:4] / 128
        points = raw[:, 4:16].reshape(-1, 6, 2) / 128 + anchors[:, None, :]
        # letterbox [0, 1] -> image pixels
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1) * side - np.tile(offset, 2)
        points = points * side - np.asarray(offset)
        xywh = [[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])] for b in boxes]
        kept = np.asarray(cv2.dnn.NMSBoxes(xywh, scores.astype(float).tolist(), self.min_confidence, 0.3)).reshape(-1)
        kept = sorted(kept.tolist(), key=lambda i: (-scores[i], i))[: self.max_faces]
        faces = []
        for index in kept:
            near = _iou(boxes[index], boxes) > 0.3  # itself included
            weight = scores[near][:, None]
            faces.append({"box": (boxes[near] * weight).sum(0) / weight.sum(),
                          "keypoints": (points[near] * weight[:, :, None]).sum(0) / weight.sum(),
                          "score": float(scores[index])})
        return faces

    def _detector_outputs(self, tensor: np.ndarray, outputs: dict) -> tuple[np.ndarray, np.ndarray]:
        net = self.nets["detector"]
        net.set_tensor(net.get_input_details()[0]["index"], tensor[None])
        net.invoke()
        boxes = net.get_tensor(outputs["regressors"]["index"]).reshape(-1, 16)
        scores = net.get_tensor(outputs["classificators"]["index"]).reshape(-1)
        return boxes, scores

    def landmarks(self, image: np.ndarray, face: dict[str, Any]) -> np.ndarray | None:
        """The 468 face_landmark points of one detection, in image pixels (continuous), or None
        when the landmark model says there is no face in the region."""
        box = face["box"]
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        size = 1.5 * max(box[2] - box[0], box[3] - box[1])
        angle = _rotation(face["keypoints"][0], face["keypoints"][1])
        crop = cv2.warpAffine(image, crop_matrix(centre, size, angle, 192), (192, 192),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
        outputs = self._run("landmarks", crop.astype(np.float32) / 255)
        mesh, flag = _sized(outputs, 468 * 3), _sized(outputs, 1)
        if 1 / (1 + math.exp(-float(np.clip(flag[0], -100, 100)))) < PRESENCE:
            return None
        return project(mesh.reshape(468, 3), centre, size, angle, 192)

    def pupils(self, image: np.ndarray, mesh: np.ndarray) -> list[np.ndarray]:
        """The pupil centres (image pixels) of the subject's right eye (the image's left), then left."""
        found = []
        for (start, end), mirrored in zip(EYE_CORNERS, (False, True)):
            a, b = mesh[start], mesh[end]
            centre = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
            size = 2.3 * max(abs(b[0] - a[0]), abs(b[1] - a[1]))
            angle = _rotation(a, b)
            crop = cv2.warpAffine(image, crop_matrix(centre, size, angle, 64), (64, 64),
                                  flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
            if mirrored:  # the model sees every eye as the image's left one
                crop = crop[:, ::-1]
            iris = _sized(self._run("iris", np.ascontiguousarray(crop).astype(np.float32) / 255), 5 * 3)
            centre_in_crop = iris.reshape(5, 3)[:1, :2].copy()
            if mirrored:
                centre_in_crop[:, 0] = 64 - centre_in_crop[:, 0]
            found.append(project(centre_in_crop, centre, size, angle, 64)[0])
        return found

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        self.setup()
        image = _rgb(image)
        height, width = image.shape[:2]
        small_h, small_w = detect_size(height, width, self.detect_resolution)
        upscale = self.detect_resolution > min(height, width)
        small = cv2.resize(image, (small_w, small_h), interpolation=cv2.INTER_LANCZOS4 if upscale else cv2.INTER_AREA)
        faces = []
        for face in self.detect(small):
            mesh = self.landmarks(small, face)
            if mesh is None:
                continue
            extent = mesh.max(0) - mesh.min(0)
            if min(extent) < MIN_FACE_PIXELS:  # controlnet-aux's min_face_size_pixels
                continue
            faces.append((mesh, self.pupils(small, mesh)))
        if not faces and not self.keep_empty:
            raise Rejected("no_face", "face_mesh found no face (keep_empty is false)")
        canvas = np.zeros((small_h, small_w, 3), np.uint8)
        for mesh, pupils in faces:
            draw_face(canvas, mesh / (small_w, small_h), pupils=[p / (small_w, small_h) for p in pupils])
        if canvas.shape[:2] != (height, width):
            canvas = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_LINEAR)
        landmarks = [np.round(mesh / (small_w, small_h), 4).tolist() for mesh, _ in faces]
        return np.ascontiguousarray(canvas), {"faces": len(faces), "landmarks": landmarks, "_empty": not faces}


def draw_face(canvas: np.ndarray, points: np.ndarray, pupils: list[np.ndarray] = ()) -> None:
    """One face's contours and pupils on an RGB canvas, as controlnet-aux draws them; points
    normalised (x, y in [0, 1]). A point outside the canvas drops the lines that touch it."""
    height, width = canvas.shape[:2]
    inside = ((points[:, 0] >= 0) & (points[:, 0] <= 1) & (points[:, 1] >= 0) & (points[:, 1] <= 1))
    pixels = np.stack([np.minimum(np.floor(points[:, 0] * width), width - 1),
                       np.minimum(np.floor(points[:, 1] * height), height - 1)], axis=1).astype(int)
    for colour, lines in CONTOURS:
        for line in lines:
            for start, end in zip(line, line[1:]):
                if inside[start] and inside[end]:
                    cv2.line(canvas, tuple(map(int, pixels[start])), tuple(map(int, pixels[end])), colour,
                             LINE_THICKNESS)
    for pupil, colour in zip(pupils, (RIGHT_PUPIL, LEFT_PUPIL)):
        if 0 <= pupil[0] < 1 and 0 <= pupil[1] < 1:
            x, y = int(width * pupil[0]), int(height * pupil[1])
            canvas[max(y - PUPIL_HALF, 0):y + PUPIL_HALF, max(x - PUPIL_HALF, 0):x + PUPIL_HALF] = colour


def _sized(outputs: list[np.ndarray], size: int) -> np.ndarray:
    """The model output with `size` values (outputs are told apart by size, not order)."""
    return next(output for output in outputs if output.size == size)


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise AnnotatorError(f"face_mesh takes uint8 images, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)
