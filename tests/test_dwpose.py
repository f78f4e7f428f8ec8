"""dwpose: whole-body pose through rtmlib + onnxruntime, drawn by controlnet-aux's DWPose code.

The real ONNX files (yzd-v/DWPose) cannot be downloaded here: the networks below are
RANDOM-weight stand-ins with the interface rtmlib and DWPose's code expect, written with
`onnx` from seeded numpy arrays (same bytes every run):

- yolox_l.onnx: "images" (1, 3, 640, 640) float32, raw 0-255 pixels -> "output" (1, 8400, 85):
  per anchor of the 80x80, 40x40 and 20x20 grids (strides 8, 16, 32) box offsets, log sizes,
  then objectness and 80 class scores through a sigmoid (YOLOX's export). The stride-32
  objectness is made to fire on bright patches (mean > 0.5 of 255), class 0 (person) to win:
  a bright rectangle on a dark picture is "a person", an all-dark picture has nobody.
- dw-ll_ucoco_384.onnx: "input" (1 or dynamic, 3, 384, 288) -> "simcc_x" (n, 133, 576),
  "simcc_y" (n, 133, 768): SimCC logits (split ratio 2), random, a quarter of the keypoints
  pushed below zero (unseen).

So these tests check plumbing, shapes, formats, determinism, batching and the drawing;
never the quality of the poses. The drawing and the COCO-WholeBody -> OpenPose conversion
are checked on hand-made keypoints, against controlnet-aux's colours.
"""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import onnx  # the test extra: writes the stand-in networks
import pytest
from onnx import TensorProto, helper, numpy_helper

import stages.annotators.dwpose as dwpose  # registers dwpose
from stages.annotators import REGISTRY, MissingWeightsError, create
from stages.annotators.dwpose import DETECTOR, POSE, DWPose, draw_wholebody
from stages.transform.decode import Rejected

# -- random-weight stand-ins for DWPose's two ONNX files -------------------------------------


def _model(nodes, inputs, outputs, initializers, name):
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(a, n) for n, a in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="controlforge-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def yolox_bytes(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    nodes, inits, levels = [], [], []
    for stride in (8, 16, 32):
        weight = (rng.standard_normal((85, 3, stride, stride)) * 1e-5).astype(np.float32)
        bias = np.full(85, -10.0, dtype=np.float32)  # classes 1-79: never
        bias[0:2] = 0.5  # box centre: the middle of the cell
        bias[2], bias[3] = math.log(256 / stride), math.log(448 / stride)  # boxes 256 x 448 (input pixels)
        bias[4] = -30.0  # objectness: never, but at stride 32 ...
        bias[5] = 10.0  # ... and then it is a person
        if stride == 32:  # objectness = 40 * (patch mean / 255) - 20: fires on bright patches
            weight[4] += 40.0 / (3 * stride * stride * 255)
            bias[4] = -20.0
        inits += [(f"w{stride}", weight), (f"b{stride}", bias)]
        nodes += [helper.make_node("Conv", ["images", f"w{stride}", f"b{stride}"], [f"c{stride}"],
                                   kernel_shape=[stride, stride], strides=[stride, stride]),
                  helper.make_node("Reshape", [f"c{stride}", "flat"], [f"r{stride}"])]
        levels.append(f"r{stride}")
    inits += [("flat", np.array([1, 85, -1], np.int64)), ("s0", np.array([0], np.int64)),
              ("s4", np.array([4], np.int64)), ("s85", np.array([85], np.int64)), ("ax2", np.array([2], np.int64))]
    nodes += [helper.make_node("Concat", levels, ["cat"], axis=2),
              helper.make_node("Transpose", ["cat"], ["raw"], perm=[0, 2, 1]),
              helper.make_node("Slice", ["raw", "s0", "s4", "ax2"], ["box"]),
              helper.make_node("Slice", ["raw", "s4", "s85", "ax2"], ["logits"]),
              helper.make_node("Sigmoid", ["logits"], ["probs"]),
              helper.make_node("Concat", ["box", "probs"], ["output"], axis=2)]
    return _model(nodes, [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8400, 85])], inits, "yolox")


