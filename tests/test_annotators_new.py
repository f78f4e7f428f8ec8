"""The shuffle, lineart_standard, depth_anything, teed and anyline annotators.

Random weights built here (tests/new_annotator_weights.py): they check plumbing (file
names, layouts, shapes, dtypes, batching, determinism), never the quality of a map.
Small pictures (96x80, detect_resolution 64) on the CPU; nothing is downloaded.

What is checked:
- every one gives a map of the image's exact size, its dtype and mode, the same map for
  the same seed; `shuffle` draws from the sample's rng (same seed: same map and recorded
  seed, even from a fresh instance; other seeds: other maps), leaves numpy's global
  generator as it found it, and its map can be redrawn from the recorded seed alone;
- settings are recorded in describe() and change the map; bad settings raise
  AnnotatorError naming the setting;
- the networks (teed, anyline, depth_anything 8- and 16-bit): one batched forward pass
  over 5 different pictures equals the single path within 1 grey level (1/255 of the
  range for 16-bit), mixed sizes in one call come back in order, bf16 runs with the
  right shapes and dtypes;
- missing weights are a MissingWeightsError naming the file, the setting and the repo;
- the licence attributes, and the weight files the licence record hashes.
"""

from __future__ import annotations

import numpy as np
import pytest

import stages.annotators.anyline  # noqa: F401  (register: not yet imported by the package)
import stages.annotators.depth_anything  # noqa: F401
import stages.annotators.lineart_standard  # noqa: F401
import stages.annotators.shuffle  # noqa: F401
import stages.annotators.teed  # noqa: F401
from new_annotator_weights import make_tiny_depth_anything, write_ted_weights
from stages.annotators import REGISTRY, AnnotatorError, MissingWeightsError, create

SIZE = (80, 96)  # height, width
NEW = ("shuffle", "lineart_standard", "depth_anything", "teed", "anyline")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny nets on a CPU shared with other jobs: one thread is faster than two fighting (restored after)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("new-annotators")
    write_ted_weights("teed", root / "aux")
    write_ted_weights("anyline", root / "aux")
    return {"aux": str(root / "aux"), "da": str(make_tiny_depth_anything(root / "depth-anything"))}


def cases(weights) -> dict[str, tuple[str, dict]]:
    aux = {"weights": weights["aux"], "detect_resolution": 64}
    return {
        "shuffle": ("shuffle", {"detect_resolution": 64}),
        "lineart_standard": ("lineart_standard", {"detect_resolution": 64}),
        "teed": ("teed", aux),
        "anyline": ("anyline", aux),
        "depth_anything": ("depth_anything", {"weights": weights["da"]}),
        "depth_anything (16-bit)": ("depth_anything", {"weights": weights["da"], "bits": 16}),
    }


LABELS = list(cases({"aux": "", "da": ""}))
NETWORKS = [label for label in LABELS
            if cases({"aux": "", "da": ""})[label][0] in ("teed", "anyline", "depth_anything")]


def pictures(size=SIZE, names=("astronaut", "chelsea", "coffee", "rocket", "camera")) -> list[np.ndarray]:
    import skimage.data
    from PIL import Image

    return [np.asarray(Image.fromarray(getattr(skimage.data, n)()).convert("RGB").resize(size[::-1])) for n in names]


def rngs(count: int, base: int = 1000) -> list[np.random.Generator]:
    return [np.random.default_rng(base + i) for i in range(count)]


def make(weights, label):
    name, params = cases(weights)[label]
    return create([name], {name: params})[name]


def assert_close(got, want, label: str) -> None:
    (got_map, got_used), (want_map, want_used) = got, want
    assert got_map.shape == want_map.shape and got_map.dtype == want_map.dtype, label
    tolerance = 1 if want_map.dtype == np.uint8 else 65535 // 255
    worst = int(np.abs(got_map.astype(np.int64) - want_map.astype(np.int64)).max())
    assert worst <= tolerance, f"{label}: {worst} levels apart"
    assert got_used == want_used, label


# -- every annotator --------------------------------------------------------------------------


