"""The ControlNet trainer on a tiny Stable-Diffusion-shaped model (random weights, built
from configs and saved locally, loaded through from_pretrained like a real one): these
tests check the method's mechanics (zero convolutions, frozen parts, prompt dropout,
exact resume, saved format, streaming), not image quality."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_synthetic
from http_server import serve
from pipeline.build import run_build
from pipeline.config import BuildConfig
from train import families
from train.config import TrainConfig
from train.trainer import PromptDropout, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiny_models import make_tiny_sd

    root = tmp_path_factory.mktemp("train")
    sd = make_tiny_sd(root / "sd")
    write_synthetic(root / "in", 12)
    for i in range(12):
        (root / "in" / f"synth_{i:04d}.txt").write_text(f"a synthetic picture number {i}")
    run_build(BuildConfig(input=[str(root / "in")], output=str(root / "shards"), resolution=64, min_size=64,
                          caption_model="none", samples_per_shard=4, executor="local", preview=0), log=lambda *_: None)
    return root, sd


def load(sd) -> families.Frozen:
    return families.load(str(sd), torch.float32)


def fresh_controlnet(frozen: families.Frozen, init: str = "zero"):
    """What a run starts from: the trainer's call."""
    return frozen.family.make_controlnet(frozen, None, init)


def config(setup, out, **kw) -> TrainConfig:
    root, sd = setup
    base = dict(shards=[str(root / "shards")], pretrained_model=str(sd), output_dir=str(out), resolution=64,
                train_batch_size=2, max_train_steps=3, checkpointing_steps=100, validation_steps=100,
                num_validation_images=0, dataloader_num_workers=0, shuffle_buffer=8, report_to="none",
                learning_rate=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_zero_convolutions_leave_the_unet_unchanged_at_step_0(setup):
    _, sd = setup
    frozen = load(sd)
    unet = frozen.denoiser
    controlnet = fresh_controlnet(frozen)
    torch.manual_seed(0)
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    text = torch.randn(2, 16, 32)
    cond = torch.rand(2, 3, 64, 64)
    down, mid = controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
    assert controlnet.controlnet_cond_embedding.conv_in(cond).abs().sum() > 0, "the condition does reach the ControlNet"
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    assert all(not p.any() for conv in zero_convs for p in conv.parameters()), "zero-initialised"
    assert all(not d.any() for d in down) and not mid.any()
    with torch.no_grad():
        plain = unet(noisy, t, encoder_hidden_states=text).sample
        controlled = unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
    assert torch.equal(plain, controlled)


def test_a_few_steps_move_only_the_controlnet(setup, tmp_path):
    _, sd = setup
    result = train(config(setup, tmp_path / "cn"), log=lambda *_: None)
    assert result["global_step"] == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    frozen = load(sd)
    for name, fresh in (("denoiser", frozen.denoiser), ("vae", frozen.vae), ("text_encoder", frozen.text_encoders[0])):
        trained = result["models"][name].state_dict()
        assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items()), f"{name} changed"
    start = fresh_controlnet(frozen).state_dict()
    after = result["models"]["controlnet"].state_dict()
    moved = [k for k in start if not torch.equal(start[k], after[k])]
    assert len(moved) > len(start) // 2, "the ControlNet's weights moved"
    assert any("zero_conv" in k or "controlnet_down_blocks" in k for k in moved)


def test_prompt_dropout_share_and_determinism():
    prompts = ["a cat"] * 20000
    dropped = PromptDropout(0.5, seed=1)(prompts).count("")
    assert abs(dropped / 20000 - 0.5) < 0.015  # binomial sd 0.0035: a 4-sd band
    assert PromptDropout(0.0, 1)(prompts).count("") == 0 and PromptDropout(1.0, 1)(prompts).count("") == 20000
    a = PromptDropout(0.5, 3)
    a(prompts[:7])
    state = a.state_dict()
    b = PromptDropout(0.5, 99)
    b.load_state_dict(state)
    assert a(prompts[:50]) == b(prompts[:50])