def rtmpose_bytes(seed: int = 1, batch: int | str = 1) -> bytes:
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[192, 144], strides=[192, 144]),
             helper.make_node("Flatten", ["pooled"], ["features"], axis=1)]
    inits = [("rows", np.array([-1, 133, 8], np.int64))]
    bias = np.where(rng.random(133) < 0.25, -1.0, 0.0).astype(np.float32)[:, None]  # a quarter unseen
    inits.append(("bias", bias))
    for axis, bins in (("x", 576), ("y", 768)):
        inits += [(f"w1{axis}", rng.standard_normal((12, 133 * 8)).astype(np.float32)),
                  (f"w2{axis}", (rng.standard_normal((8, bins)) * 0.05).astype(np.float32))]
        nodes += [helper.make_node("MatMul", ["features", f"w1{axis}"], [f"h{axis}"]),
                  helper.make_node("Reshape", [f"h{axis}", "rows"], [f"k{axis}"]),
                  helper.make_node("MatMul", [f"k{axis}", f"w2{axis}"], [f"l{axis}"]),
                  helper.make_node("Add", [f"l{axis}", "bias"], [f"simcc_{axis}"])]
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 384, 288])],
                  [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [batch, 133, 576]),
                   helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [batch, 133, 768])], inits, "rtmpose")


def write_weights(folder, pose_batch: int | str = 1):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DETECTOR).write_bytes(yolox_bytes())
    (folder / POSE).write_bytes(rtmpose_bytes(batch=pose_batch))
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """DWPose's layout (fixed pose batch of 1, as published as far as known)."""
    return str(write_weights(tmp_path_factory.mktemp("dwpose")))


@pytest.fixture(scope="module")
def dynamic_weights(tmp_path_factory):
    """The same networks with a dynamic pose batch axis: crops batched across images."""
    return str(write_weights(tmp_path_factory.mktemp("dwpose-dynamic"), pose_batch="batch"))


@pytest.fixture(scope="module")
def annotator(weights):
    made = DWPose(weights=weights)
    made.setup()
    return made


