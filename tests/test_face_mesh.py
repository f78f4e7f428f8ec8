"""face_mesh with the REAL MediaPipe models (the quality of the maps, not only their plumbing).

The models come out of the mediapipe 0.10.21 wheel (.ci/run fetches them once:
`python -m stages.annotators.mediapipe_weights`; the fixture below fetches them too when
they are missing, and fails, never skips, when it cannot). The photos are scikit-image's:
astronaut() is a real face; coffee(), rocket() and chelsea() (a cat) have none.

Where the astronaut's features are was measured BY EYE on a 5x enlargement of the photo
with a 10 px grid, not taken from the model's output: a pupil, mouth or chin found a few
pixels off means the crop, rotation or projection math is wrong.
"""

from __future__ import annotations

import pickle
import shutil

import cv2
import numpy as np
import pytest
import skimage.data

import stages.annotators.face_mesh as face_mesh  # registers face_mesh
from stages.annotators import MissingWeightsError, create, mediapipe_weights
from stages.annotators.face_mesh import CONTOURS, LEFT_PUPIL, RIGHT_PUPIL, FaceMesh
from stages.transform.decode import Rejected

# astronaut() (512 x 512), pixel coordinates measured by eye (see the module docstring)
FACE_BOX = (172, 64, 280, 184)  # x0, y0, x1, y1: the face, hairline to chin, cheek to cheek
RIGHT_PUPIL_AT = (204.0, 101.5)  # the subject's right eye: the image's left one
LEFT_PUPIL_AT = (246.0, 103.0)
MOUTH_AT = (224.0, 146.0)  # between the lips, on the midline
NOSE_TIP_AT = (224.0, 127.0)
CHIN_AT = (224.0, 178.0)
FACE_WIDTH = 91.0  # cheek to cheek (skin to hair) at y = 115: x 180 to 271
# MediaPipe's 468-point topology: eye contours, the points between the lips, nose tip, chin
RIGHT_EYE = [33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173]
LEFT_EYE = [263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398]
MOUTH, NOSE_TIP, CHIN, FOREHEAD = [13, 14], 1, 152, 10
RIGHT_CHEEK, LEFT_CHEEK = 234, 454  # the face oval's widest points


@pytest.fixture(scope="module")
def weights():
    folder = mediapipe_weights.default_dir()
    try:
        mediapipe_weights.fetch(folder)  # nothing to do when .ci/run fetched them
    except mediapipe_weights.FetchError as exc:
        pytest.fail(f"the MediaPipe models are not in {folder} and could not be fetched ({exc}); "
                    f"run {mediapipe_weights.command()}")
    return str(folder)


@pytest.fixture(scope="module")
def annotator(weights):
    made = FaceMesh(weights=weights)
    made.setup()
    return made


@pytest.fixture(scope="module")
def astronaut():
    return np.ascontiguousarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def astronaut_result(annotator, astronaut):
    return annotator(astronaut, np.random.default_rng(0))


def pixels(record, face, shape):
    """A recorded face's landmarks in pixels of an image of `shape`."""
    return np.asarray(record["landmarks"][face]) * (shape[1], shape[0])