@pytest.mark.parametrize("label", LABELS)
def test_map_has_the_image_size_dtype_and_mode_and_is_deterministic(weights, label):
    annotator = make(weights, label)
    cls = type(annotator)
    assert cls.name in NEW and REGISTRY[cls.name] is cls and cls.version == "1"
    want_dtype = np.uint16 if cases(weights)[label][1].get("bits") == 16 else np.uint8
    for height, width in (SIZE, (72, 61)):  # 61: not a multiple of anything a detector rounds to
        image = pictures((height, width))[1]
        first = annotator(image, np.random.default_rng(7))
        again = annotator(image, np.random.default_rng(7))
        result, used = first
        assert result.dtype == want_dtype == annotator.dtype, label
        assert result.shape == ((height, width) if cls.mode == "L" else (height, width, 3)), label
        assert result.flags.c_contiguous and result.max() > result.min(), f"{label}: a flat map"
        assert np.array_equal(result, again[0]) and used == again[1], f"{label}: same seed, another map"
    described = annotator.describe(used)
    assert described["annotator"] == cls.__name__ and described["version"] == "1"
    for key, value in cases(weights)[label][1].items():
        assert described["params"][key] == value, f"{label}: {key} not recorded"


def test_licence_attributes():
    for name in NEW:
        cls = REGISTRY[name]
        assert cls.code_licence == "Apache-2.0", name
        assert (cls.weights_licence is None) == (cls.weights_source is None) == (not cls.uses_model), name
    assert REGISTRY["teed"].weights_licence == "MIT" and REGISTRY["depth_anything"].weights_licence == "Apache-2.0"
    assert REGISTRY["anyline"].weights_licence.startswith("openrail++ (https://huggingface.co/TheMistoAI/MistoLine")
    assert REGISTRY["anyline"].permissive_alternative == "teed" and "teed" in REGISTRY


def test_declared_licence_holds_for_the_default_weights_only(weights):
    from stages.annotators.licences import hub_repo

    for name in ("teed", "anyline", "depth_anything"):
        default = create([name])[name]
        assert hub_repo(default.weights_source) == default.weights, f"{name}: source is not the default repo"
        assert default.licence_record(name, hash_weights=False).weights_licence == default.weights_licence
    for name in ("shuffle", "lineart_standard"):
        record = create([name])[name].licence_record(name)
        assert record.weights is None and record.commercial, name
    local = create(["teed"], {"teed": {"weights": weights["aux"]}})["teed"]
    assert local.licence_record("teed", hash_weights=False).weights_licence == "unknown"  # a folder without a card


def test_weight_files_are_the_checkpoints_loaded(weights, tmp_path):
    from pathlib import Path

    for name, relative in (("teed", "5_model.pth"), ("anyline", "Anyline/MTEED.pth")):
        annotator = create([name], {name: {"weights": weights["aux"]}})[name]
        assert annotator.weight_files() == [Path(weights["aux"]) / relative], name
        assert set(annotator.licence_record(name).weights_sha256) == {Path(relative).name}, name
    # a hub download hands back the file's own folder: the flat layout is found there too
    anyline = create(["anyline"], {"anyline": {"weights": weights["aux"]}})["anyline"]
    assert anyline.checkpoint(Path(weights["aux"]) / "Anyline") == Path(weights["aux"]) / "Anyline" / "MTEED.pth"


# -- shuffle ----------------------------------------------------------------------------------


def test_shuffle_draws_from_the_sample_rng():
    from stages.annotators.shuffle import global_numpy_seed

    image = pictures()[0]
    shuffle = create(["shuffle"], {"shuffle": {"detect_resolution": 64}})["shuffle"]
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    maps = [shuffle(image, np.random.default_rng(seed)) for seed in (1, 2, 3, 1)]
    assert np.array_equal(np.random.get_state()[1], before), "numpy's global generator was left changed"
    assert np.array_equal(maps[0][0], maps[3][0]) and maps[0][1] == maps[3][1]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.array_equal(maps[a][0], maps[b][0]) and maps[a][1]["seed"] != maps[b][1]["seed"]
    fresh = create(["shuffle"], {"shuffle": {"detect_resolution": 64}})["shuffle"]  # a rebuild, another worker
    assert np.array_equal(fresh(image, np.random.default_rng(2))[0], maps[1][0])
    # the recorded seed alone redraws the map with controlnet-aux's own call
    from controlnet_aux import ContentShuffleDetector

    from stages.annotators.detector import fit

    seed, f = maps[2][1]["seed"], maps[2][1]["f"]
    with global_numpy_seed(seed):
        redrawn = ContentShuffleDetector()(image, f=f, detect_resolution=64, image_resolution=min(SIZE),
                                           output_type="np")
    assert np.array_equal(fit(redrawn, image, "RGB"), maps[2][0])
    # a shuffle keeps the picture's colours, only moved about
    assert abs(float(maps[0][0].mean()) - float(image.mean())) < 40