def person_picture(height: int, width: int, box, seed: int = 0) -> np.ndarray:
    """Dark noise with a bright rectangle (x0, y0, x1, y1): the stand-in detector's person."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = rng.integers(200, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
    return image


def nobody(height: int = 256, width: int = 320, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 60, (height, width, 3), dtype=np.uint8)


def gen(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- the stand-ins are deterministic and what rtmlib expects ------------------------------------


def test_stand_in_weights_are_the_same_bytes_every_time():
    assert yolox_bytes() == yolox_bytes() and rtmpose_bytes() == rtmpose_bytes()
    assert rtmpose_bytes(batch="batch") != rtmpose_bytes()


def test_registered_with_its_licences(weights):
    assert REGISTRY["dwpose"] is DWPose
    made = create(["dwpose"])["dwpose"]
    assert (made.mode, made.uses_model, made.code_licence, made.permissive_alternative) == ("RGB", True, "Apache-2.0",
                                                                                            None)
    record = made.licence_record("dwpose", hash_weights=False)  # the default: yzd-v/DWPose's declared licence
    assert record.weights == "yzd-v/DWPose" and record.weights_licence == "Apache-2.0" and record.commercial
    assert record.weights_source == "https://huggingface.co/yzd-v/DWPose"
    local = DWPose(weights=weights).licence_record("dwpose")  # a folder: its card's licence, else unknown
    assert local.weights_licence == "unknown" and set(local.weights_sha256) == {DETECTOR, POSE}


# -- the map and its record --------------------------------------------------------------------


def test_map_has_the_images_size_and_mode(annotator):
    image = person_picture(300, 457, (150, 40, 330, 290))  # non-square: resized to 512 x 768 for detection
    condition, used = annotator(image, gen())
    assert condition.shape == (300, 457, 3) and condition.dtype == np.uint8 and condition.flags.c_contiguous
    assert annotator.mode == "RGB"
    assert used["persons"] >= 1 and not used["_empty"] and condition.any()
    drawn = np.argwhere(condition.any(axis=2))  # the skeletons sit around the person, not in the dark
    assert 100 < drawn[:, 1].mean() < 380, drawn[:, 1].mean()


def test_record_structure(annotator):
    condition, used = annotator(person_picture(320, 320, (80, 40, 240, 300), seed=1), gen())
    assert set(used) == {"persons", "keypoints", "hands_found", "faces_found", "_empty"}
    assert used["persons"] == len(used["keypoints"]) >= 1
    for person in used["keypoints"]:
        assert len(person) == 18
        for point in person:
            assert point is None or (len(point) == 2 and all(isinstance(v, float) and round(v, 4) == v
                                                              for v in point))
        assert any(point is not None for point in person)
        if person[1] is not None:  # converted to OpenPose order: the neck is the shoulders' midpoint
            assert person[1] == pytest.approx(np.mean([person[2], person[5]], axis=0), abs=1.5e-4)
    assert any(person[1] is not None for person in used["keypoints"])
    assert 0 <= used["hands_found"] <= 2 * used["persons"] and 0 <= used["faces_found"] <= used["persons"]
    json.dumps(used)
    described = annotator.describe({k: v for k, v in used.items() if k != "_empty"})
    assert {k: described["params"][k] for k in ("detect_resolution", "hands", "face", "keep_empty",
                                                "score_threshold")} == {
        "detect_resolution": 512, "hands": True, "face": True, "keep_empty": True, "score_threshold": 0.3}
    assert described["params"]["persons"] == used["persons"]


def test_deterministic(weights, annotator):
    image = person_picture(288, 352, (100, 30, 260, 280), seed=2)
    first, used = annotator(image, gen(1))
    again, used_again = annotator(image, gen(2))
    fresh, used_fresh = DWPose(weights=weights)(image, gen(1))  # new onnxruntime sessions
    shipped = pickle.loads(pickle.dumps(annotator))  # after setup(): the sessions stay behind, reloaded there
    assert shipped.model is None and annotator.model is not None
    moved, used_moved = shipped(image, gen(1))
    assert np.array_equal(first, again) and np.array_equal(first, fresh) and np.array_equal(first, moved)
    assert used == used_again == used_fresh == used_moved
    import onnxruntime

    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert annotator.model.device == ("cuda" if cuda else "cpu")


def test_nobody_gives_a_black_map_or_no_person(weights, annotator):
    condition, used = annotator(nobody(), gen())
    assert not condition.any() and used == {"persons": 0, "keypoints": [], "hands_found": 0, "faces_found": 0,
                                            "_empty": True}
    strict = DWPose(weights=weights, keep_empty=False)
    with pytest.raises(Rejected) as caught:
        strict(nobody(), gen())
    assert caught.value.reason == "no_person"
    condition, used = strict(person_picture(256, 256, (60, 20, 200, 250)), gen())  # somebody: kept
    assert used["persons"] >= 1


def test_hands_and_face_options(weights, annotator):
    image = person_picture(320, 320, (80, 40, 240, 300), seed=1)
    full, used = annotator(image, gen())
    body_only, used_body = DWPose(weights=weights, hands=False, face=False)(image, gen())
    assert used["hands_found"] + used["faces_found"] > 0  # the stand-in sees some of them
    assert used_body["keypoints"] == used["keypoints"] and used_body["hands_found"] == used_body["faces_found"] == 0
    assert np.count_nonzero(body_only) < np.count_nonzero(full)


class Recorder:
    """An onnxruntime session that keeps what it was fed."""

    def __init__(self, session):
        self.session, self.fed = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, names, feed):
        self.fed.append(next(iter(feed.values())).copy())
        return self.session.run(names, feed)


def test_detector_gets_bgr_pixels_and_the_pose_network_normalised_rgb(weights):
    """As the networks were trained (mmdet: BGR 0-255; mmpose: bgr_to_rgb, ImageNet mean / std)."""
    made = DWPose(weights=weights)
    made.setup()
    made.model.detector.session = detector = Recorder(made.model.detector.session)
    made.model.pose.session = pose = Recorder(made.model.pose.session)
    image = nobody(256, 256)
    image[64:192, 64:192] = (250, 150, 50)  # an orange "person": R 250, G 150, B 50
    _, used = made(image, gen())
    assert used["persons"] >= 1
    fed = detector.fed[0]  # 256 -> 512 (detect resolution) -> 640 (letterbox, ratio 1.25)
    assert fed.shape == (1, 3, 640, 640) and fed.dtype == np.float32
    assert tuple(fed[0, :, 320, 320]) == (50, 150, 250), "BGR, raw pixel values"
    crop = pose.fed[0]
    assert crop.shape == (1, 3, 384, 288) and crop.dtype == np.float32
    expected = (np.array([250, 150, 50]) - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
    assert crop[0, :, 192, 144] == pytest.approx(expected, abs=1e-5), "RGB, normalised"


# -- batching --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["weights", "dynamic_weights"])
def test_annotate_batch_equals_per_image_calls(which, request):
    folder = request.getfixturevalue(which)
    made = DWPose(weights=folder, keep_empty=False)
    made.setup()
    assert made.model.pose_batched == (which == "dynamic_weights")
    images = [person_picture(300, 457, (150, 40, 330, 290)), nobody(),
              person_picture(320, 320, (80, 40, 240, 300), seed=1), person_picture(256, 384, (20, 10, 300, 250), 4)]
    batched = made.annotate_batch(images, [gen(i) for i in range(len(images))])
    assert len(batched) == len(images)
    assert isinstance(batched[1], Rejected) and batched[1].reason == "no_person"
    for index in (0, 2, 3):
        single, used = made(images[index], gen(index))
        assert np.array_equal(batched[index][0], single) and batched[index][1] == used
    assert made.annotate_batch([], []) == []


def test_fixed_and_dynamic_batch_networks_agree(weights, dynamic_weights):
    image = person_picture(256, 384, (20, 10, 300, 250), 4)
    fixed, used_fixed = DWPose(weights=weights)(image, gen())
    dynamic, used_dynamic = DWPose(weights=dynamic_weights)(image, gen())
    assert used_fixed["persons"] > 1, "several crops, so the dynamic network gets a batch"
    assert np.array_equal(fixed, dynamic) and used_fixed == used_dynamic


# -- weights --------------------------------------------------------------------------------


def test_missing_weights_name_the_file_and_the_setting(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError) as caught:
        DWPose(weights=str(empty)).check_weights()
    message = str(caught.value)
    assert DETECTOR in message and POSE in message and "annotator_params.dwpose.weights" in message
    assert "yzd-v/DWPose" in message
    half = tmp_path / "half"
    half.mkdir()
    (half / DETECTOR).write_bytes(yolox_bytes())
    with pytest.raises(MissingWeightsError) as caught:
        DWPose(weights=str(half)).setup()
    assert POSE in str(caught.value) and DETECTOR not in str(caught.value)
    with pytest.raises(MissingWeightsError) as caught:  # a hub id, offline (HF_HUB_OFFLINE=1 in conftest)
        DWPose(weights="nobody-here/no-such-dwpose").check_weights()
    assert "annotator_params.dwpose.weights" in str(caught.value) and DETECTOR in str(caught.value)


def test_bad_settings_are_one_clear_error():
    from stages.annotators import AnnotatorError

    for bad in ({"hands": "yes"}, {"score_threshold": 1.5}, {"detect_resolution": 0}, {"weights": ""}):
        with pytest.raises(AnnotatorError):
            create(["dwpose"], {"dwpose": bad})


# -- the conversion and the drawing, on hand-made keypoints ----------------------------------------

H, W = 512, 448  # not square: x and y normalised by the right sides
# COCO-WholeBody body points 0-16 (x, y) in pixels: a person facing the camera (their right on the left)
COCO_BODY = {0: (150, 60), 1: (170, 45), 2: (130, 45), 3: (195, 55), 4: (105, 55),  # nose, eyes, ears
             5: (200, 120), 6: (100, 120), 7: (240, 180), 8: (60, 180), 9: (260, 240), 10: (40, 240),
             11: (185, 240), 12: (115, 240), 13: (190, 310), 14: (110, 310), 15: (195, 380), 16: (105, 380)}
# OpenPose's 18 body points: which COCO point each one is (1, the neck, is made from the shoulders)
OPENPOSE_FROM_COCO = {0: 0, 2: 6, 3: 8, 4: 10, 5: 5, 6: 7, 7: 9, 8: 12, 9: 14, 10: 16, 11: 11, 12: 13, 13: 15,
                      14: 2, 15: 1, 16: 4, 17: 3}
# controlnet-aux's draw_bodypose: limbs (1-based OpenPose indices) and colours (RGB)
LIMB_SEQ = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
            [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18]]
COLOURS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
           [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
           [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
LEFT_HAND_AT = [(330, 400)] + [(300 + 25 * (i // 4), 420 + 25 * (i % 4)) for i in range(20)]  # wrist, 5 fingers
RIGHT_HAND_AT = [(30 + 5 * i, 450) for i in range(21)]  # scored 0.1: never drawn
FACE_AT = [(230 + 12 * (i % 17), 5 + 10 * (i // 17)) for i in range(68)]  # 4 rows of white dots, top right


def hand_made_person() -> tuple[np.ndarray, np.ndarray]:
    """One person's 133 COCO-WholeBody points and scores; the left knee (13) unseen."""
    points, scores = np.zeros((1, 133, 2)), np.full((1, 133), 0.9)
    for index, xy in COCO_BODY.items():
        points[0, index] = xy
    scores[0, 13] = 0.1
    points[0, 17:23] = (5, 5)  # feet: never drawn by controlnet-aux's DWPose
    points[0, 23:91] = FACE_AT
    points[0, 91:112] = LEFT_HAND_AT
    points[0, 112:133] = RIGHT_HAND_AT
    scores[0, 112:133] = 0.1
    return points, scores


