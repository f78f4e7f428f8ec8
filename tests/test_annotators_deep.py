"""The paper's nine conditions.

Network annotators run their real controlnet-aux / transformers classes with RANDOM
weights written to a temporary folder and loaded back through the same loading code
a user hits (tests/annotator_weights.py, tests/tiny_models.py): that checks file
names, loading, plumbing, output size, dtype, channels and determinism, never the
quality of the maps. Classical pieces (Hough lines, scribble synthesis, normals from
depth) are checked for real.
"""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from annotator_weights import KINDS, write_random_weights
from stages.annotators import MissingWeightsError, create
from stages.annotators.mlsd import hough_lines
from stages.annotators.normal import normal_from_depth
from stages.annotators.scribble import synthesize_scribble

NETWORK_CONDITIONS = ("mlsd", "hed", "scribble", "openpose", "seg", "depth", "normal", "lineart", "lineart_anime")


@pytest.fixture(scope="session")
def aux_weights(tmp_path_factory):
    """One folder laid out like lllyasviel/Annotators, random weights."""
    folder = tmp_path_factory.mktemp("annotators")
    for kind in KINDS:
        write_random_weights(kind, folder)
    return folder


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    from tiny_models import make_tiny_dpt, make_tiny_upernet

    root = tmp_path_factory.mktemp("hf-annotators")
    return {"upernet": make_tiny_upernet(root / "upernet"), "dpt": make_tiny_dpt(root / "dpt")}


def network_params(aux_weights, hf_models, resolution=64):
    common = {"weights": str(aux_weights), "detect_resolution": resolution}
    return {
        "mlsd": common, "hed": common, "scribble": common, "lineart": common, "lineart_anime": common,
        "openpose": {**common, "hands": True, "face": True},
        "seg": {"weights": str(hf_models["upernet"])},
        "depth": common,
        "normal": common,
    }


def test_hough_finds_the_lines_of_a_grid():
    img = np.zeros((128, 160, 3), np.uint8)
    img[32::32, :] = 255
    img[:, 40::40] = 255
    lines, count = hough_lines(img, threshold=50, min_line_length=40)
    assert count >= 4
    ys, xs = np.nonzero(lines)
    near_grid = (np.abs(((ys + 16) % 32) - 16) <= 2) | (np.abs(((xs + 20) % 40) - 20) <= 2)
    assert near_grid.mean() > 0.95, "line pixels lie on the grid"
    assert lines[16, 20] == 0
    mlsd = create(["mlsd"], {"mlsd": {"method": "hough", "hough_threshold": 50}})["mlsd"]
    out, used = mlsd(img, np.random.default_rng(0))
    assert out.shape == (128, 160) and used["lines"] >= 4


def soft_square(size=96) -> np.ndarray:
    import cv2

    soft = np.zeros((size, size), np.uint8)
    cv2.rectangle(soft, (24, 24), (72, 72), 255, 5)  # a strong soft boundary, as HED gives
    return cv2.GaussianBlur(soft, (0, 0), 1.5)


def test_scribble_synthesis_is_seeded_and_stays_on_the_edges():
    soft = soft_square()
    a, used_a = synthesize_scribble(soft, np.random.default_rng(5))
    b, used_b = synthesize_scribble(soft, np.random.default_rng(5))
    assert np.array_equal(a, b) and used_a == used_b
    assert set(np.unique(a)) <= {0, 255}
    draws = [synthesize_scribble(soft, np.random.default_rng(s))[1] for s in range(10)]
    assert len({(d["sigma"], d["threshold"], d["thickness"]) for d in draws}) > 5, "parameters vary by seed"
    full, _ = synthesize_scribble(soft, np.random.default_rng(1), mask_fraction=(0, 0))
    ys, xs = np.nonzero(full)
    assert len(ys) > 50
    distance = np.minimum(np.minimum(np.abs(ys - 24), np.abs(ys - 72)), np.minimum(np.abs(xs - 24), np.abs(xs - 72)))
    assert distance.max() <= 4, "strokes lie on or near the edge"
    dropped, used = synthesize_scribble(soft, np.random.default_rng(1), mask_fraction=(1, 1))
    assert not dropped.any() and used["strokes_kept"] == 0