def test_astronaut_has_one_face_and_its_landmarks_lie_on_it(astronaut_result, astronaut):
    canvas, record = astronaut_result
    assert record["faces"] == 1 and len(record["landmarks"]) == 1 and record["_empty"] is False
    points = pixels(record, 0, astronaut.shape)
    assert points.shape == (468, 2)
    x0, y0, x1, y1 = FACE_BOX
    assert (points[:, 0] >= x0).all() and (points[:, 0] <= x1).all(), (points[:, 0].min(), points[:, 0].max())
    assert (points[:, 1] >= y0).all() and (points[:, 1] <= y1).all(), (points[:, 1].min(), points[:, 1].max())
    # the mesh covers the face, not a corner of it
    extent = points.max(0) - points.min(0)
    assert extent[0] > 0.75 * (x1 - x0) and extent[1] > 0.75 * (y1 - y0), extent
    # the features where they are in the photo
    right_eye, left_eye = points[RIGHT_EYE].mean(0), points[LEFT_EYE].mean(0)
    assert np.linalg.norm(right_eye - RIGHT_PUPIL_AT) < 4, right_eye
    assert np.linalg.norm(left_eye - LEFT_PUPIL_AT) < 4, left_eye
    assert np.linalg.norm(points[MOUTH].mean(0) - MOUTH_AT) < 5, points[MOUTH].mean(0)
    assert np.linalg.norm(points[NOSE_TIP] - NOSE_TIP_AT) < 6, points[NOSE_TIP]
    assert np.linalg.norm(points[CHIN] - CHIN_AT) < 6, points[CHIN]
    # and at the right scale (a landmark projection some 8 % too large or small fails these)
    eyes_apart = np.linalg.norm(np.subtract(LEFT_PUPIL_AT, RIGHT_PUPIL_AT))
    assert abs(np.linalg.norm(left_eye - right_eye) - eyes_apart) < 3, np.linalg.norm(left_eye - right_eye)
    width = np.linalg.norm(points[LEFT_CHEEK] - points[RIGHT_CHEEK])
    assert abs(width - FACE_WIDTH) < 5, width
    # and in their order: the subject's right eye on the image's left, nose between and below
    # the eyes, mouth below the nose, chin below the mouth, forehead above the eyes
    eye_y = (right_eye[1] + left_eye[1]) / 2
    assert right_eye[0] + 25 < left_eye[0]
    assert right_eye[0] < points[NOSE_TIP][0] < left_eye[0] and points[NOSE_TIP][1] > eye_y + 10
    assert points[MOUTH].mean(0)[1] > points[NOSE_TIP][1] + 5
    assert points[CHIN][1] > points[MOUTH].mean(0)[1] + 15
    assert points[FOREHEAD][1] < eye_y - 15


def test_astronaut_map_is_drawn_on_the_face_and_black_elsewhere(astronaut_result, astronaut):
    canvas, record = astronaut_result
    assert canvas.shape == astronaut.shape and canvas.dtype == np.uint8
    lit = canvas.any(axis=2)
    x0, y0, x1, y1 = FACE_BOX
    inside = np.zeros_like(lit)
    inside[y0 - 2:y1 + 3, x0 - 2:x1 + 3] = True  # 2 px lines
    assert lit[inside].sum() > 1000, lit[inside].sum()
    assert not lit[~inside].any(), np.argwhere(lit & ~inside)[:5]
    # controlnet-aux's colours: every contour colour is drawn, nothing else (512 px: no resize)
    colours = {tuple(c) for c in canvas[lit].tolist()}
    expected = {colour for colour, _ in CONTOURS} | {RIGHT_PUPIL, LEFT_PUPIL}
    assert colours == expected, colours ^ expected
    # the pupils: controlnet-aux's 4 x 4 squares, on the pupils seen in the photo
    for colour, (x, y) in ((RIGHT_PUPIL, RIGHT_PUPIL_AT), (LEFT_PUPIL, LEFT_PUPIL_AT)):
        found = np.argwhere((canvas == colour).all(axis=2))
        assert len(found) == 16, (colour, len(found))
        assert np.linalg.norm(found.mean(0)[::-1] + 0.5 - (x, y)) < 3, (colour, found.mean(0)[::-1])
    # the face oval closes around the measured features
    oval = np.argwhere((canvas == CONTOURS[0][0]).all(axis=2))
    assert oval[:, 1].min() < RIGHT_PUPIL_AT[0] - 10 and oval[:, 1].max() > LEFT_PUPIL_AT[0] + 10
    assert oval[:, 0].min() < RIGHT_PUPIL_AT[1] - 15 and oval[:, 0].max() > MOUTH_AT[1] + 15