def converted():
    from rtmlib.tools.pose_estimation.post_processings import convert_coco_to_openpose

    return convert_coco_to_openpose(*hand_made_person())


def test_coco_wholebody_to_openpose_order():
    keypoints, scores = converted()
    assert keypoints.shape == (1, 134, 2) and scores.shape == (1, 134)
    assert tuple(keypoints[0, 1]) == (150, 120), "the neck is the shoulders' midpoint"
    assert scores[0, 1] == pytest.approx(0.9)
    for openpose, coco in OPENPOSE_FROM_COCO.items():
        assert tuple(keypoints[0, openpose]) == COCO_BODY[coco], openpose
    assert scores[0, 12] == pytest.approx(0.1), "OpenPose 12 is the left knee"
    assert np.array_equal(keypoints[0, 24:92], FACE_AT) and np.array_equal(keypoints[0, 92:113], LEFT_HAND_AT)
    assert np.array_equal(keypoints[0, 113:134], RIGHT_HAND_AT)
    points, coco_scores = hand_made_person()
    points[0, 5, 1] += 40  # a lower left shoulder: the neck follows
    coco_scores[0, 6] = 0.2  # and its score is the shoulders' lower one
    from rtmlib.tools.pose_estimation.post_processings import convert_coco_to_openpose

    moved, moved_scores = convert_coco_to_openpose(points, coco_scores)
    assert tuple(moved[0, 1]) == (150, 140) and moved_scores[0, 1] == pytest.approx(0.2)


