"""Every condition added since the paper's nine builds end to end in one build: shuffle,
lineart_standard, teed, anyline, depth_anything, dwpose, sam (random or stand-in weights:
plumbing only) and face_mesh (its real MediaPipe weights). Each sample carries every map
at the stored image's size and mode, its json records every condition with its licence,
and the manifest holds one licence record per condition."""

from __future__ import annotations

import json
import tarfile

from PIL import Image

from conftest import write_real_photos
from new_annotator_weights import make_tiny_depth_anything, write_ted_weights
from pipeline.build import run_build
from pipeline.config import BuildConfig
from stages.annotators import REGISTRY
from stages.shards.layout import condition_sort_key
from test_dwpose import write_weights as write_dwpose_stand_ins
from test_sam import make_tiny_sam

NEW = ["shuffle", "lineart_standard", "teed", "anyline", "depth_anything", "dwpose", "sam", "face_mesh"]


def test_a_build_with_every_new_condition(tmp_path):
    for kind in ("teed", "anyline"):
        write_ted_weights(kind, tmp_path / "ted")
    write_dwpose_stand_ins(tmp_path / "dwpose")
    params = {
        "shuffle": {"detect_resolution": 64}, "lineart_standard": {"detect_resolution": 64},
        "teed": {"weights": str(tmp_path / "ted"), "detect_resolution": 64},
        "anyline": {"weights": str(tmp_path / "ted"), "detect_resolution": 64},
        "depth_anything": {"weights": str(make_tiny_depth_anything(tmp_path / "da"))},
        "dwpose": {"weights": str(tmp_path / "dwpose"), "detect_resolution": 64},
        "sam": {"weights": str(make_tiny_sam(tmp_path / "sam")), "points_per_side": 4, "pred_iou_thresh": 0,
                "stability_score_thresh": 0},
        "face_mesh": {"detect_resolution": 512},
    }
    write_real_photos(tmp_path / "in", ["astronaut", "coffee"])
    out = tmp_path / "out"
    cfg = BuildConfig(input=[str(tmp_path / "in")], output=str(out), conditions=NEW, resolution=256, min_size=64,
                      caption_model="none", executor="local", preview=0, report_samples=0, annotator_params=params)
    assert run_build(cfg, log=lambda *_: None)["samples"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"][0]["conditions"] == sorted(NEW, key=condition_sort_key)  # members: after the nine, by name
    assert list(manifest["licences"]) == NEW
    with tarfile.open(out / manifest["shards"][0]["name"]) as tar:
        names = tar.getnames()
        keys = sorted({n.split(".")[0] for n in names})
        for key in keys:
            for cond in NEW:
                image = Image.open(tar.extractfile(f"{key}.{cond}.png"))
                assert image.size == (256, 256) and image.mode == REGISTRY[cond].mode, cond
            meta = json.loads(tar.extractfile(f"{key}.json").read())
            assert set(meta["conditions"]) == set(NEW)
            assert all(meta["conditions"][c]["licence"] for c in NEW)
        faces = sorted(json.loads(tar.extractfile(f"{k}.json").read())["conditions"]["face_mesh"]["params"]["faces"]
                       for k in keys)
    assert faces == [0, 1], "the real face model finds the astronaut's face and none in the coffee"