def test_normals_from_depth_follow_the_slope():
    flat = normal_from_depth(np.ones((32, 32), np.float32))
    assert (flat[..., 2] == 255).all() and (np.abs(flat[..., :2].astype(int) - 128) <= 1).all()
    ramp = normal_from_depth(np.tile(np.linspace(0, 10, 32, dtype=np.float32), (32, 1)), bg_threshold=0.0)
    centre = ramp[10:20, 10:20].reshape(-1, 3)
    assert (centre[:, 0] > 140).all() and (np.abs(centre[:, 1].astype(int) - 128) <= 1).all()
    assert len({tuple(p) for p in centre}) == 1


@pytest.mark.parametrize("name", NETWORK_CONDITIONS)
def test_network_annotator_with_random_weights(name, aux_weights, hf_models):
    params = network_params(aux_weights, hf_models)
    annotator = create([name], {name: params[name]})[name]
    annotator.check_weights()
    annotator.setup()
    image = np.asarray(Image.open(io.BytesIO(_photo_bytes())).convert("RGB").resize((80, 64)))
    first, used = annotator(image, np.random.default_rng(3))
    again, used_again = annotator(image, np.random.default_rng(3))
    channels = (64, 80) if annotator.mode == "L" else (64, 80, 3)
    assert first.shape == channels and first.dtype == np.uint8
    assert np.array_equal(first, again) and used == used_again, "same output twice under the same seed"
    info = annotator.describe(used)
    json.dumps(info)  # recordable in the sample's json


def _photo_bytes() -> bytes:
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, "JPEG")
    return buf.getvalue()


def test_depth_options_transformers_and_16_bit(hf_models, aux_weights):
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    made = create(["depth", "normal"], {
        "depth": {"method": "transformers", "weights": str(hf_models["dpt"]), "bits": 16},
        "normal": {"method": "from_depth", "depth": {"weights": str(aux_weights), "detect_resolution": 64}},
    })
    depth, _ = made["depth"](image, np.random.default_rng(0))
    assert depth.dtype == np.uint16 and depth.shape == (64, 80) and depth.max() == 65535 and depth.min() == 0
    normal, _ = made["normal"](image, np.random.default_rng(0))
    assert normal.shape == (64, 80, 3)


def test_openpose_draws_a_found_persons_hands(aux_weights, monkeypatch):
    """With hands on, a person's hands are drawn by controlnet-aux's draw_handpose, which
    imports matplotlib: before matplotlib was a dependency this raised ModuleNotFoundError
    as soon as anybody was found (random weights find nobody, so detection is stood in for)."""
    from controlnet_aux.open_pose import BodyResult, Keypoint, PoseResult

    annotator = create(["openpose"], {"openpose": {"weights": str(aux_weights), "detect_resolution": 64,
                                                   "hands": True}})["openpose"]
    annotator.setup()
    body = BodyResult([Keypoint(0.5, 0.2 + 0.03 * i) for i in range(18)], 1.0, 18)
    hand = [Keypoint(0.2 + 0.01 * i, 0.7 + 0.005 * i) for i in range(21)]
    monkeypatch.setattr(annotator.model, "detect_poses", lambda *a, **k: [PoseResult(body, hand, None, None)])
    drawn, used = annotator(np.zeros((64, 64, 3), np.uint8), np.random.default_rng(0))
    assert used["persons"] == 1 and drawn.shape == (64, 64, 3)
    assert drawn[40:60, 8:30].any(), "the hand, around (0.2-0.4, 0.7-0.8) of the picture, is drawn"


def test_openpose_without_a_person_is_kept_or_dropped_by_flag(aux_weights):
    from stages.transform.decode import Rejected

    blank = np.zeros((64, 64, 3), np.uint8)  # nobody here (and random weights find nobody anyway)
    kept = create(["openpose"], {"openpose": {"weights": str(aux_weights), "detect_resolution": 64}})["openpose"]
    out, used = kept(blank, np.random.default_rng(0))
    assert used["persons"] == 0 and used["keypoints"] == [] and used["_empty"] and not out.any()
    dropping = create(["openpose"], {"openpose": {"weights": str(aux_weights), "detect_resolution": 64,
                                                  "keep_empty": False}})["openpose"]
    with pytest.raises(Rejected) as info:
        dropping(blank, np.random.default_rng(0))
    assert info.value.reason == "no_person"


