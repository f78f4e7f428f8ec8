"""Batched inference and precision for the network annotators.

Random weights (tests/annotator_weights.py, tests/tiny_models.py) on the CPU, 5 pictures
of different content at one small size, detect_resolution 64. What is checked:

- `annotate_batch` (one forward pass per batch) gives the maps of the single-image path
  `__call__` within 1 grey level (1/255 of the range for 16-bit depth), the same recorded
  values, and openpose's keypoints within 1 px; a batch of 2 gives what a batch of 5 gives;
  mixed sizes in one call come back in order. `cpu_batch = None` makes the CPU take the
  whole batch in one forward pass as a GPU does (by default most nets run image by image
  on a CPU, where that is faster).
- `batch_size` is a constructor setting that is not recorded in the sample's json.
- bf16 runs and gives maps of the right shape and dtype, and the fp32 path is untouched.
  The bf16-vs-fp32 difference is printed and written to $CONTROLFORGE_PRECISION_REPORT:
  a figure measured with RANDOM weights, not a statement on bf16's quality with real ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest

from annotator_weights import KINDS, write_random_weights
from stages.annotators import AnnotatorError, create

SIZE = (80, 96)  # height, width


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from tiny_models import make_tiny_dpt, make_tiny_upernet

    root = tmp_path_factory.mktemp("batched-annotators")
    for kind in KINDS:
        write_random_weights(kind, root / "aux")
    return {"aux": str(root / "aux"), "upernet": str(make_tiny_upernet(root / "upernet")),
            "dpt": str(make_tiny_dpt(root / "dpt"))}


def cases(weights) -> dict[str, tuple[str, dict]]:
    common = {"weights": weights["aux"], "detect_resolution": 64}
    return {
        "mlsd": ("mlsd", common),
        "hed": ("hed", common),
        "hed (pidinet)": ("hed", {**common, "method": "pidinet"}),
        "scribble": ("scribble", common),
        "openpose": ("openpose", common),  # body only: hands and face run per person, unbatched
        "seg": ("seg", {"weights": weights["upernet"]}),
        "depth (midas)": ("depth", common),
        "depth (midas, 16-bit)": ("depth", {**common, "bits": 16}),
        "depth (transformers)": ("depth", {"method": "transformers", "weights": weights["dpt"]}),
        "normal (bae)": ("normal", common),
        "normal (from depth)": ("normal", {"method": "from_depth", "depth": common}),
        "lineart": ("lineart", common),
        "lineart (coarse)": ("lineart", {**common, "coarse": True}),
        "lineart_anime": ("lineart_anime", common),
    }


LABELS = list(cases({"aux": "", "upernet": "", "dpt": ""}))


def pictures(size=SIZE, names=("astronaut", "chelsea", "coffee", "rocket", "camera")) -> list[np.ndarray]:
    import skimage.data
    from PIL import Image

    return [np.asarray(Image.fromarray(getattr(skimage.data, n)()).convert("RGB").resize(size[::-1])) for n in names]


def rngs(count: int) -> list[np.random.Generator]:
    return [np.random.default_rng(1000 + i) for i in range(count)]


@dataclass
class Case:
    label: str
    name: str
    params: dict
    annotator: object
    single: list  # __call__ image by image, fp32: the reference
    batched: list  # one annotate_batch call on the 5 images


@pytest.fixture(scope="module", params=LABELS)
def case(request, weights):
    name, params = cases(weights)[request.param]
    annotator = create([name], {name: params})[name]
    annotator.setup()
    for inner in (annotator, getattr(annotator, "edges", None), getattr(annotator, "depth_model", None)):
        if inner is not None:
            inner.cpu_batch = None  # one forward pass per batch, as on a GPU
    images = pictures()
    single = [annotator(image, rng) for image, rng in zip(images, rngs(len(images)))]
    return Case(request.param, name, params, annotator, single, annotator.annotate_batch(images, rngs(len(images))))


def assert_close(got, want, label: str) -> None:
    (got_map, got_used), (want_map, want_used) = got, want
    assert got_map.shape == want_map.shape and got_map.dtype == want_map.dtype, label
    tolerance = 1 if want_map.dtype == np.uint8 else 65535 // 255  # 1 grey level of 255, relative for 16-bit
    worst = int(np.abs(got_map.astype(np.int64) - want_map.astype(np.int64)).max())
    assert worst <= tolerance, f"{label}: {worst} levels apart"
    if "keypoints" in want_used:  # openpose: same persons, keypoints within 1 px
        assert got_used["persons"] == want_used["persons"], label
        height, width = want_map.shape[:2]
        for got_person, want_person in zip(got_used["keypoints"], want_used["keypoints"]):
            for g, w in zip(got_person, want_person):
                assert (g is None) == (w is None), label
                if w is not None:
                    assert abs(g[0] - w[0]) * width <= 1 and abs(g[1] - w[1]) * height <= 1, label
    else:
        assert got_used == want_used, label


def test_one_batched_call_matches_image_by_image(case):
    assert len(case.batched) == len(case.single)
    for got, want in zip(case.batched, case.single):
        assert_close(got, want, case.label)


def test_batch_size_does_not_change_the_maps(case):
    images = pictures()
    twos = []
    for start in range(0, 5, 2):
        twos += case.annotator.annotate_batch(images[start:start + 2], rngs(5)[start:start + 2])
    for got, want in zip(twos, case.batched):
        assert_close(got, want, case.label)


PRECISION_REPORT: dict[str, dict] = {}


def test_bf16_runs_and_leaves_fp32_alone(case, capsys):
    """bf16 against fp32 on this CPU: the run succeeds with the right shapes and dtypes,
    and fp32 still gives what it gave. The difference is recorded (random weights: a
    figure, not a quality claim). Two images: bf16 kernels are slow on most CPUs."""
    images = pictures()[:2]
    low = create([case.name], {case.name: case.params})[case.name]
    low.set_precision("bf16")
    low.setup()
    batched = low.annotate_batch(images, rngs(len(images)))
    one = low(images[0], rngs(1)[0])  # the single path at bf16 goes through the batched code
    diffs = []
    for (got, _), (want, _) in zip(batched, case.single):
        assert got.shape == want.shape and got.dtype == want.dtype
        diffs.append(np.abs(got.astype(np.float64) - want.astype(np.float64)))
    assert one[0].shape == case.single[0][0].shape and one[0].dtype == case.single[0][0].dtype
    again = [case.annotator(image, rng) for image, rng in zip(images, rngs(len(images)))]
    for (got, got_used), (want, want_used) in zip(again, case.single):  # case.single is longer: zip stops
        assert np.array_equal(got, want) and got_used == want_used, "fp32 output changed"
    levels = np.concatenate([d.ravel() for d in diffs])
    if case.single[0][0].dtype == np.uint16:
        levels = levels * 255 / 65535  # 16-bit depth in 8-bit grey levels
    row = {"max": round(float(levels.max()), 3), "mean": round(float(levels.mean()), 4)}
    PRECISION_REPORT[case.label] = row
    with capsys.disabled():
        print(f"\nbf16 vs fp32 {case.label:<24} max {row['max']:>7.2f}  mean {row['mean']:>7.4f} grey levels")
    if os.environ.get("CONTROLFORGE_PRECISION_REPORT"):
        with open(os.environ["CONTROLFORGE_PRECISION_REPORT"], "w") as handle:
            json.dump({"note": "bf16 vs fp32, CPU, random weights, detect_resolution 64, 2 images of 96x80; "
                               "max / mean absolute difference in 8-bit grey levels",
                       "annotators": PRECISION_REPORT}, handle, indent=1)


def test_sizes_mixed_in_one_call_come_back_in_order(weights):
    common = {"weights": weights["aux"], "detect_resolution": 64}
    for name, params in (("lineart", common), ("hed", {**common, "method": "pidinet"})):
        annotator = create([name], {name: params})[name]
        annotator.cpu_batch = None
        small, large = pictures((64, 64)), pictures((96, 128))
        images = [small[0], large[1], small[2], large[3], large[4]]
        batched = annotator.annotate_batch(images, rngs(5))
        for image, got, rng in zip(images, batched, rngs(5)):
            assert_close(got, annotator(image, rng), name)


def test_batch_size_is_a_setting_not_a_recorded_param(weights):
    from stages.annotators import REGISTRY

    defaults = {name: REGISTRY[name].batch_size for name in REGISTRY if REGISTRY[name].uses_model}
    assert all(1 <= size <= 32 for size in defaults.values()), defaults
    assert defaults["depth"] == defaults["normal"] == 8 and defaults["mlsd"] == 32
    common = {"weights": weights["aux"], "detect_resolution": 64}
    for name in ("hed", "scribble", "depth", "openpose"):
        default = create([name], {name: common})[name]
        tuned = create([name], {name: {**common, "batch_size": 3}})[name]
        assert tuned.batch_size == 3 and default.batch_size == REGISTRY[name].batch_size
        assert tuned.describe({}) == default.describe({}), "batch_size stays out of the sample's json"
        assert "batch_size" not in default.describe({})["params"]
    for bad in (0, -1, 2.5, "8"):
        with pytest.raises(AnnotatorError, match="batch_size"):
            create(["hed"], {"hed": {**common, "batch_size": bad}})


def test_precision_settings(weights):
    common = {"weights": weights["aux"], "detect_resolution": 64}
    image = pictures()[0]
    default = create(["lineart"], {"lineart": common})["lineart"]
    reference = default(image, rngs(1)[0])[0]
    for setting in ("fp32", "auto"):  # auto is fp32 on a CPU
        annotator = create(["lineart"], {"lineart": common})["lineart"]
        annotator.set_precision(setting)
        assert annotator.resolved_precision() == "fp32"
        assert np.array_equal(annotator(image, rngs(1)[0])[0], reference)
        assert annotator.describe({}) == default.describe({}), "precision is not recorded yet"
    with pytest.raises(AnnotatorError, match="precision"):
        default.set_precision("int8")
    with pytest.raises(AnnotatorError, match="before setup"):
        default.set_precision("bf16")  # weights already loaded


def test_on_a_cpu_conv_nets_run_image_by_image(weights):
    """cpu_batch = 1 (the default): annotate_batch on a CPU is the single path, bit for bit."""
    annotator = create(["lineart"], {"lineart": {"weights": weights["aux"], "detect_resolution": 64}})["lineart"]
    assert annotator.cpu_batch == 1
    images = pictures()[:3]
    one_by_one = [annotator(image, rng) for image, rng in zip(images, rngs(3))]
    for got, want in zip(annotator.annotate_batch(images, rngs(3)), one_by_one):
        assert np.array_equal(got[0], want[0])
