"""The build's GPU path, checked on the CPU: placement and actor sizing, one image size per
batch, the precision setting recorded in every sample, BLIP batched = single in fp32, and
bench/gpu_build.py --tiny end to end. Random weights throughout: plumbing, not quality."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import synthetic_image, write_synthetic
from pipeline.config import BuildConfig
from pipeline.plan import Placement, make_steps, place
from stages.annotators import create

REPO = Path(__file__).resolve().parent.parent


def test_placement_sizes_the_actor_pools_from_the_gpus():
    cfg = BuildConfig(input=["x"], conditions=["canny", "mlsd"], caption_model="none", annotator_num_gpus=0.5)
    annotators = create(cfg.conditions, {"mlsd": {"weights": "w"}})
    on_two = place(cfg, [], annotators, cluster_gpus=2.0)
    assert (on_two.annotator_gpus, on_two.annotator_actors) == (0.5, 4)
    steps = make_steps(cfg, on_two, annotators)
    assert steps[-1].actor and steps[-1].num_gpus == 0.5 and steps[-1].concurrency == 4
    # the local executor: batched on this machine's GPU when it has one, else image by image on the CPU
    assert place(cfg, [], annotators, None, local_gpus=1).annotator_gpus == 1.0
    assert place(cfg, [], annotators, None, local_gpus=0).annotator_gpus == 0.0
    # no network annotator: nothing to put on a GPU
    plain = create(["canny"])
    assert place(cfg.model_copy(update={"conditions": ["canny"]}), [], plain, cluster_gpus=2.0).annotator_gpus == 0


def test_a_batch_holds_one_image_size(tmp_path):
    """keep_ratio builds have several sizes: the chunk is batched by size, the samples keep their order."""
    from stages.annotators import Annotator
    from stages.steps import Annotation, AnnotationSettings
    from stages.transform.decode import encode_jpeg
    from stages.work import Sample, ShardWork

    shapes: list[set] = []

    class Recording(Annotator):
        name, uses_model, batch_size = "recording", False, 4

        def __call__(self, image, rng):
            return np.zeros(image.shape[:2], np.uint8), {}

        def annotate_batch(self, images, rngs):
            shapes.append({im.shape for im in images})
            return [self(im, rng) for im, rng in zip(images, rngs)]

    samples = []
    for i, (w, h) in enumerate([(64, 48), (48, 64), (64, 48), (48, 64), (64, 48)]):
        jpg = encode_jpeg(np.asarray(synthetic_image(i, (w, h))), 90)
        samples.append(Sample(f"{i:016x}", f"s{i}", "0", jpg, w, h, w, h))
    kept = Annotation({"recording": Recording()}, AnnotationSettings()).annotate_chunk(ShardWork(0, []), samples)
    assert [s.key for s in kept] == [s.key for s in samples]
    assert shapes and all(len(batch) == 1 for batch in shapes), shapes


@pytest.fixture(scope="module")
def hed_weights(tmp_path_factory):
    from annotator_weights import write_random_weights

    return write_random_weights("hed", tmp_path_factory.mktemp("hed"))


@pytest.mark.parametrize("dtype, expected", [("auto", "fp32"), ("bf16", "bf16")])
def test_the_precision_is_recorded_in_every_sample(tmp_path, hed_weights, tiny_blip, dtype, expected):
    """auto is fp32 on a CPU; the network's and BLIP's precision go into each sample's json."""
    from pipeline.build import run_build

    write_synthetic(tmp_path / "in", 3, size=(80, 64))
    cfg = BuildConfig(input=[str(tmp_path / "in")], output=str(tmp_path / "out"), conditions=["canny", "hed"],
                      resolution=64, min_size=32, caption_model=str(tiny_blip), caption_max_tokens=4,
                      executor="local", preview=0, report_samples=0, annotator_dtype=dtype,
                      annotator_params={"hed": {"weights": str(hed_weights), "detect_resolution": 64}})
    assert run_build(cfg, log=lambda *_: None)["samples"] == 3
    with tarfile.open(tmp_path / "out" / "shards" / "00000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert len(metas) == 3
    for meta in metas:
        assert meta["conditions"]["hed"]["precision"] == expected
        assert "precision" not in meta["conditions"]["canny"]  # no network, no precision
        assert meta["caption_precision"] == expected


def test_blip_batched_and_single_captions_are_equal_in_fp32(tiny_blip):
    from stages.models.captioner import BlipCaptioner

    images = [np.asarray(synthetic_image(i, (48, 40))) for i in range(5)]
    batched = BlipCaptioner(str(tiny_blip), "cpu", max_new_tokens=6, batch_size=5, precision="fp32")(images)
    single = BlipCaptioner(str(tiny_blip), "cpu", max_new_tokens=6, batch_size=1, precision="fp32")(images)
    assert batched == single and len(batched) == 5


def test_an_unknown_precision_is_refused_at_once():
    from common.config import ConfigError
    from pipeline.config import load_config

    with pytest.raises(ConfigError, match="annotator_dtype"):
        load_config(None, {"input": ["x"], "annotator_dtype": "fp8"})


def test_gpu_build_bench_runs_tiny_on_the_cpu(tmp_path):
    """bench/gpu_build.py --tiny: the GPU bench's own code path on a CPU with tiny random
    models; its figures are CPU figures of tiny nets, only the plumbing is checked here."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_build.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_build.json").read_text())
    models = {r["model"] for r in report["per_model"]}
    assert models == {"depth", "hed", "scribble", "mlsd", "openpose", "seg", "normal", "lineart",
                      "teed", "anyline", "depth_anything", "blip"}
    assert all(r["images_per_s"] and r["images_per_s"] > 0 for r in report["per_model"]), report["per_model"]
    assert {(r["precision"], r["batch"]) for r in report["per_model"]} == {("fp32", 1), ("fp32", 4),
                                                                          ("bf16", 1), ("bf16", 4)}
    assert [b["build"] for b in report["builds"]] == ["canny+depth+BLIP", "nine+BLIP"]
    assert all(b["samples"] == 4 and b["images_per_s"] > 0 for b in report["builds"])
    assert "| build nine+BLIP |" in done.stdout