def test_missing_weights_name_the_file_and_the_setting(tmp_path):
    for name, missing in (("hed", "ControlNetHED.pth"), ("openpose", "body_pose_model.pth"),
                          ("depth", "dpt_hybrid-midas-501f0c75.pt"), ("lineart", "sk_model.pth")):
        annotator = create([name], {name: {"weights": str(tmp_path)}})[name]
        with pytest.raises(MissingWeightsError, match=missing) as info:
            annotator.check_weights()
        assert f"annotator_params.{name}.weights" in str(info.value)
    offline_hub = create(["mlsd"])["mlsd"]  # default hub repo, HF_HUB_OFFLINE=1 in the tests
    with pytest.raises(MissingWeightsError, match="mlsd_large_512_fp32.pth"):
        offline_hub.check_weights()
    seg = create(["seg"], {"seg": {"weights": str(tmp_path / "no-model")}})["seg"]
    with pytest.raises(MissingWeightsError, match="seg"):
        seg.check_weights()
    for name, params in (("seg", {}), ("depth", {"method": "transformers"})):  # an existing but empty folder:
        empty = create([name], {name: {**params, "weights": str(tmp_path)}})[name]  # transformers 5's cached_file
        with pytest.raises(MissingWeightsError, match=f"no config.json in {tmp_path}"):  # returns None there
            empty.check_weights()


class _Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_checkpoints_are_loaded_without_running_pickled_code(tmp_path, monkeypatch):
    """torch.load(weights_only=True) refuses the pickled call. Fails if a loader passes
    weights_only=False: the payload runs (PWNED appears) and setup fails otherwise, or not."""
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "ControlNetHED.pth", "wb") as handle:
        pickle.dump({"weights": _Exploit()}, handle)
    annotator = create(["hed"], {"hed": {"weights": str(tmp_path)}})["hed"]
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        annotator.setup()
    assert not (tmp_path / "PWNED").exists()


