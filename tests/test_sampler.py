"""Sampler guidance modes, ControlNet composition, auto prompts, controllability metrics
and the sudden-convergence detector. Models are tiny with random weights (the
ControlNets' zero convolutions are perturbed so their residuals are not zero): these
check mechanics, not image quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.metrics import edge_f1, miou, normal_angle_error, rmse, ssim, sudden_convergence
from train.sampler import Control, control_residuals, control_weights, sample

SD15_SIZES = [64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8, 8]  # 12 down residuals + mid, at 512 px


def test_guidance_weights_per_mode():
    assert control_weights("paper", SD15_SIZES) == [1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8]
    assert control_weights("paper", [96, 96, 96, 48, 48, 48, 24, 24, 24, 12, 12, 12, 12]) == \
        [1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8], "768 px: same ratios from the actual sizes"
    assert control_weights("paper", [8, 8, 4, 4, 4]) == [1, 1, 2, 2, 2]
    soft = control_weights("lllyasviel", SD15_SIZES)
    assert soft[-1] == 1.0 and soft[0] == pytest.approx(0.825 ** 12) and soft[6] == pytest.approx(0.825 ** 6)
    guess = control_weights("diffusers", SD15_SIZES)
    assert guess[0] == pytest.approx(0.1) and guess[-1] == pytest.approx(1.0)
    assert np.allclose(np.log10(guess), np.linspace(-1, 0, 13))
    assert control_weights("both", SD15_SIZES) == [1.0] * 13
    with pytest.raises(ValueError):
        control_weights("nope", SD15_SIZES)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import make_tiny_sd
    from train import families

    sd = make_tiny_sd(tmp_path_factory.mktemp("sd"))
    frozen = families.load(str(sd), torch.float32)
    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        net = frozen.family.make_controlnet(frozen, None, "zero")
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.02)  # as if trained: zero convolutions no longer zero
        nets.append(net.eval())
    return {"sd": sd, "frozen": frozen, "nets": nets}


def scheduler(frozen):
    """The DDIM scheduler `controlforge sample` draws with."""
    return frozen.family.sampling_scheduler(frozen)


def test_two_controlnets_sum_their_residuals(tiny):
    torch.manual_seed(0)
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 16, 32)
    a = Control(tiny["nets"][0], torch.rand(1, 3, 64, 64), 0.7)
    b = Control(tiny["nets"][1], torch.rand(1, 3, 64, 64), 1.3)
    with torch.no_grad():
        down_a, mid_a = control_residuals([a], x, t, text)
        down_b, mid_b = control_residuals([b], x, t, text)
        down, mid = control_residuals([a, b], x, t, text)
    assert mid_a.abs().sum() > 0 and mid_b.abs().sum() > 0
    assert all(torch.allclose(d, da + db, atol=1e-6) for d, da, db in zip(down, down_a, down_b))
    assert torch.allclose(mid, mid_a + mid_b, atol=1e-6)


@pytest.mark.parametrize("mode", ["paper", "both", "uncond"])
def test_where_the_control_goes(tiny, mode):
    """paper: the unconditional UNet call gets no residuals; both: every call gets them;
    uncond: only the unconditional call gets them."""
    unet = tiny["frozen"].denoiser
    calls = []
    original = unet.forward

    def recording(*args, **kwargs):
        calls.append(kwargs.get("down_block_additional_residuals") is not None)
        return original(*args, **kwargs)

    unet.forward = recording
    try:
        control = Control(tiny["nets"][0], torch.rand(1, 3, 64, 64))
        result = sample(tiny["frozen"], scheduler(tiny["frozen"]), [control], ["a cat"], mode=mode, steps=2, height=64,
                        width=64, generator=torch.Generator().manual_seed(0))
    finally:
        unet.forward = original
    assert len(calls) == 4 and result.images[0].size == (64, 64)
    assert calls == {"paper": [True, False, True, False], "both": [True] * 4, "uncond": [False, True, False, True]}[mode]
    assert result.weights == control_weights(mode, [8, 8, 4, 4, 4])  # tiny UNet: 4 down residuals + mid


def test_without_a_controlnet_the_sampler_draws_what_a_zero_initialised_one_draws(tiny):
    """The base alone (no ControlNet) and a fresh ControlNet (zero convolutions) give the
    same pixels: the base samples a reproduction compares against are the step-0 model."""
    frozen = tiny["frozen"]
    args = dict(prompts=["a cat"], mode="both", steps=3, height=64, width=64)
    base = sample(frozen, scheduler(frozen), [], generator=torch.Generator().manual_seed(3), **args)
    fresh = Control(frozen.family.make_controlnet(frozen, None, "zero"), torch.rand(1, 3, 64, 64))
    step0 = sample(frozen, scheduler(frozen), [fresh], generator=torch.Generator().manual_seed(3), **args)
    assert base.weights == [] and np.array_equal(np.asarray(base.images[0]), np.asarray(step0.images[0]))


def test_metrics_on_known_answers():
    rng = np.random.default_rng(0)
    edges = np.zeros((64, 64), np.uint8)
    edges[20, 10:50] = 255
    edges[10:50, 30] = 255
    assert edge_f1(edges, edges) == 1.0 and edge_f1(edges, np.zeros_like(edges)) == 0.0
    shifted = np.roll(edges, 3, axis=0)
    assert 0.0 < edge_f1(edges, shifted) < 0.8
    nudged = np.roll(edges, 1, axis=0)  # one pixel off: wrong at tolerance 0, right at 2
    assert edge_f1(edges, nudged) < 0.6 and edge_f1(edges, nudged, tolerance=2) == 1.0
    assert edge_f1(edges, shifted, tolerance=2) < edge_f1(edges, shifted, tolerance=3) == 1.0
    soft = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    assert ssim(soft, soft) == pytest.approx(1.0) and ssim(soft, 255 - soft) < 0.1
    depth = rng.integers(0, 255, (32, 32), dtype=np.uint8)
    assert rmse(depth, depth) == 0.0 and rmse(np.zeros_like(depth), np.full_like(depth, 255)) == pytest.approx(1.0)
    from stages.annotators.seg import colorize

    ids = np.zeros((32, 32), np.int64)
    ids[:, 16:] = 2
    assert miou(colorize(ids), colorize(ids)) == 1.0
    other = ids.copy()
    other[:, 8:16] = 2  # a quarter of class 0 becomes class 2
    assert miou(colorize(ids), colorize(other)) == pytest.approx((0.5 + 16 / 24) / 2)
    up = np.zeros((8, 8, 3), np.uint8) + np.array([128, 128, 255], np.uint8)
    assert normal_angle_error(up, up) == pytest.approx(0.0, abs=1e-6)
    side = np.zeros((8, 8, 3), np.uint8) + np.array([255, 128, 128], np.uint8)
    assert normal_angle_error(up, side) == pytest.approx(90.0, abs=1.0)


def test_sudden_convergence_is_found_in_a_jump_and_not_in_flat_or_smooth_curves():
    rng = np.random.default_rng(0)
    steps = list(range(0, 3000, 100))
    jump = [0.1 + rng.normal(0, 0.01) if s < 1700 else 0.6 + rng.normal(0, 0.01) for s in steps]
    assert sudden_convergence(steps, jump) == 1700
    flat = [0.3 + rng.normal(0, 0.01) for _ in steps]
    assert sudden_convergence(steps, flat) is None
    assert sudden_convergence(steps, np.linspace(0, 1, len(steps))) is None, "gradual learning is not sudden"
    spike = [0.1] * len(steps)
    spike[10] = 0.9
    assert sudden_convergence(steps, spike) is None, "a one-off spike is not convergence"
    errors = [1.0 - v for v in jump]  # a lower-is-better metric
    assert sudden_convergence(steps, errors, higher_is_better=False) == 1700


def test_auto_prompt_runs_the_two_pass_recipe_with_blip(tiny, tiny_blip):
    from stages.models.captioner import BlipCaptioner
    from train.sample_cli import resolve_prompt

    captioner = BlipCaptioner(str(tiny_blip), max_new_tokens=5, num_beams=1)
    passes = []

    def first_pass(prompt):
        passes.append(prompt)
        control = Control(tiny["nets"][0], torch.rand(1, 3, 64, 64))
        return sample(tiny["frozen"], scheduler(tiny["frozen"]), [control], [prompt], steps=2, height=64, width=64,
                      generator=torch.Generator().manual_seed(0)).images[0]

    auto = resolve_prompt("auto", None, None, first_pass, captioner)
    assert passes == ["a professional, detailed, high-quality image"], "first pass uses the default prompt"
    draft = first_pass(passes[0])
    assert auto["prompt"] == captioner([np.asarray(draft)])[0] and auto["prompt"].strip()
    assert auto["prompt_source"].startswith("two-pass")
    assert resolve_prompt("auto", None, "a caption from the shard", first_pass, captioner)["prompt"] == \
        "a caption from the shard"
    assert resolve_prompt("none", None, "x", first_pass, None)["prompt"] == ""
    assert resolve_prompt("user", "my words", None, first_pass, None)["prompt"] == "my words"


def test_sample_and_eval_commands_end_to_end(tiny, tmp_path):
    import json

    from conftest import write_synthetic
    from pipeline.build import run_build
    from pipeline.cli import main
    from pipeline.config import BuildConfig

    tiny["nets"][0].save_pretrained(tmp_path / "cn")
    write_synthetic(tmp_path / "in", 2)
    for i in range(2):
        (tmp_path / "in" / f"synth_{i:04d}.txt").write_text(f"shapes number {i}")
    run_build(BuildConfig(input=[str(tmp_path / "in")], output=str(tmp_path / "b"), resolution=64, min_size=64,
                          caption_model="none", executor="local", preview=0), log=lambda *_: None)
    code = main(["sample", "--pretrained-model", str(tiny["sd"]), "--controlnet", str(tmp_path / "cn"),
                 "--shard", str(tmp_path / "b" / "shards" / "00000.tar"), "--num", "2", "--steps", "2",
                 "--resolution", "64", "--prompt-mode", "auto", "--output", str(tmp_path / "s")])
    assert code == 0
    records = [json.loads((tmp_path / "s" / f"{i:04d}.json").read_text()) for i in range(2)]
    assert {r["prompt"] for r in records} == {"shapes number 0", "shapes number 1"}, "auto uses source captions"
    assert records[0]["guidance_mode"] == "paper" and records[0]["seed"] == 0 and records[1]["seed"] == 1
    assert (tmp_path / "s" / "contact_sheet.png").exists()
    assert main(["eval", str(tmp_path / "s"), "--condition", "canny"]) == 0
    base_args = ["sample", "--pretrained-model", str(tiny["sd"]), "--num", "2", "--steps", "2", "--resolution", "64",
                 "--prompt-mode", "auto", "--output", str(tmp_path / "base")]
    assert main(base_args) == 2, "the base alone needs conditions to record (--shard or --image)"
    assert main([*base_args, "--shard", str(tmp_path / "b" / "shards" / "00000.tar")]) == 0
    base_records = [json.loads((tmp_path / "base" / f"{i:04d}.json").read_text()) for i in range(2)]
    assert [r["prompt"] for r in base_records] == [r["prompt"] for r in records] and base_records[0]["controlnets"] == []
    assert main(["eval", str(tmp_path / "base"), "--condition", "canny", "--shuffled"]) == 0
    report = json.loads((tmp_path / "base" / "report.json").read_text())
    assert 0.0 <= report["shuffled_mean"] <= 1.0 and report["metric"] == "f1_2px"
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["metric"] == "f1_2px" and len(report["samples"]) == 2 and 0.0 <= report["mean"] <= 1.0


def test_two_controlnets_composed_from_one_shard_and_each_condition_scored(tiny, tmp_path):
    """--shard with a --condition per --controlnet: each sample gets both maps (saved by name
    beside the first), and eval --condition NAME compares with that one's map."""
    import json

    import numpy as np
    from PIL import Image

    from conftest import write_synthetic
    from pipeline.build import run_build
    from pipeline.cli import main
    from pipeline.config import BuildConfig
    from train.metrics import colour_error

    for i, net in enumerate(tiny["nets"]):
        net.save_pretrained(tmp_path / f"cn{i}")
    write_synthetic(tmp_path / "in", 2)
    run_build(BuildConfig(input=[str(tmp_path / "in")], output=str(tmp_path / "b"), resolution=64, min_size=64,
                          caption_model="none", executor="local", preview=0, conditions=["canny", "color_grid"]),
              log=lambda *_: None)
    shard = str(tmp_path / "b" / "shards" / "00000.tar")
    args = ["sample", "--pretrained-model", str(tiny["sd"]), "--controlnet", str(tmp_path / "cn0"),
            "--controlnet", str(tmp_path / "cn1"), "--shard", shard, "--num", "2", "--steps", "2", "--resolution",
            "64", "--prompt-mode", "default", "--output", str(tmp_path / "s")]
    assert main([*args, "--condition", "canny"]) == 2, "two ControlNets need two conditions"
    assert main([*args, "--condition", "canny", "--condition", "color_grid"]) == 0
    out = tmp_path / "s"
    record = json.loads((out / "0000.json").read_text())
    assert record["conditions"] == ["canny", "color_grid"] and record["condition"] == "canny"
    canny, grid = (np.asarray(Image.open(out / f"0000_condition_{c}.png")) for c in ("canny", "color_grid"))
    assert np.array_equal(np.asarray(Image.open(out / "0000_condition.png")), canny)
    assert not np.array_equal(canny, grid)
    assert main(["eval", str(out), "--condition", "color_grid"]) == 0
    report = json.loads((out / "report.json").read_text())
    from stages.annotators import create

    again, _ = create(["color_grid"])["color_grid"](np.asarray(Image.open(out / "0000.png").convert("RGB")),
                                                     np.random.default_rng(0))
    assert report["metric"] == "colour_error" and report["higher_is_better"] is False
    assert report["samples"][0]["colour_error"] == pytest.approx(colour_error(grid, again))