@pytest.mark.parametrize("degrees", [35, -35])
def test_a_tilted_face_gets_the_same_landmarks_turned(annotator, astronaut, astronaut_result, degrees):
    """The face region is cut out turned by the eyes' angle and the landmarks turned back:
    with the photo turned 35 degrees, the landmarks must be the upright ones turned with it.
    (Cutting the region out without turning it misses by 5+ px on average; the wrong sign
    loses the face.)"""
    turn = cv2.getRotationMatrix2D((224.0, 125.0), degrees, 1.0)
    tilted = cv2.warpAffine(astronaut, turn, (512, 512), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    _, record = annotator(tilted, np.random.default_rng(0))
    assert record["faces"] == 1
    upright = pixels(astronaut_result[1], 0, astronaut.shape)
    expected = np.hstack([upright, np.ones((468, 1))]) @ turn.T
    miss = np.linalg.norm(pixels(record, 0, tilted.shape) - expected, axis=1)
    assert miss.mean() < 2.0 and np.percentile(miss, 95) < 4.0, (miss.mean(), np.percentile(miss, 95))


def test_a_mirrored_face_swaps_left_and_right(annotator, astronaut, astronaut_result):
    """Left and right are the subject's: in the mirror image the subject's right eye is where
    the left one was."""
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    _, record = annotator(mirrored, np.random.default_rng(0))
    assert record["faces"] == 1
    points = pixels(record, 0, mirrored.shape)
    points[:, 0] = 512 - points[:, 0]
    original = pixels(astronaut_result[1], 0, astronaut.shape)
    assert np.linalg.norm(points[RIGHT_EYE] - original[LEFT_EYE], axis=1).mean() < 2.5
    assert np.linalg.norm(points[MOUTH] - original[MOUTH], axis=1).mean() < 2.5


@pytest.mark.parametrize("name", ["coffee", "rocket", "chelsea"])
def test_no_face_gives_a_black_map(annotator, name):
    image = np.ascontiguousarray(getattr(skimage.data, name)())
    canvas, record = annotator(image, np.random.default_rng(0))
    assert record["faces"] == 0 and record["landmarks"] == [] and record["_empty"] is True
    assert canvas.shape == image.shape and not canvas.any()


def test_keep_empty_false_rejects_a_picture_without_a_face(weights, astronaut):
    strict = FaceMesh(weights=weights, keep_empty=False)
    with pytest.raises(Rejected) as caught:
        strict(np.ascontiguousarray(skimage.data.coffee()), np.random.default_rng(0))
    assert caught.value.reason == "no_face"
    assert strict(astronaut, np.random.default_rng(0))[1]["faces"] == 1  # a face passes


def test_max_faces(weights, astronaut):
    face = astronaut[20:260, 105:345]
    two = np.ascontiguousarray(np.hstack([face, face[:, ::-1]]))  # the face and its mirror image
    for limit, found in ((1, 1), (2, 2), (3, 2)):
        canvas, record = FaceMesh(weights=weights, max_faces=limit)(two, np.random.default_rng(0))
        assert record["faces"] == found, (limit, record["faces"])
    centres = sorted(np.asarray(points)[:, 0].mean() for points in record["landmarks"])
    assert centres[0] < 0.5 < centres[1]  # one face in each half
    assert canvas[:, :240].any() and canvas[:, 240:].any()


def test_deterministic_and_picklable(weights, annotator, astronaut, astronaut_result):
    again = annotator(astronaut, np.random.default_rng(123))  # no randomness: the seed changes nothing
    fresh = pickle.loads(pickle.dumps(FaceMesh(weights=weights)))
    other = fresh(astronaut, np.random.default_rng(0))
    for canvas, record in (again, other):
        assert np.array_equal(canvas, astronaut_result[0])
        assert record == astronaut_result[1]
    pickle.dumps(annotator)  # after setup() too: the interpreters stay behind


@pytest.mark.parametrize("box", [(30, 330, 100, 500), (0, 512, 120, 400)])  # wide and tall
def test_a_non_square_crop_keeps_its_size_and_its_landmarks(annotator, astronaut, astronaut_result, box):
    top, bottom, left, right = box
    crop = np.ascontiguousarray(astronaut[top:bottom, left:right])
    canvas, record = annotator(crop, np.random.default_rng(0))
    assert canvas.shape == crop.shape
    assert record["faces"] == 1
    # the letterbox (detector) and the detect resolution's resize undone: the same face points
    found = pixels(record, 0, crop.shape) + (left, top)
    miss = np.linalg.norm(found - pixels(astronaut_result[1], 0, astronaut.shape), axis=1)
    assert miss.mean() < 1.5 and miss.max() < 5, (miss.mean(), miss.max())
    lit = np.argwhere(canvas.any(axis=2)) + (top, left)
    x0, y0, x1, y1 = FACE_BOX
    assert lit[:, 1].min() >= x0 - 3 and lit[:, 1].max() <= x1 + 3
    assert lit[:, 0].min() >= y0 - 3 and lit[:, 0].max() <= y1 + 3


def test_grey_and_rgba_images(annotator, astronaut):
    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    canvas, record = annotator(grey, np.random.default_rng(0))
    assert canvas.shape == (*grey.shape, 3) and record["faces"] == 1
    rgba = np.dstack([astronaut, np.full(grey.shape, 255, np.uint8)])
    assert annotator(rgba, np.random.default_rng(0))[1]["faces"] == 1


def test_registered_with_its_settings_and_licences(weights):
    made = create(["face_mesh"], {"face_mesh": {"weights": weights, "max_faces": 2, "min_confidence": 0.6}})
    annotator = made["face_mesh"]
    assert isinstance(annotator, FaceMesh) and annotator.mode == "RGB"
    assert annotator.uses_model is False  # CPU TFLite: runs in the CPU shard tasks
    info = annotator.describe({"faces": 0})
    assert info["params"]["max_faces"] == 2 and info["params"]["min_confidence"] == 0.6
    assert (FaceMesh.code_licence, FaceMesh.weights_licence) == ("Apache-2.0", "Apache-2.0")
    assert "google-ai-edge/mediapipe" in FaceMesh.weights_source
    for bad in ({"max_faces": 0}, {"min_confidence": 1.5}, {"detect_resolution": 8}):
        with pytest.raises(ValueError):
            FaceMesh(weights=weights, **bad)
    if hasattr(annotator, "licence_record"):  # the build's licence record: the folder's model card
        record = annotator.licence_record("face_mesh")
        assert record.weights_licence == "Apache-2.0" and record.commercial
        assert set(record.weights_sha256) == set(mediapipe_weights.MODELS)
        assert record.weights_sha256["face_landmark.tflite"] == mediapipe_weights.FILES["face_landmark.tflite"][1]


def test_default_weights_declare_their_licence_without_a_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLFORGE_CACHE", str(tmp_path))  # an empty default folder
    record = FaceMesh().licence_record("face_mesh", hash_weights=False)  # what --licence-policy checks first
    assert record.weights_licence == "Apache-2.0" and record.commercial
    assert record.weights == str(mediapipe_weights.default_dir()) and not any(tmp_path.iterdir())


def test_missing_weights_name_the_file_the_setting_and_the_command(tmp_path, weights):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError) as caught:
        FaceMesh(weights=str(empty)).check_weights()
    message = str(caught.value)
    assert "annotator_params.face_mesh.weights" in message and "face_landmark.tflite" in message
    assert "stages.annotators.mediapipe_weights" in message and str(empty) in message
    with pytest.raises(MissingWeightsError):
        FaceMesh(weights=str(tmp_path / "nowhere")).setup()
    # a file that is there but not the one measured
    broken = tmp_path / "broken"
    shutil.copytree(weights, broken)
    (broken / "face_landmark.tflite").write_bytes(b"not a model")
    with pytest.raises(MissingWeightsError, match=r"face_landmark\.tflite \(sha256 differs\)"):
        FaceMesh(weights=str(broken)).check_weights()