def test_shuffle_f_range_is_drawn_and_recorded():
    shuffle = create(["shuffle"], {"shuffle": {"detect_resolution": 64, "f": [16, 48]}})["shuffle"]
    drawn = {shuffle(pictures()[0], np.random.default_rng(seed))[1]["f"] for seed in range(12)}
    assert drawn <= set(range(16, 49)) and len(drawn) > 1
    assert shuffle.describe({})["params"]["f"] == [16, 48]


# -- settings ---------------------------------------------------------------------------------


def test_settings_are_recorded_and_change_the_map(weights):
    image = pictures()[2]
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    aux = {"weights": weights["aux"], "detect_resolution": 64}
    pairs = [
        ("lineart_standard", {"detect_resolution": 64}, {"guassian_sigma": 2.5, "intensity_threshold": 2}),
        ("teed", aux, {"safe_steps": 0}),
        ("anyline", aux, {"guassian_sigma": 4.0, "intensity_threshold": 1}),
        ("shuffle", {"detect_resolution": 64}, {"f": 32}),
    ]
    for name, base, changed in pairs:
        default = create([name], {name: base})[name]
        tuned = create([name], {name: {**base, **changed}})[name]
        recorded = tuned.describe(tuned(image, rng())[1])["params"]
        for key, value in changed.items():
            assert recorded[key] == value, f"{name}: {key}"
        assert not np.array_equal(default(image, rng())[0], tuned(image, rng())[0]), f"{name}: {changed} had no effect"
    assert create(["teed"])["teed"].describe({})["params"]["safe_steps"] == 2
    anyline = create(["anyline"])["anyline"].describe({})["params"]
    assert (anyline["detect_resolution"], anyline["guassian_sigma"], anyline["intensity_threshold"]) == (1280, 2.0, 3)
    standard = create(["lineart_standard"])["lineart_standard"].describe({})["params"]
    assert (standard["guassian_sigma"], standard["intensity_threshold"]) == (6.0, 8)


BAD = [
    ("shuffle", {"f": 0}, "shuffle f"),
    ("shuffle", {"f": [64, 32]}, "shuffle f"),
    ("shuffle", {"f": "256"}, "shuffle f"),
    ("shuffle", {"detect_resolution": 10}, "shuffle detect_resolution"),
    ("shuffle", {"sigma": 1}, "bad annotator_params for 'shuffle'"),
    ("lineart_standard", {"guassian_sigma": 0}, "lineart_standard guassian_sigma"),
    ("lineart_standard", {"guassian_sigma": "6"}, "lineart_standard guassian_sigma"),
    ("lineart_standard", {"intensity_threshold": -1}, "lineart_standard intensity_threshold"),
    ("lineart_standard", {"detect_resolution": 63.5}, "lineart_standard detect_resolution"),
    ("teed", {"safe_steps": -1}, "teed safe_steps"),
    ("teed", {"safe_steps": 1.5}, "teed safe_steps"),
    ("teed", {"batch_size": 0}, "teed batch_size"),
    ("anyline", {"guassian_sigma": -2}, "anyline guassian_sigma"),
    ("anyline", {"intensity_threshold": 300}, "anyline intensity_threshold"),
    ("depth_anything", {"bits": 12}, "depth_anything bits must be 8 or 16"),
    ("depth_anything", {"method": "midas"}, "depth_anything runs through transformers only"),
]


@pytest.mark.parametrize("name, params, message", BAD, ids=[f"{n}-{p}" for n, p, _ in BAD])
def test_bad_settings_are_one_clear_error(name, params, message):
    with pytest.raises(AnnotatorError, match=message.replace("(", r"\(")):
        create([name], {name: params})