def test_keypoint_distance_and_clip_score(tmp_path):
    from PIL import Image

    from tiny_models import make_tiny_clip
    from train.metrics import clip_score, keypoint_distance

    person = [[0.5, 0.2], [0.5, 0.3], None, [0.4, 0.5]] + [None] * 14
    moved = [[p[0] + 0.1, p[1]] if p else None for p in person]
    far = [[0.9, 0.9]] * 18
    assert keypoint_distance([person], [person]) == 0.0
    assert keypoint_distance([person], [far, moved]) == pytest.approx(0.1), "matched to the closest person"
    assert keypoint_distance([person], []) is None and keypoint_distance([], [person]) is None

    model = make_tiny_clip(tmp_path / "clip")  # random weights: checks plumbing and range, not alignment
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8)) for i in range(2)]
    score = clip_score(images, ["a cat", "a dog"], str(model))
    assert 0.0 <= score <= 100.0 and score == clip_score(images, ["a cat", "a dog"], str(model))


def test_a_sample_is_the_same_alone_or_in_a_batch(tiny):
    """Batching is a speed-up only: each sample keeps its own seed's noise (random weights:
    this checks the plumbing, not image quality)."""
    import numpy as np

    from train.sampler import Control, sample

    t = {**tiny, "scheduler": scheduler(tiny["frozen"])}
    conditions = torch.rand(3, 3, 64, 64)
    prompts = ["a red circle", "", "shapes"]

    def draw(indices):
        controls = [Control(t["nets"][0], conditions[indices])]
        return sample(t["frozen"], t["scheduler"], controls, [prompts[i] for i in indices], mode="paper", steps=3,
                      guidance_scale=5.0, height=64, width=64, generator=[torch.Generator().manual_seed(10 + i) for i in indices]).images

    batched = draw([0, 1, 2])
    alone = [draw([i])[0] for i in range(3)]
    for a, b in zip(batched, alone):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 2
    assert not np.array_equal(np.asarray(batched[0]), np.asarray(batched[2])), "different seeds, different samples"
    with pytest.raises(ValueError, match="one per prompt"):
        sample(t["frozen"], t["scheduler"], [], prompts, steps=1, height=64, width=64, generator=[torch.Generator()])