def test_resume_gives_the_same_weights_as_a_straight_run(setup, tmp_path):
    straight = train(config(setup, tmp_path / "straight", max_train_steps=4), log=lambda *_: None)
    train(config(setup, tmp_path / "resumed", max_train_steps=2), log=lambda *_: None)
    resumed = train(config(setup, tmp_path / "resumed", max_train_steps=4, resume="latest"), log=lambda *_: None)
    assert resumed["losses"] == straight["losses"][2:]
    a, b = straight["models"]["controlnet"].state_dict(), resumed["models"]["controlnet"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "bit for bit on CPU"


def test_checkpoints_keep_the_last_k(setup, tmp_path):
    out = tmp_path / "ck"
    train(config(setup, out, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2), log=lambda *_: None)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert json.loads((out / "checkpoint-4" / "controlforge_state.json").read_text())["global_step"] == 4


def test_saved_model_loads_in_the_diffusers_pipeline_and_validation_images(setup, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    _, sd = setup
    out = tmp_path / "final"
    train(config(setup, out, max_train_steps=2, validation_steps=2, num_validation_images=2,
                 validation_inference_steps=2), log=lambda *_: None)
    assert (out / "diffusion_pytorch_model.safetensors").exists() and (out / "validation" / "step-0000002.png").exists()
    controlnet = ControlNetModel.from_pretrained(out)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(sd), controlnet=controlnet, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a picture", Image.new("RGB", (64, 64)), num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_streaming_from_shards_over_http(setup, tmp_path):
    root, _ = setup
    with serve(root / "shards" / "shards") as base:
        result = train(config(setup, tmp_path / "http", shards=[f"{base}/{{00000..00002}}.tar"], max_train_steps=2),
                       log=lambda *_: None)
    assert result["global_step"] == 2


def test_missing_base_model_is_a_clear_error(setup, tmp_path):
    from train.trainer import TrainError

    with pytest.raises(TrainError, match="--pretrained-model"):
        train(config(setup, tmp_path / "x", pretrained_model=str(tmp_path / "no-model")), log=lambda *_: None)


def _distributed_args(setup, out) -> list[str]:
    root, sd = setup
    return ["--shards", str(root / "shards"), "--pretrained-model", str(sd), "--output-dir", str(out),
            "--resolution", "64", "--train-batch-size", "2", "--max-train-steps", "3", "--num-validation-images", "0",
            "--dataloader-num-workers", "0", "--report-to", "none", "--shuffle-buffer", "8"]


def test_two_processes_under_torchrun_and_two_ray_train_workers_agree(setup, tmp_path, ray_session):
    """DDP over gloo on CPU, launched two ways; each run checks every rank holds the same
    weights (train_state.json), and both launchers end with the same weights."""
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "pipeline.cli", "train",
                           *_distributed_args(setup, tmp_path / "ddp")], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "train_state.json").read_text())
    assert ddp["world_size"] == 2 and ddp["global_step"] == 3 and len(set(ddp["rank_checksums"])) == 1

    from common.flags import overrides_from
    from pipeline.config import load_config
    from train.cli import add_arguments
    from train.ray_train import train_on_ray
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--ray", "--num-workers", "2", "--gpus-per-worker", "0",
                              *_distributed_args(setup, tmp_path / "ray")])
    cfg = load_config(None, overrides_from(args), TrainConfig)  # --debug and --config are not config fields
    train_on_ray(cfg, log=lambda *_: None)
    on_ray = json.loads((tmp_path / "ray" / "train_state.json").read_text())
    assert on_ray["world_size"] == 2 and len(set(on_ray["rank_checksums"])) == 1
    assert on_ray["rank_checksums"] == ddp["rank_checksums"], "same seeds and data: same weights either way"


def test_training_from_a_published_datasets_folder(setup, tmp_path):
    """Users of other tools come with diffusers' columns: our own publish output is one such dataset."""
    from pipeline.publish import publish

    root, _ = setup
    folder = publish(str(root / "shards"), to=str(tmp_path / "hf"), val_fraction=0.0, log=lambda *_: None)
    result = train(config(setup, tmp_path / "from-hf", shards=[], dataset=str(folder), max_train_steps=2),
                   log=lambda *_: None)
    assert result["global_step"] == 2 and all(torch.isfinite(torch.tensor(result["losses"])))


def test_ema_weights_are_what_gets_saved(setup, tmp_path):
    from diffusers import ControlNetModel

    _, sd = setup
    raw = train(config(setup, tmp_path / "raw"), log=lambda *_: None)["models"]["controlnet"].state_dict()
    train(config(setup, tmp_path / "ema", use_ema=True, ema_decay=0.9), log=lambda *_: None)
    ema = ControlNetModel.from_pretrained(tmp_path / "ema").state_dict()
    init = fresh_controlnet(load(sd)).state_dict()
    distance = lambda a: sum(float((a[k] - init[k]).float().norm()) for k in init)  # noqa: E731
    assert 0 < distance(ema) < distance(raw), "the EMA lags the raw weights"


