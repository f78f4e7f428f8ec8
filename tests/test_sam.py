"""The `sam` condition (stages/annotators/sam.py) on a tiny SAM with random weights built
here from a config and saved locally (no download). Random weights check plumbing: shapes,
formats, determinism, batching, precision and the filter / NMS / drawing logic (with a
decoder that returns known masks) -- never the quality of real SAM masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import stages.annotators.sam as sam_module  # registers "sam" (not yet in the package __init__)
from stages.annotators import REGISTRY, AnnotatorError, MissingWeightsError, create

IMAGE_SIZE = 128  # the tiny model's input (SAM's is 1024): 8 x 8 patches of 16, 32 x 32 low-res masks


def make_tiny_sam(folder):
    """A 2-layer, 32-wide SAM and a processor for 128 px inputs. Weights re-drawn at ~2/sqrt(fan_in):
    transformers' own init (vision std 1e-10) gives near-constant logits, hence no masks."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(0)
    config = SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
                           patch_size=16, output_channels=32, window_size=4, global_attn_indexes=[1], mlp_dim=64,
                           num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=IMAGE_SIZE, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32))
    model = SamModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0, 2 / np.sqrt(param[0].numel()))
    low = IMAGE_SIZE // 4
    processor = SamProcessor(SamImageProcessor(
        size={"longest_edge": IMAGE_SIZE}, pad_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low}))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    return str(make_tiny_sam(tmp_path_factory.mktemp("tiny-sam")))


def photo(height, width, seed=0):
    import skimage.data

    rng = np.random.default_rng(seed)
    base = np.asarray(skimage.data.astronaut())
    top, left = rng.integers(0, base.shape[0] - height), rng.integers(0, base.shape[1] - width)
    return np.ascontiguousarray(base[top:top + height, left:left + width])


def annotator(weights, **params):
    # filters off and NMS at IoU 1 so random weights leave many masks (the defaults filter them all)
    settings = dict(weights=weights, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0,
                    crops_nms_thresh=1.0)
    return create(["sam"], {"sam": {**settings, **params}})["sam"]


def regions(map_: np.ndarray) -> np.ndarray:
    """Each pixel's region id (its colour's rank): maps with the same layout give equal ids up
    to renaming, checked by `same_layout`."""
    return np.unique(map_.reshape(-1, 3), axis=0, return_inverse=True)[1].reshape(map_.shape[:2])


def same_layout(a: np.ndarray, b: np.ndarray) -> bool:
    """The same partition of the pixels: colour a <-> colour b is one-to-one."""
    ra, rb = regions(a).ravel(), regions(b).ravel()
    pairs = len(np.unique(np.stack([ra, rb], 1), axis=0))
    return pairs == len(np.unique(ra)) == len(np.unique(rb))


def test_registered_with_licences():
    cls = REGISTRY["sam"]
    assert cls is sam_module.SegmentAnything and cls.mode == "RGB" and cls.uses_model
    assert cls.code_licence == "Apache-2.0" and cls.weights_licence == "Apache-2.0"
    assert cls.weights_source == "https://huggingface.co/nielsr/slimsam-50-uniform"
    assert cls().weights_setting() == "nielsr/slimsam-50-uniform"


def test_map_has_the_image_size_and_mode(tiny_sam):
    image = photo(150, 230)  # non-square, neither side the model's input size
    sam = annotator(tiny_sam)
    map_, used = sam(image, np.random.default_rng(0))
    assert map_.shape == (150, 230, 3) and map_.dtype == np.uint8
    assert Image.fromarray(map_).mode == "RGB"
    assert used["masks"] > 1
    colours = np.unique(map_.reshape(-1, 3), axis=0)
    assert 1 < len(colours) <= used["masks"] + 1  # one colour a mask (+ black where none covers)


def test_same_seed_same_map_across_workers(tiny_sam):
    image = photo(120, 160, seed=1)
    first = annotator(tiny_sam)
    a, used_a = first(image, np.random.default_rng(7))
    b, used_b = first(image, np.random.default_rng(7))
    c, used_c = annotator(tiny_sam)(image, np.random.default_rng(7))  # a fresh worker's setup(): a rebuild
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert used_a == used_b == used_c


def test_other_seed_changes_colours_not_layout(tiny_sam):
    image = photo(120, 160, seed=2)
    sam = annotator(tiny_sam)
    a, used_a = sam(image, np.random.default_rng(1))
    b, used_b = sam(image, np.random.default_rng(2))
    assert used_a == used_b
    assert not np.array_equal(a, b)
    assert same_layout(a, b)
    assert len(np.unique(regions(a))) > 2
    shifted = np.roll(b, 5, axis=1)  # the check can fail: a different layout is caught
    assert not same_layout(a, shifted)


def test_recorded_params(tiny_sam):
    sam = create(["sam"], {"sam": {"weights": tiny_sam, "points_per_side": 3, "pred_iou_thresh": 0.5,
                                   "stability_score_thresh": 0.25, "min_mask_area": 9}})["sam"]
    params = sam.describe({"masks": 4})["params"]
    assert params["weights"] == tiny_sam and params["masks"] == 4
    assert (params["points_per_side"], params["pred_iou_thresh"], params["stability_score_thresh"],
            params["min_mask_area"]) == (3, 0.5, 0.25, 9)
    defaults = sam_module.SegmentAnything().params
    assert (defaults["points_per_side"], defaults["pred_iou_thresh"], defaults["stability_score_thresh"],
            defaults["min_mask_area"], defaults["crops_nms_thresh"]) == (32, 0.88, 0.95, 0, 0.7)
    for bad in ({"points_per_side": 0}, {"pred_iou_thresh": 1.5}, {"min_mask_area": -1},
                {"stability_score_thresh": "high"}, {"points_per_side": True}):
        with pytest.raises(AnnotatorError):
            create(["sam"], {"sam": {"weights": tiny_sam, **bad}})