def test_limbs_and_joints_are_drawn_where_the_points_are_in_controlnet_aux_colours():
    keypoints, scores = converted()
    canvas, record = draw_wholebody(keypoints, scores, H, W)
    assert canvas.shape == (H, W, 3) and canvas.dtype == np.uint8
    body = {i: keypoints[0, i] for i in range(18)}
    for limb, (a, b) in enumerate(LIMB_SEQ):
        a, b = a - 1, b - 1
        x, y = (body[a] + body[b]) / 2
        expected = (np.array(COLOURS[limb], np.uint8) * 0.6).astype(np.uint8)  # limbs are dimmed to 0.6
        got = canvas[int(y), int(x)]
        if 12 in (a, b):  # the unseen left knee: neither of its limbs
            assert not got.any(), (limb, got)
        else:
            assert np.array_equal(got, expected), (limb, got, expected)
    for joint in range(18):
        x, y = body[joint]
        got = canvas[int(y), int(x)]
        if joint == 12:
            assert not got.any()
        else:
            assert np.array_equal(got, COLOURS[joint]), (joint, got)  # joints: full colour, drawn last
    # hands: lines in controlnet-aux's hsv colours, blue (RGB 0, 0, 255) points; the unseen hand not drawn
    wrist, thumb1 = LEFT_HAND_AT[0], LEFT_HAND_AT[1]
    mid = canvas[(wrist[1] + thumb1[1]) // 2, (wrist[0] + thumb1[0]) // 2]
    assert np.array_equal(mid, [255, 0, 0]), mid  # edge 0: hue 0
    x, y = LEFT_HAND_AT[10]  # edge 10 (10 -> 11, hue 0.5): cyan
    assert np.array_equal(canvas[y + 12, x], [0, 255, 255]), canvas[y + 12, x]
    for x, y in LEFT_HAND_AT:
        assert np.array_equal(canvas[y, x], [0, 0, 255])
    for x, y in RIGHT_HAND_AT:
        assert not canvas[y - 6:y + 7, x - 2:x + 3].any()
    for x, y in FACE_AT[17:]:  # face: white dots (the top row touches the image's edge: eps)
        assert np.array_equal(canvas[y, x], [255, 255, 255])
    assert not canvas[5:7, 5:7].any(), "feet are not drawn"
    assert record["persons"] == 1 and record["hands_found"] == 1 and record["faces_found"] == 1
    assert record["keypoints"][0][1] == [round(150 / W, 4), round(120 / H, 4)]
    assert record["keypoints"][0][2] == [round(100 / W, 4), round(120 / H, 4)], "OpenPose 2: the right shoulder"
    assert record["keypoints"][0][12] is None


def test_drawing_matches_controlnet_aux_draw_pose():
    """Body and face through controlnet-aux's own draw_pose, as its DWposeDetector feeds it
    (its draw_handpose needs matplotlib, not installed here: hands are compared separately)."""
    from controlnet_aux.dwpose import util

    keypoints, scores = converted()
    ours, _ = draw_wholebody(keypoints, scores, H, W, hands=False)
    # controlnet-aux's DWposeDetector.__call__, verbatim in effect: normalise, index, hide < 0.3
    candidate = keypoints.copy()
    candidate[..., 0] /= W
    candidate[..., 1] /= H
    body = candidate[:, :18].copy().reshape(18, 2)
    subset = scores.copy()
    score = subset[:, :18]
    for i in range(len(score)):
        for j in range(len(score[i])):
            score[i][j] = int(18 * i + j) if score[i][j] > 0.3 else -1
    candidate[subset < 0.3] = -1
    theirs = util.draw_bodypose(np.zeros((H, W, 3), np.uint8), body, score)
    theirs = util.draw_facepose(theirs, candidate[:, 24:92])
    assert np.array_equal(ours, theirs)


def test_hand_drawing_is_controlnet_aux_draw_handpose():
    """Against controlnet-aux's own draw_handpose where matplotlib is installed; else its colours."""
    peaks = np.random.default_rng(0).uniform(-0.1, 1, size=(4, 21, 2))
    ours = dwpose.draw_handpose(np.zeros((300, 200, 3), np.uint8), peaks)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        import colorsys

        assert dwpose.HAND_COLOURS[0] == (255, 0, 0) and dwpose.HAND_COLOURS[10] == (0, 255, 255)
        assert dwpose.HAND_COLOURS == [tuple(np.array(colorsys.hsv_to_rgb(i / 20, 1, 1)) * 255) for i in range(20)]
        assert ours.any()
        return
    from controlnet_aux.dwpose import util

    assert np.array_equal(ours, util.draw_handpose(np.zeros((300, 200, 3), np.uint8), peaks))