def test_validation_tracks_controllability_and_plots_it(setup, tmp_path):
    out = tmp_path / "val"
    train(config(setup, out, max_train_steps=3, validation_steps=1, num_validation_images=2,
                 validation_inference_steps=2), log=lambda *_: None)
    record = json.loads((out / "controllability.json").read_text())
    assert record["metric"] == "f1_2px" and record["steps"] == [1, 2, 3]
    assert all(0.0 <= v <= 1.0 for v in record["values"]) and (out / "controllability.png").exists()


def test_the_best_validated_controlnet_is_kept_beside_the_last(setup, tmp_path, monkeypatch):
    """OUT/best holds the weights that scored best at validation (the first of equal
    scores), loadable as a ControlNet, with the step and score; OUT holds the last."""
    from diffusers import ControlNetModel

    import train.trainer as trainer

    seen: dict[int, dict] = {}
    track = trainer.track_controllability

    def recording(tracker, batch, images, cfg, step, accelerator, log, controlnet=None):
        seen[step] = {k: v.detach().clone() for k, v in accelerator.unwrap_model(controlnet).state_dict().items()}
        return track(tracker, batch, images, cfg, step, accelerator, log, controlnet)

    monkeypatch.setattr(trainer, "track_controllability", recording)
    out = tmp_path / "val"
    train(config(setup, out, max_train_steps=4, validation_steps=1, num_validation_images=2,
                 validation_inference_steps=2, learning_rate=1e-2), log=lambda *_: None)
    record = json.loads((out / "controllability.json").read_text())
    best_step = record["steps"][record["values"].index(max(record["values"]))]
    state = json.loads((out / "best" / "train_state.json").read_text())
    assert state["global_step"] == best_step and state["value"] == max(record["values"])
    best = ControlNetModel.from_pretrained(out / "best").state_dict()
    assert all(torch.equal(best[k], seen[best_step][k]) for k in best)
    last = ControlNetModel.from_pretrained(out).state_dict()
    assert best_step == 4 or not all(torch.equal(best[k], last[k]) for k in best)


def test_a_resumed_run_keeps_its_controllability_record_even_when_killed_between_validation_and_checkpoint(
        setup, tmp_path):
    """Resumed, a run goes on from OUT/controllability.json (the validations up to its
    checkpoint) instead of starting the record, stop signal and best pick again; a run
    killed after validating a step but before its checkpoint validates that step again.
    Either way the record and the best ControlNet are the uninterrupted run's."""
    import shutil

    from diffusers import ControlNetModel

    val = dict(validation_steps=1, num_validation_images=2, validation_inference_steps=2, learning_rate=1e-2)
    train(config(setup, tmp_path / "straight", max_train_steps=4, **val), log=lambda *_: None)
    train(config(setup, tmp_path / "resumed", max_train_steps=2, **val), log=lambda *_: None)
    train(config(setup, tmp_path / "resumed", max_train_steps=4, resume="latest", **val), log=lambda *_: None)
    killed = tmp_path / "killed"  # validated step 3, killed before checkpoint-3 was written
    train(config(setup, killed, max_train_steps=3, checkpointing_steps=2, **val), log=lambda *_: None)
    shutil.rmtree(killed / "checkpoint-3")
    assert json.loads((killed / "controllability.json").read_text())["steps"] == [1, 2, 3]
    train(config(setup, killed, max_train_steps=4, checkpointing_steps=2, resume="latest", **val), log=lambda *_: None)
    straight = json.loads((tmp_path / "straight" / "controllability.json").read_text())
    assert straight["steps"] == [1, 2, 3, 4]
    for out in (tmp_path / "resumed", killed):
        assert json.loads((out / "controllability.json").read_text()) == straight, out.name
        assert json.loads((out / "best" / "train_state.json").read_text()) == json.loads(
            (tmp_path / "straight" / "best" / "train_state.json").read_text()), out.name
        best = ControlNetModel.from_pretrained(out / "best").state_dict()
        reference = ControlNetModel.from_pretrained(tmp_path / "straight" / "best").state_dict()
        assert all(torch.equal(best[k], reference[k]) for k in best), out.name