def test_default_weights_fetch_failure_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds no wheel: as offline
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(MissingWeightsError) as caught:
        FaceMesh().check_weights()
    message = str(caught.value)
    assert "python" in message and "-m stages.annotators.mediapipe_weights" in message
    assert "annotator_params.face_mesh.weights" in message and str(tmp_path / "cache") in message


def test_fetching_again_does_nothing(weights, tmp_path, capsys):
    assert mediapipe_weights.fetch(weights) is False
    copy = tmp_path / "copy"
    shutil.copytree(weights, copy)
    assert mediapipe_weights.main([str(copy)]) == 0
    assert "already in" in capsys.readouterr().out
    for name, (_, digest) in mediapipe_weights.FILES.items():
        assert mediapipe_weights.sha256(copy / name) == digest
    assert "license: apache-2.0" in (copy / mediapipe_weights.CARD_NAME).read_text()


def test_draw_face_skips_lines_to_points_off_the_canvas():
    points = np.full((468, 2), 0.5)
    points[10] = (1.2, 0.5)  # the forehead point of the oval, off the canvas
    canvas = np.zeros((64, 64, 3), np.uint8)
    face_mesh.draw_face(canvas, points)
    assert not canvas[:, 40:].any()  # neither line to it was drawn (everything else is one point)