def test_a_build_with_all_nine_conditions(tmp_path, aux_weights, hf_models):
    """Every sample carries all nine members, and HF datasets reads nine image columns."""
    from conftest import write_real_photos
    from pipeline.build import run_build
    from pipeline.config import BuildConfig
    from stages.annotators import REGISTRY

    nine = ["canny", "mlsd", "hed", "scribble", "openpose", "seg", "depth", "normal", "lineart"]
    write_real_photos(tmp_path / "in", ["astronaut", "coffee"])
    out = tmp_path / "out"
    params = network_params(aux_weights, hf_models)
    cfg = BuildConfig(input=[str(tmp_path / "in")], output=str(out), conditions=nine, resolution=64, min_size=64,
                      caption_model="none", executor="local", preview=2, annotator_params={n: params[n] for n in nine[1:]})
    summary = run_build(cfg, log=lambda *_: None)
    assert summary["samples"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"][0]["conditions"] == nine

    import tarfile

    with tarfile.open(out / manifest["shards"][0]["name"]) as tar:
        names = tar.getnames()
        key = names[0].split(".")[0]
        assert names[:12] == [f"{key}.{m}" for m in ["jpg", "txt", "json", *[f"{c}.png" for c in nine]]]
        for cond in nine:
            img = Image.open(tar.extractfile(f"{key}.{cond}.png"))
            assert img.size == (64, 64) and img.mode == ("L" if REGISTRY[cond].mode == "L" else "RGB")
        meta = json.loads(tar.extractfile(f"{key}.json").read())
        assert set(meta["conditions"]) == set(nine)
        assert meta["conditions"]["scribble"]["params"]["thickness"] >= 1
    stats = json.loads((out / "shards" / "00000_stats.json").read_text())
    assert stats["counters"].get("openpose:empty") == 2  # random weights find nobody: kept and counted

    import datasets

    hf = datasets.load_dataset("webdataset", data_files={"train": [str(out / manifest["shards"][0]["name"])]},
                               split="train")
    image_columns = [c for c, f in hf.features.items() if isinstance(f, datasets.Image) and c != "jpg"]
    assert sorted(image_columns) == sorted(f"{c}.png" for c in nine)


def test_batched_step_matches_per_image_calls(aux_weights, hf_models, tmp_path):
    """The GPU actor's path (batches decoded from the stored JPEGs) stores what the
    annotator gives image by image, and a failing image costs only itself."""
    from conftest import write_synthetic
    from pipeline.config import BuildConfig
    from stages.transform.decode import decode_rgb
    from stages.read.readers import list_inputs
    from stages.work import plan_shards
    from pipeline.plan import Placement, make_steps

    write_synthetic(tmp_path / "in", 3, size=(64, 64))
    cfg = BuildConfig(input=[str(tmp_path / "in")], output=str(tmp_path / "o"), conditions=["seg"], resolution=64,
                      min_size=32, caption_model="none", annotator_params={"seg": {"weights": str(hf_models["upernet"])}})
    read, write = make_steps(cfg, Placement(annotator_gpus=0.5))
    work = read(plan_shards(list_inputs(cfg.input), 10)[0])
    step = write.gpu
    single = step.annotators["seg"]
    single.setup()
    expected = {s.key: single(decode_rgb(s.jpg), np.random.default_rng(0))[0] for s in work.samples}
    work.samples[1].jpg = b"broken"
    broken_key = work.samples[1].key
    kept = step.annotate_chunk(work, work.samples)
    assert [e["error"] for e in work.errors] == ["decode_error"] and broken_key not in {s.key for s in kept}
    assert len(kept) == 2
    for sample in kept:
        stored = np.asarray(Image.open(io.BytesIO(sample.conditions["seg"])))
        assert np.abs(stored.astype(int) - expected[sample.key].astype(int)).max() <= 1


def test_gpu_plan_moves_network_annotators_to_one_actor(tmp_path):
    """The plan a GPU cluster gets: the writer is the GPU actor that holds the network
    annotators (and runs the CPU ones), so no map leaves it. Run by the local executor,
    which pickles between step groups where Ray would, so no GPU is needed to check the
    wiring. Every annotator sees the stored JPEG in both plans, so here (all on a CPU)
    both plans give the same bytes."""
    import tarfile

    from conftest import write_synthetic
    from pipeline.config import BuildConfig
    from pipeline.executors import _group, run_local
    from stages.read.readers import list_inputs
    from stages.work import plan_shards
    from pipeline.plan import Placement, make_steps

    write_synthetic(tmp_path / "in", 3)
    members = {}
    for gpus in (0.0, 0.5):
        out = tmp_path / f"out{gpus}"
        cfg = BuildConfig(input=[str(tmp_path / "in")], output=str(out), conditions=["canny", "mlsd"],
                          min_size=64, caption_model="none", annotator_params={"mlsd": {"method": "hough"}})
        steps = make_steps(cfg, Placement(annotator_gpus=gpus))
        assert list(steps[-1].cpu.annotators) == (["canny"] if gpus else ["canny", "mlsd"])
        assert [type(s).__name__ for s in steps] == ["ReadDecode", "AnnotateAndWrite"]
        if gpus:
            assert [s.actor for s in steps] == [False, True] and steps[1].num_gpus == 0.5
            assert list(steps[1].gpu.annotators) == ["mlsd"] and len(_group(steps)) == 2
        else:
            assert steps[1].gpu is None and not steps[1].actor and len(_group(steps)) == 1
        [stats] = run_local(steps, plan_shards(list_inputs(cfg.input), 10))
        assert stats["samples"] == 3
        with tarfile.open(out / "shards" / "00000.tar") as tar:
            members[gpus] = {m.name: tar.extractfile(m).read() for m in tar}
    assert members[0.0].keys() == members[0.5].keys()
    assert any(name.endswith(".mlsd.png") for name in members[0.0])
    for name in members[0.0]:
        assert members[0.0][name] == members[0.5][name], name