def test_best_rule_follows_the_metric_direction_and_a_resumed_runs_saved_best(tmp_path):
    from train.metrics import ConvergenceTracker
    from train.validation import _beats_saved_best

    higher, lower = ConvergenceTracker(True), ConvergenceTracker(False)
    for step, value, best_high, best_low in ((1, 0.2, True, True), (2, 0.5, True, False), (3, 0.4, False, False),
                                             (4, 0.1, False, True)):
        higher.add(step, value)
        lower.add(step, value)
        assert higher.last_is_best() == best_high and lower.last_is_best() == best_low, step
    folder = tmp_path / "best"
    assert _beats_saved_best(folder, 5, higher)  # nothing saved yet
    folder.mkdir()
    (folder / "train_state.json").write_text(json.dumps({"global_step": 2, "value": 0.5}))
    assert not _beats_saved_best(folder, 5, higher)  # 0.1 after a resume does not beat the saved 0.5
    (folder / "train_state.json").write_text(json.dumps({"global_step": 9, "value": 0.5}))
    assert _beats_saved_best(folder, 5, higher)  # saved at a later step: another run's


def test_stop_after_convergence_rule():
    from train.metrics import ConvergenceTracker

    tracker = ConvergenceTracker()
    for step, value in zip(range(100, 1100, 100), [0.1, 0.11, 0.1, 0.12, 0.6, 0.62, 0.61, 0.63, 0.6, 0.62]):
        tracker.add(step, value)
        if step < 600:
            assert tracker.converged_at is None, "a jump counts once the next evaluation confirms it"
    assert tracker.converged_at == 500
    assert not tracker.should_stop(600, 200) and tracker.should_stop(700, 200) and not tracker.should_stop(700, None)


def test_checkpoints_hold_a_controlnet_folder_that_loads(setup, tmp_path):
    """Every checkpoint can be sampled directly (`controlforge sample --controlnet .../controlnet`)."""
    from diffusers import ControlNetModel

    out = tmp_path / "ckcn"
    result = train(config(setup, out, max_train_steps=2, checkpointing_steps=1), log=lambda *_: None)
    first = ControlNetModel.from_pretrained(out / "checkpoint-1" / "controlnet").state_dict()
    last = ControlNetModel.from_pretrained(out / "checkpoint-2" / "controlnet").state_dict()
    final = result["models"]["controlnet"].state_dict()
    assert all(torch.equal(last[k], final[k]) for k in final), "the last checkpoint's folder is the final model"
    assert any(not torch.equal(first[k], last[k]) for k in first), "and each checkpoint holds its own step's weights"


def test_random_init_ablation_and_a_condition_encoder_that_matches_the_vae(setup):
    import dataclasses

    from diffusers import AutoencoderKL

    _, sd = setup
    frozen = load(sd)
    assert frozen.vae_scale_factor == 8
    zero_convs = lambda net: [*net.controlnet_down_blocks, net.controlnet_mid_block,  # noqa: E731
                              net.controlnet_cond_embedding.conv_out]
    random = fresh_controlnet(frozen, init="random")
    assert all(conv.weight.abs().sum() > 0 for conv in zero_convs(random)), "the output layers are not zero"
    torch.manual_seed(123)
    again = fresh_controlnet(frozen, init="random")
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(zero_convs(random), zero_convs(again))), \
        "the re-initialisation has its own seed: the ablation is the same whatever the global RNG"
    # a base whose VAE shrinks by 4 (as bench/circles_base): the factor comes from the VAE config's levels
    vae4 = AutoencoderKL(block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8)
    four = fresh_controlnet(dataclasses.replace(frozen, vae=vae4))
    cond = torch.rand(1, 3, 64, 64)
    assert four.controlnet_cond_embedding(cond).shape[-1] == 16 and fresh_controlnet(frozen).controlnet_cond_embedding(
        cond).shape[-1] == 8


def test_validation_on_held_out_shards(setup, tmp_path):
    """--validation-shards: the curve is measured on conditions the ControlNet never trains on."""
    from conftest import write_synthetic

    root, _ = setup
    write_synthetic(tmp_path / "held", 3, start=500)
    run_build(BuildConfig(input=[str(tmp_path / "held")], output=str(tmp_path / "held-shards"), resolution=64,
                          min_size=64, caption_model="none", samples_per_shard=8, executor="local", preview=0),
              log=lambda *_: None)
    out = tmp_path / "valheld"
    train(config(setup, out, max_train_steps=1, validation_steps=1, num_validation_images=3,
                 validation_inference_steps=2, validation_shards=[str(tmp_path / "held-shards")]), log=lambda *_: None)
    grid = __import__("PIL.Image", fromlist=["Image"]).open(out / "validation" / "step-0000001.png")
    assert grid.size == (128, 3 * 64), "three held-out conditions (the training shards' first one has 4 samples)"


