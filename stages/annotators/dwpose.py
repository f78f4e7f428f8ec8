"""Whole-body pose (body, hands, face) drawn as the public DWPose ControlNets expect, without mmcv.

controlnet-aux 0.0.10's DWposeDetector needs mmcv, mmdet and mmpose; here the same two
networks run as ONNX (DWPose's own export, https://huggingface.co/yzd-v/DWPose, Apache-2.0)
through onnxruntime, with rtmlib's pre- and post-processing (Apache-2.0, no mmcv), and the
map is drawn with controlnet-aux's own DWPose drawing code:

1. The image is resized as controlnet-aux resizes it (`resize_image`: short side to
   `detect_resolution`, both sides rounded to multiples of 64).
2. People: rtmlib's YOLOX on the BGR image (the detector was trained on BGR), letterboxed
   to the network's input (640 x 640, padding 114); boxes decoded, class-aware NMS at IoU
   0.45, then kept where the class is person (0) and the score is over 0.3 - DWPose's ONNX
   pipeline (ControlNet-v1-1-nightly/annotator/dwpose/onnxdet.py), which rtmlib's YOLOX
   reproduces (`det_mode="multiclass"`; the person filter is here).
3. Keypoints: rtmlib's RTMPose steps for each box (padded 1.25 x, affine-warped to the
   network's 288 x 384 input, RGB normalised with ImageNet mean / std as mmpose's
   `bgr_to_rgb` preprocessor does; SimCC argmax decoded back to the image), giving the 133
   COCO-WholeBody points and their scores; then rtmlib's `convert_coco_to_openpose`: the neck
   is the shoulders' midpoint (its score the lower of theirs), body points reordered into
   OpenPose's 18 - the conversion controlnet-aux's DWPose does.
4. The map, as controlnet-aux's `DWposeDetector.__call__` builds it: body points and limbs
   whose score is over `score_threshold` (controlnet-aux: 0.3), hands (2 x 21 points) and
   face (68 points) where a point's score is at least that; drawn on black at the detect
   resolution by controlnet_aux.dwpose.util (draw_bodypose, draw_facepose; draw_handpose is
   ported below only to avoid its matplotlib import, same colours), then resized bilinearly
   to the image's size. Feet (COCO-WholeBody 17-22) are not drawn, as in controlnet-aux.

Differences from the references, on purpose: with no person found, DWPose's and rtmlib's
pipelines run the pose network on the whole image (and draw whatever it hallucinates
there); here the map is black and the sample counts as empty (`keep_empty: false` drops it,
`no_person`). controlnet-aux's mmdet pipeline keeps boxes over 0.5 with a second NMS at 0.7;
this follows DWPose's ONNX pipeline, the one written for these ONNX files.

Batching: the detector runs per image (its ONNX takes one 640 x 640 image); the pose
network takes the crops of a whole batch of images in one onnxruntime call when its
batch axis is dynamic. DWPose's published `dw-ll_ucoco_384.onnx` is, as far as known,
exported with a fixed batch of 1 (DWPose's and rtmlib's own code run it one crop at a
time); the axis is read from the session at load time, and with a fixed batch the crops
run one by one (same results, no speed-up). `annotate_batch` gives exactly the per-image
call's maps and records either way.

The json records, like openpose's, each person's 18 body keypoints (x, y normalised by the
map's width and height, 4 decimals, null when unseen; a joint the network puts past the
border may fall slightly outside [0, 1]), plus `hands_found` / `faces_found`: hands and faces
with at least one point drawn. onnxruntime runs on the CPU, or on its CUDA provider when the
installed onnxruntime has one (onnxruntime-gpu in place of onnxruntime); the ONNX files are
fp32 and run as published, whatever the build's `annotator_dtype`.

Weights: `weights` is a folder holding `yolox_l.onnx` and `dw-ll_ucoco_384.onnx` (their
names in yzd-v/DWPose and rtmlib's docs), or a hub repo id (default yzd-v/DWPose, fetched
through the HF cache).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..transform.decode import Rejected
from .base import AnnotatorError, register
from .detector import DetectorAnnotator, fit
from .weights import resolve_weight_files

DETECTOR = "yolox_l.onnx"
POSE = "dw-ll_ucoco_384.onnx"
DEFAULT_WEIGHTS = "yzd-v/DWPose"
#: DWPose's ONNX detector pipeline (onnxdet.py): class-aware NMS IoU, then person score over this
NMS_IOU = 0.45
PERSON_SCORE = 0.3
PERSON_CLASS = 0
#: network input sizes when the ONNX file leaves them symbolic: detector (h, w), pose (w, h)
DETECTOR_INPUT = (640, 640)
POSE_INPUT = (288, 384)
#: crops per pose-network call when its batch axis is dynamic
POSE_BATCH = 32
#: OpenPose order of the 134 converted points: 18 body, 6 feet, 68 face, 21 left hand, 21 right hand
BODY, FEET, FACE, LEFT_HAND, RIGHT_HAND = slice(0, 18), slice(18, 24), slice(24, 92), slice(92, 113), slice(113, 134)
RTMLIB_HINT = ("the dwpose condition needs rtmlib, installed without its dependencies (its metadata asks for "
               "opencv-python and opencv-contrib-python, which would replace opencv-python-headless): "
               "pip install --no-deps -c constraints.txt rtmlib")


@dataclass
class _Networks:
    detector: Any  # rtmlib.YOLOX
    pose: Any  # rtmlib.RTMPose
    pose_batched: bool  # the pose network's batch axis is dynamic
    device: str  # where onnxruntime runs them: cpu, cuda[:N]


@register
class DWPose(DetectorAnnotator):
    name = "dwpose"
    mode = "RGB"
    files = (DETECTOR, POSE)
    code_licence = "Apache-2.0"  # ours, rtmlib's and controlnet-aux's drawing: all Apache-2.0
    # the model card of yzd-v/DWPose: `license: apache-2.0` (DWPose: IDEA-Research/DWPose, Apache-2.0)
    weights_licence = "Apache-2.0"
    weights_source = "https://huggingface.co/" + DEFAULT_WEIGHTS
    permissive_alternative = None
    half_safe = False  # ONNX fp32 files: "auto" stays fp32
    batch_size = 8

    def __init__(self, hands: bool = True, face: bool = True, keep_empty: bool = True,
                 score_threshold: float = 0.3, weights: str = DEFAULT_WEIGHTS, detect_resolution: int = 512,
                 **common: Any):
        for key, value in (("hands", hands), ("face", face), ("keep_empty", keep_empty)):
            if not isinstance(value, bool):
                raise AnnotatorError(f"dwpose {key} must be true or false, got {value!r}")
        if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float)) \
                or not 0 <= score_threshold < 1:
            raise AnnotatorError(f"dwpose score_threshold must be a number in [0, 1), got {score_threshold!r}")
        if isinstance(detect_resolution, bool) or not isinstance(detect_resolution, int) or detect_resolution < 64:
            raise AnnotatorError(f"dwpose detect_resolution must be an integer >= 64, got {detect_resolution!r}")
        if not isinstance(weights, str) or not weights:
            raise AnnotatorError(f"dwpose weights must be a folder or a hub repo id, got {weights!r}")
        super().__init__(weights=weights, detect_resolution=detect_resolution, hands=hands, face=face,
                         keep_empty=keep_empty, score_threshold=float(score_threshold), **common)
        self.hands, self.face, self.keep_empty = hands, face, keep_empty
        self.score_threshold = float(score_threshold)

    # -- weights -----------------------------------------------------------------------------

    def folder(self) -> Path:
        """The folder holding both ONNX files (a local folder, or the hub repo via the HF cache)."""
        return resolve_weight_files(self.weights, self.files, self.name, DEFAULT_WEIGHTS)

    def weight_files(self) -> list:
        folder = self.folder()
        return [folder / name for name in self.files]

    def check_weights(self) -> None:
        self.folder()

    def resolved_precision(self) -> str:
        return "fp32"

    def onnx_device(self) -> str:
        """rtmlib's device for onnxruntime: cuda[:N] when this onnxruntime has its CUDA provider."""
        import onnxruntime as ort

        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        device = self.device or ("cuda" if cuda else "cpu")
        if device.startswith("cuda") and not cuda:
            raise AnnotatorError(f"dwpose: device {device!r} asked for, but this onnxruntime has no CUDA provider "
                                 f"(install onnxruntime-gpu in place of onnxruntime)")
        return device

    def setup(self) -> None:
        if self.model is not None:
            return
        folder = self.folder()
        try:
            from rtmlib import RTMPose, YOLOX
        except ImportError as exc:
            raise ImportError(RTMLIB_HINT) from exc
        device = self.onnx_device()
        detector = YOLOX(str(folder / DETECTOR), model_input_size=DETECTOR_INPUT, det_mode="multiclass",
                         nms_thr=NMS_IOU, score_thr=PERSON_SCORE, backend="onnxruntime", device=device)
        pose = RTMPose(str(folder / POSE), model_input_size=POSE_INPUT, backend="onnxruntime", device=device)
        # the input sizes the files declare (DWPose's code reads them from the session too)
        det_shape = detector.session.get_inputs()[0].shape
        detector.model_input_size = _dims(det_shape[2:4], DETECTOR_INPUT)  # (h, w)
        pose_shape = pose.session.get_inputs()[0].shape
        pose.model_input_size = _dims(pose_shape[2:4], POSE_INPUT[::-1])[::-1]  # (w, h)
        self.model = _Networks(detector, pose, pose_batched=not isinstance(pose_shape[0], int), device=device)

    def __getstate__(self) -> dict[str, Any]:
        """Shipped to workers without the onnxruntime sessions (not picklable); setup() loads them there."""
        return {**self.__dict__, "model": None}

    # -- the pipeline --------------------------------------------------------------------------

    def resized(self, image: np.ndarray) -> np.ndarray:
        from controlnet_aux.util import HWC3, resize_image

        return resize_image(HWC3(np.ascontiguousarray(image)), self.detect_resolution)

    def people(self, small: np.ndarray) -> np.ndarray:
        """Person boxes (n, 4), x1 y1 x2 y2 in `small`'s pixels."""
        boxes, classes = self.model.detector(np.ascontiguousarray(small[:, :, ::-1]))  # BGR, as trained
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return boxes[np.asarray(classes).reshape(-1) == PERSON_CLASS]

    def estimate(self, crops: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The pose network on prepared crops (h, w, 3 normalised): its (simcc_x, simcc_y) per crop."""
        session = self.model.pose.session
        feed, names = session.get_inputs()[0].name, [out.name for out in session.get_outputs()]
        step = POSE_BATCH if self.model.pose_batched else 1
        results = []
        for start in range(0, len(crops), step):
            batch = np.stack([crop.transpose(2, 0, 1) for crop in crops[start:start + step]]).astype(np.float32)
            simcc_x, simcc_y = session.run(names, {feed: np.ascontiguousarray(batch)})[:2]
            results += [(simcc_x[i:i + 1], simcc_y[i:i + 1]) for i in range(len(batch))]
        return results

    def annotate_batch(self, images: list[np.ndarray], rngs: list[np.random.Generator]) -> list:
        """Detector per image, the pose network over all the batch's crops; results in order.
        An image that must be dropped (keep_empty false, nobody found) gets its Rejected in
        its place in the list (as the annotate step reads it), the others their maps."""
        self.setup()  # first: without rtmlib, its install hint
        from rtmlib.tools.pose_estimation.post_processings import convert_coco_to_openpose

        pose = self.model.pose
        smalls = [self.resized(image) for image in images]
        owners, crops, frames = [], [], []
        for index, small in enumerate(smalls):
            for box in self.people(small):
                crop, center, scale = pose.preprocess(small, box)  # RGB crop, normalised
                owners.append(index)
                crops.append(crop)
                frames.append((center, scale))
        points: list[list[np.ndarray]] = [[] for _ in images]
        scores: list[list[np.ndarray]] = [[] for _ in images]
        for owner, output, (center, scale) in zip(owners, self.estimate(crops), frames):
            keypoints, score = pose.postprocess(list(output), center, scale)
            points[owner].append(keypoints)
            scores[owner].append(score)
        results: list = []
        for image, small, kps, scs in zip(images, smalls, points, scores):
            if not kps and not self.keep_empty:
                results.append(Rejected("no_person", "dwpose found no person (keep_empty is false)"))
                continue
            keypoints, score = (convert_coco_to_openpose(np.concatenate(kps), np.concatenate(scs)) if kps
                                else (np.zeros((0, 134, 2)), np.zeros((0, 134))))
            canvas, record = draw_wholebody(keypoints, score, small.shape[0], small.shape[1], hands=self.hands,
                                            face=self.face, threshold=self.score_threshold)
            results.append((fit(canvas, image, self.mode), record))
        return results

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        result = self.annotate_batch([image], [rng])[0]
        if isinstance(result, Exception):
            raise result
        return result


def _dims(dims, default: tuple[int, int]) -> tuple[int, int]:
    """Two spatial sizes from an ONNX input shape; symbolic ones take the default."""
    return tuple(d if isinstance(d, int) and d > 0 else fallback for d, fallback in zip(dims, default))


# -- the drawing --------------------------------------------------------------------------------


def draw_wholebody(keypoints: np.ndarray, scores: np.ndarray, height: int, width: int, *, hands: bool = True,
                   face: bool = True, threshold: float = 0.3) -> tuple[np.ndarray, dict[str, Any]]:
    """The DWPose map (height x width x 3, uint8) and its record, from OpenPose-ordered points.

    `keypoints` (n, 134, 2) in pixels of the map, `scores` (n, 134): rtmlib's
    `convert_coco_to_openpose` output. What controlnet-aux's DWposeDetector.__call__ does
    between its pose estimate and its `draw_pose`, with its threshold (0.3) as a setting:
    body points drawn where the score is over it, hand and face points where it is at least it."""
    from controlnet_aux.dwpose import util

    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, 134, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1, 134)
    persons = len(keypoints)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    record: dict[str, Any] = {"persons": persons, "keypoints": [], "hands_found": 0, "faces_found": 0,
                              "_empty": persons == 0}
    if not persons:
        return canvas, record
    candidate = keypoints / np.array([width, height], dtype=np.float64)  # normalised, as controlnet-aux's
    body_seen = scores[:, BODY] > threshold
    subset = np.where(body_seen, np.arange(persons * 18).reshape(persons, 18), -1)
    body = candidate[:, BODY].reshape(persons * 18, 2)
    hidden = candidate.copy()
    hidden[scores < threshold] = -1  # controlnet-aux: candidate[subset < 0.3] = -1 (hands and face)
    hand_points = np.concatenate([hidden[:, LEFT_HAND], hidden[:, RIGHT_HAND]]) if hands else np.zeros((0, 21, 2))
    face_points = hidden[:, FACE] if face else np.zeros((0, 68, 2))
    canvas = util.draw_bodypose(canvas, body, subset)
    canvas = draw_handpose(canvas, hand_points)
    canvas = util.draw_facepose(canvas, face_points)
    record["keypoints"] = [[[round(float(x), 4), round(float(y), 4)] if seen else None
                            for (x, y), seen in zip(person, seen_row)]
                           for person, seen_row in zip(candidate[:, BODY], body_seen)]
    record["hands_found"] = sum(_any_drawn(hand) for hand in hand_points)
    record["faces_found"] = sum(_any_drawn(lmks) for lmks in face_points)
    return canvas, record


def _any_drawn(points: np.ndarray) -> bool:
    """A point controlnet-aux draws: both normalised coordinates over its eps (0.01)."""
    from controlnet_aux.dwpose.util import eps

    return bool(np.any((points[:, 0] > eps) & (points[:, 1] > eps)))


#: controlnet_aux.dwpose.util.draw_handpose's 20 hand edges and their colours (its
#: matplotlib.colors.hsv_to_rgb([i / 20, 1, 1]) * 255; colorsys computes the same floats)
HAND_EDGES = [[0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [5, 6], [6, 7], [7, 8], [0, 9], [9, 10],
              [10, 11], [11, 12], [0, 13], [13, 14], [14, 15], [15, 16], [0, 17], [17, 18], [18, 19], [19, 20]]
HAND_COLOURS = [tuple(c * 255 for c in colorsys.hsv_to_rgb(i / float(len(HAND_EDGES)), 1.0, 1.0))
                for i in range(len(HAND_EDGES))]


def draw_handpose(canvas: np.ndarray, all_hand_peaks) -> np.ndarray:
    """controlnet_aux.dwpose.util.draw_handpose, line for line, without its matplotlib import
    (matplotlib is not a dependency here; it is used there only for hsv_to_rgb)."""
    from controlnet_aux.dwpose.util import eps

    height, width = canvas.shape[:2]
    for peaks in all_hand_peaks:
        peaks = np.array(peaks)
        for (start, end), colour in zip(HAND_EDGES, HAND_COLOURS):
            x1, y1 = peaks[start]
            x2, y2 = peaks[end]
            x1, y1, x2, y2 = int(x1 * width), int(y1 * height), int(x2 * width), int(y2 * height)
            if x1 > eps and y1 > eps and x2 > eps and y2 > eps:
                cv2.line(canvas, (x1, y1), (x2, y2), colour, thickness=2)
        for x, y in peaks:
            x, y = int(x * width), int(y * height)
            if x > eps and y > eps:
                cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)
    return canvas