def test_batch_equals_single_calls(tiny_sam):
    images = [photo(150, 230, seed=3), photo(128, 128, seed=4), photo(200, 90, seed=5)]
    sam = annotator(tiny_sam)
    singles = [sam(image, np.random.default_rng(10 + i)) for i, image in enumerate(images)]
    for cpu_batch in (None, 2):  # whole batch in one encoder pass, and chunks of 2 + 1
        sam.cpu_batch = cpu_batch
        batched = sam.annotate_batch(images, [np.random.default_rng(10 + i) for i in range(len(images))])
        for (map_b, used_b), (map_s, used_s), image in zip(batched, singles, images):
            assert map_b.shape == image.shape and used_b == used_s
            assert np.abs(map_b.astype(int) - map_s.astype(int)).max() <= 1
    assert not np.array_equal(singles[0][0][:128, :128], singles[1][0])  # the images did differ


def test_bf16_run(tiny_sam):
    import torch

    sam = annotator(tiny_sam)
    sam.set_precision("bf16")
    sam.setup()
    assert sam.model.dtype == torch.bfloat16
    map_, used = sam(photo(100, 140, seed=6), np.random.default_rng(0))
    assert map_.shape == (100, 140, 3) and map_.dtype == np.uint8 and isinstance(used["masks"], int)
    maps = sam.annotate_batch([photo(100, 140, seed=6), photo(64, 64, seed=7)],
                              [np.random.default_rng(0), np.random.default_rng(1)])
    assert [m.shape for m, _ in maps] == [(100, 140, 3), (64, 64, 3)]


def test_missing_weights_names_the_setting(tmp_path):
    sam = create(["sam"], {"sam": {"weights": str(tmp_path / "no-sam")}})["sam"]
    with pytest.raises(MissingWeightsError, match=r"annotator_params\.sam\.weights"):
        sam.check_weights()
    with pytest.raises(MissingWeightsError, match="sam"):
        sam.setup()


def test_known_masks_filtered_and_drawn_largest_first(tiny_sam, monkeypatch):
    """The decoder swapped for one returning known low-res logits (32 x 32 for a 128 px input;
    the 256 x 192 image fills 32 x 24 of them, one low-res pixel = 8 x 8 image pixels):
    a big and a small rectangle survive; a near-duplicate of the big one (NMS), a low-IoU one,
    an unstable one and one under min_mask_area are dropped. The small one scores higher
    than the big one, so only an area order draws it on top."""
    import torch

    def rect(top, left, bottom, right, inside=10.0):
        logits = torch.full((32, 32), -10.0)
        logits[top:bottom, left:right] = inside
        return logits

    known = [  # (logits, predicted IoU)
        (rect(2, 2, 20, 28), 0.95),             # big: image rows 16-160, cols 16-224
        (rect(8, 10, 14, 18), 0.99),            # small, inside big: rows 64-112, cols 80-144
        (rect(3, 2, 20, 28), 0.94),             # the big one less a row: box IoU 0.94 > 0.7, lower score
        (rect(0, 24, 6, 30), 0.50),             # IoU below pred_iou_thresh
        (rect(16, 2, 22, 10, inside=0.5), 0.99),  # logits 0.5: stability score 0
        (rect(21, 29, 22, 30), 0.99),           # 8 x 8 = 64 pixels < min_mask_area
    ]
    calls = []

    def fake_decode(embedding, points):
        calls.append(len(points))
        return torch.stack([m for m, _ in known]), torch.tensor([s for _, s in known])

    sam = create(["sam"], {"sam": {"weights": tiny_sam, "points_per_side": 2, "points_per_batch": 3,
                                   "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95,
                                   "min_mask_area": 100, "crops_nms_thresh": 0.7}})["sam"]
    sam.setup()
    monkeypatch.setattr(sam, "decode", fake_decode)
    image = photo(192, 256, seed=8)
    map_, used = sam(image, np.random.default_rng(42))
    assert calls == [3, 1]  # 4 points, 3 a batch: duplicates across batches are NMS'd too

    draws = np.random.default_rng(42)
    big, small = draws.integers(0, 255, 3).astype(np.uint8), draws.integers(0, 255, 3).astype(np.uint8)
    expected = np.zeros((192, 256, 3), np.uint8)
    expected[16:160, 16:224] = big
    expected[64:112, 80:144] = small
    assert used == {"masks": 2}
    # exact but for a few pixels at each corner, rounded by the bilinear upscaling of the logits
    differ = np.any(map_ != expected, axis=2)
    near_corner = np.zeros_like(differ)
    for y, x in [(16, 16), (16, 223), (159, 16), (159, 223), (64, 80), (64, 143), (111, 80), (111, 143)]:
        near_corner[y - 3:y + 4, x - 3:x + 4] = True
    assert differ.sum() <= 8 * 6 and not (differ & ~near_corner).any()
    assert len(np.unique(map_.reshape(-1, 3), axis=0)) == 3  # two colours and black

    # drawn by score instead, the big mask would hide the small one: the order is checked
    assert not np.array_equal(map_[64:112, 80:144], np.broadcast_to(big, (48, 64, 3)))