def test_cubic_timestep_sampling_favours_high_noise():
    from train.families.sd import sample_timesteps

    torch.manual_seed(0)
    uniform = sample_timesteps("uniform", 20000, 1000, "cpu").float()
    cubic = sample_timesteps("cubic", 20000, 1000, "cpu").float()
    assert uniform.min() >= 0 and uniform.max() <= 999 and cubic.min() >= 0 and cubic.max() <= 999
    assert abs(uniform.mean() - 499.5) < 10 and abs(cubic.mean() - 750) < 10, "E[1 - u^3] = 3/4"
    assert abs((cubic >= 500).float().mean() - 0.5 ** (1 / 3)) < 0.02, "P(t >= T/2) = P(u <= 0.5^(1/3)) = 0.794"


@pytest.mark.parametrize("cores, processes, expected", [
    (1, 1, 0), (2, 1, 0),  # a laptop or this 2-core box: the step needs both cores
    (3, 1, 1), (4, 1, 2), (8, 1, 6), (10, 1, 8), (96, 1, 8),  # cores to spare, at most 8
    (16, 8, 0), (32, 8, 2), (64, 8, 6), (192, 8, 8),  # one process per GPU shares the machine
    (4, 3, 0), (0, 1, 0), (6, 0, 4),  # shares round down; a bad process count counts as 1
])
def test_default_loader_workers_leave_the_step_its_cores(cores, processes, expected):
    from train.data import default_loader_workers

    assert default_loader_workers(cores, processes) == expected


@pytest.fixture
def machine(monkeypatch):
    """Pretend this process may run on `cores` cores among `processes` training processes."""
    from train import data

    for name in data.LOCAL_WORLD_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)

    def pretend(cores: int, processes: int | None = None) -> None:
        monkeypatch.setattr(data, "available_cores", lambda: cores)
        if processes is not None:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))

    return pretend


def test_the_config_default_is_the_machine_rule(machine):
    from train.data import default_loader_workers, loader_workers, local_processes

    assert TrainConfig().dataloader_num_workers is None
    machine(2)
    assert local_processes() == 1
    assert loader_workers(TrainConfig().dataloader_num_workers) == (
        0, "loader workers: 0 (2 cores for 1 process: workers would take CPU from the step; "
           "set --dataloader-num-workers)")
    machine(24, processes=2)  # as torchrun / accelerate launch / ray_train.py set it
    workers, line = loader_workers(TrainConfig().dataloader_num_workers)
    assert workers == default_loader_workers(24, 2) == 8
    assert line.startswith("loader workers: 8 (24 cores for 2 processes: 2 cores per process kept for the step")
    machine(6, processes=1)
    assert loader_workers(None)[0] == 4


def test_an_explicit_worker_count_wins(machine):
    from train.data import loader_workers

    machine(2)
    assert loader_workers(TrainConfig(dataloader_num_workers=3).dataloader_num_workers) == (
        3, "loader workers: 3 (--dataloader-num-workers)")
    machine(64)
    assert loader_workers(TrainConfig(dataloader_num_workers=0).dataloader_num_workers)[0] == 0


def test_worker_count_from_flags_and_yaml(tmp_path):
    import argparse

    from common.config import ConfigError, load_config
    from common.flags import overrides_from
    from train.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def resolve(flags: list[str], yaml_text: str | None = None) -> int | None:
        path = None
        if yaml_text is not None:
            path = tmp_path / "train.yaml"
            path.write_text(yaml_text)
        return load_config(path, overrides_from(parser.parse_args(flags)), model=TrainConfig).dataloader_num_workers

    assert resolve([]) is None
    assert resolve(["--dataloader-num-workers", "0"]) == 0
    assert resolve(["--dataloader-num-workers", "5"]) == 5
    assert resolve([], "dataloader_num_workers: 3\n") == 3
    assert resolve([], "dataloader_num_workers: null\n") is None
    assert resolve(["--dataloader-num-workers", "1"], "dataloader_num_workers: 3\n") == 1
    with pytest.raises(ConfigError, match="dataloader_num_workers"):
        resolve(["--dataloader-num-workers", "-1"])
    with pytest.raises(SystemExit):  # argparse: not an int
        parser.parse_args(["--dataloader-num-workers", "auto"])


def test_a_run_logs_the_workers_it_chose(setup, tmp_path, machine):
    machine(2)
    lines = []
    result = train(config(setup, tmp_path / "auto", dataloader_num_workers=None, max_train_steps=1), log=lines.append)
    assert result["global_step"] == 1
    assert [line for line in lines if line.startswith("loader workers:")] == [
        "loader workers: 0 (2 cores for 1 process: workers would take CPU from the step; set --dataloader-num-workers)"]