def test_sample_and_eval_settings_come_from_yaml_and_flags(tmp_path):
    """Every SampleConfig / EvalConfig field is a flag and a --config key; a flag beats
    the YAML; list flags repeat (one --controlnet and --image per ControlNet)."""
    import argparse

    from common.config import ConfigError, load_config
    from common.flags import overrides_from
    from train.config import EvalConfig, SampleConfig
    from train.sample_cli import add_eval_arguments, add_sample_arguments

    parser = argparse.ArgumentParser()
    add_sample_arguments(parser)
    (tmp_path / "s.yaml").write_text("controlnet: [a, b]\nimage: [x.png, y.png]\nsteps: 5\nmode: both\n")
    args = parser.parse_args(["--config", str(tmp_path / "s.yaml"), "--steps", "7"])
    assert set(SampleConfig.model_fields) <= set(vars(args))
    cfg = load_config(args.config, overrides_from(args), model=SampleConfig)
    assert cfg.controlnet == ["a", "b"] and cfg.image == ["x.png", "y.png"] and cfg.steps == 7 and cfg.mode == "both"
    assert cfg.guidance_scale == 9.0 and cfg.batch_size == 16 and cfg.prompt_mode == "auto"
    args = parser.parse_args(["--controlnet", "a", "--image", "x", "--controlnet", "b", "--image", "y",
                              "--scale", "0.5", "--scale", "2"])
    cfg = load_config(None, overrides_from(args), model=SampleConfig)
    assert cfg.controlnet == ["a", "b"] and cfg.image == ["x", "y"] and cfg.scale == [0.5, 2.0] and cfg.mode is None
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, overrides_from(parser.parse_args(["--batch-size", "0"])), model=SampleConfig)

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    (tmp_path / "e.yaml").write_text("condition: canny\nshuffled: true\n")
    args = parser.parse_args(["out/s", "--config", str(tmp_path / "e.yaml")])
    assert set(EvalConfig.model_fields) <= set(vars(args))
    cfg = load_config(args.config, overrides_from(args), model=EvalConfig)
    assert cfg.folder == "out/s" and cfg.condition == "canny" and cfg.shuffled and cfg.weights is None
    assert load_config(None, overrides_from(parser.parse_args(["--folder", "f", "--condition", "depth"])),
                       model=EvalConfig).folder == "f"
    with pytest.raises(ConfigError, match="condition"):
        load_config(None, overrides_from(parser.parse_args(["out/s"])), model=EvalConfig)