def test_lineart_standard_on_a_flat_image():
    """No pixel above the threshold: controlnet-aux falls back to 16 (numpy's warning is muted)."""
    import warnings

    flat = np.full((*SIZE, 3), 128, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result, _ = create(["lineart_standard"], {"lineart_standard": {"detect_resolution": 64}})[
            "lineart_standard"](flat, np.random.default_rng(0))
    assert result.shape == SIZE and not result.any()


# -- the networks: batched, mixed sizes, bf16 -------------------------------------------------


@pytest.fixture(scope="module", params=NETWORKS)
def network(request, weights):
    annotator = make(weights, request.param)
    annotator.setup()
    annotator.cpu_batch = None  # one forward pass per batch, as on a GPU
    return request.param, annotator


def test_one_batched_call_matches_image_by_image(network):
    label, annotator = network
    images = pictures()
    single = [annotator(image, rng) for image, rng in zip(images, rngs(5))]
    calls = []
    forward = annotator.forward
    annotator.forward = lambda batch: calls.append(batch.shape[0]) or forward(batch)
    try:
        batched = annotator.annotate_batch(images, rngs(5))
    finally:
        del annotator.forward
    assert calls == [5], f"{label}: {calls} forward passes, not one of 5"
    assert len(batched) == 5
    for got, want in zip(batched, single):
        assert_close(got, want, label)
    assert not all(np.array_equal(batched[0][0], other[0]) for other in batched[1:]), "5 pictures, one map"


def test_sizes_mixed_in_one_call_come_back_in_order(network):
    label, annotator = network
    small, large = pictures((64, 64)), pictures((96, 128))
    images = [small[0], large[1], small[2], large[3], large[4]]
    batched = annotator.annotate_batch(images, rngs(5))
    for image, got, rng in zip(images, batched, rngs(5)):
        assert got[0].shape[:2] == image.shape[:2], label
        assert_close(got, annotator(image, rng), label)


def test_bf16_runs_with_the_right_shapes_and_dtypes(network, weights, capsys):
    """bf16 against fp32: shapes and dtypes, and the difference recorded for the README's
    table (random weights: a figure, not a quality claim)."""
    label, reference = network
    name, params = cases(weights)[label]
    low = create([name], {name: params})[name]
    low.set_precision("bf16")
    low.setup()
    images = pictures()[:2]
    batched = low.annotate_batch(images, rngs(2))
    one = low(images[0], rngs(1)[0])
    diffs = []
    for (got, used), image in zip([*batched, one], [*images, images[0]]):
        want, _ = reference(image, rngs(1)[0])
        assert got.shape == want.shape and got.dtype == want.dtype, label
        levels = np.abs(got.astype(np.float64) - want.astype(np.float64))
        diffs.append(levels * 255 / 65535 if want.dtype == np.uint16 else levels)
    levels = np.concatenate([d.ravel() for d in diffs])
    with capsys.disabled():
        print(f"\nbf16 vs fp32 {label:<24} max {levels.max():>7.2f}  mean {levels.mean():>7.4f} grey levels")
    assert next(p for p in low.network().parameters()).dtype.is_floating_point
    import torch

    assert next(p for p in low.network().parameters()).dtype == torch.bfloat16, label


def test_on_a_cpu_the_networks_run_image_by_image(weights):
    """cpu_batch = 1 for all three (batching was slower on this CPU; figures in the modules):
    annotate_batch on a CPU is the single path, bit for bit."""
    images = pictures()[:2]
    for label in ("teed", "anyline", "depth_anything"):
        annotator = make(weights, label)
        assert annotator.cpu_batch == 1
        for got, want in zip(annotator.annotate_batch(images, rngs(2)),
                             [annotator(image, rng) for image, rng in zip(images, rngs(2))]):
            assert np.array_equal(got[0], want[0]), label


# -- missing weights --------------------------------------------------------------------------


def test_missing_weights_name_the_file_the_setting_and_the_repo(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never a download
    empty = str(tmp_path)
    for name, file, repo in (("teed", "5_model.pth", "fal-ai/teed"), ("anyline", "Anyline/MTEED.pth",
                                                                     "TheMistoAI/MistoLine")):
        for params in ({"weights": empty}, {}):  # a folder without the file; the default repo, offline
            annotator = create([name], {name: params})[name]
            for step in (annotator.check_weights, annotator.setup):
                with pytest.raises(MissingWeightsError) as caught:
                    step()
                message = str(caught.value)
                for part in (file, f"annotator_params.{name}.weights", repo):
                    assert part in message, f"{name} {params}: {part!r} not in {message!r}"
                assert "lllyasviel/Annotators" not in message, message
    for params in ({"weights": empty}, {}):
        depth = create(["depth_anything"], {"depth_anything": params})["depth_anything"]
        source = params.get("weights", "depth-anything/Depth-Anything-V2-Small-hf")
        for step in (depth.check_weights, depth.setup):
            with pytest.raises(MissingWeightsError, match="annotator_params.depth_anything.weights") as caught:
                step()
            assert source in str(caught.value)