def test_on_step_sees_every_ddim_step_and_its_clean_latent_prediction(tiny):
    """`on_step` (for probes of where sampling decides something) is called once per step,
    in order, with the scheduler's output; the last step's prev_sample is what is decoded,
    and watching does not change the sample (random weights: plumbing only)."""
    frozen = tiny["frozen"]
    seen = []
    args = dict(prompts=["a cat", "a dog"], mode="paper", steps=4, height=64, width=64)
    watched = sample(frozen, scheduler(frozen), [], generator=torch.Generator().manual_seed(5),
                     on_step=lambda i, t, out: seen.append((i, int(t), out.pred_original_sample.shape,
                                                             out.prev_sample.clone())), **args)
    plain = sample(frozen, scheduler(frozen), [], generator=torch.Generator().manual_seed(5), **args)
    sched = scheduler(frozen)
    sched.set_timesteps(4)
    assert [(i, t) for i, t, *_ in seen] == list(enumerate(int(t) for t in sched.timesteps))
    assert all(shape == seen[-1][3].shape and shape[0] == 2 for *_, shape, _ in seen)
    with torch.no_grad():
        decoded = frozen.vae.decode(seen[-1][3] / frozen.vae.config.scaling_factor, return_dict=False)[0]
    first = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(first, np.asarray(watched.images[0]))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(watched.images, plain.images))
