"""A training run that dies at the worst moment, diverges, or reads bad shards (issue 23):
checkpoints are whole or skipped, a resume is exact (also under gradient accumulation
and DDP), a non-finite loss stops the run before anything is saved after it, and bad
samples are counted. Tiny random-weight SD base on the CPU: mechanics, not quality."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import config, setup  # noqa: F401  (the module's tiny base and shards)
from train.trainer import TrainError, train

REPO = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda *_: None)


def _weights(result) -> dict[str, torch.Tensor]:
    return result["models"]["controlnet"].state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _killed(cfg, point: str) -> subprocess.CompletedProcess:
    """The run in a child process that SIGKILLs itself at `point` (tests/train_killed.py)."""
    path = Path(cfg.output_dir).parent / f"{Path(cfg.output_dir).name}.json"
    path.write_text(json.dumps(cfg.model_dump()))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "train_killed.py"), str(path), point], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, f"the child was to die by SIGKILL: rc {done.returncode}\n{done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):  # noqa: F811
    """6 uninterrupted steps, checkpoints every 2: what every interrupted run must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return train(config(setup, out, max_train_steps=6, checkpointing_steps=2), **QUIET)


def test_a_kill_while_saving_leaves_no_checkpoint_under_its_name_and_the_resume_is_exact(setup, straight, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    _killed(config(setup, out, max_train_steps=6, checkpointing_steps=2), "save:4")
    assert (out / "checkpoint-2" / "controlforge_state.json").is_file()
    assert not (out / "checkpoint-4").exists(), "the half-written checkpoint is not under its real name"
    lines: list[str] = []
    resumed = train(config(setup, out, max_train_steps=6, checkpointing_steps=2, resume="latest"), log=lines.append)
    assert "resumed from" in " ".join(lines) and "checkpoint-2 at step 2" in " ".join(lines)
    assert resumed["losses"] == straight["losses"][2:]
    assert _same(_weights(resumed), _weights(straight)), "bit for bit, as an uninterrupted run"
    assert not list(out.glob("*.partial")), "the partial folder was replaced by the resumed run's save"


def test_a_truncated_weight_file_is_named_moved_aside_and_the_previous_checkpoint_resumes(setup, straight, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train(config(setup, out, max_train_steps=4, checkpointing_steps=2), **QUIET)
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    lines: list[str] = []
    resumed = train(config(setup, out, max_train_steps=6, checkpointing_steps=2, resume="latest"), log=lines.append)
    said = " ".join(lines)
    assert "skipping incomplete checkpoint checkpoint-4: model.safetensors is" in said
    assert (out / "checkpoint-4.incomplete" / "model.safetensors").is_file(), "kept aside, not deleted"
    assert "checkpoint-2 at step 2" in said
    assert resumed["losses"] == straight["losses"][2:] and _same(_weights(resumed), _weights(straight))
    with pytest.raises(TrainError, match="incomplete checkpoint"):
        train(config(setup, out, max_train_steps=6, resume=str(out / "checkpoint-4.incomplete")), **QUIET)


def test_old_checkpoints_go_only_after_the_new_one_is_whole(setup, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    _killed(config(setup, out, max_train_steps=6, checkpointing_steps=1, checkpoints_total_limit=2), "save:3")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3.partial"]


def test_resume_is_exact_under_gradient_accumulation_killed_mid_accumulation(setup, tmp_path):  # noqa: F811
    accumulate = dict(max_train_steps=4, checkpointing_steps=2, gradient_accumulation_steps=4)
    straight = train(config(setup, tmp_path / "straight", **accumulate), **QUIET)
    out = tmp_path / "run"
    _killed(config(setup, out, **accumulate), "loss:10")  # micro-batch 2 of step 3
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = train(config(setup, out, resume="latest", **accumulate), **QUIET)
    assert resumed["global_step"] == 4 and len(straight["losses"]) == 16
    assert resumed["losses"] == straight["losses"][8:], "the same micro-batches, from the checkpoint's position"
    assert _same(_weights(resumed), _weights(straight))


def _torchrun(setup, out: Path, *flags: str) -> None:  # noqa: F811
    from test_train import _distributed_args

    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "pipeline.cli", "train",
                           *_distributed_args(setup, out), "--checkpointing-steps", "2", *flags],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


def test_resume_is_exact_under_ddp_with_two_processes(setup, tmp_path):  # noqa: F811
    """torchrun, gloo, CPU: each rank's prompt-dropout generator must come back as its own."""
    _torchrun(setup, tmp_path / "straight", "--max-train-steps", "6")
    _torchrun(setup, tmp_path / "run", "--max-train-steps", "2")
    _torchrun(setup, tmp_path / "run", "--max-train-steps", "6", "--resume", "latest")
    states = [json.loads((tmp_path / name / "train_state.json").read_text()) for name in ("straight", "run")]
    assert states[0]["global_step"] == states[1]["global_step"] == 6
    model = "diffusion_pytorch_model.safetensors"
    assert _same(load_file(tmp_path / "straight" / model), load_file(tmp_path / "run" / model)), "bit for bit"


def test_a_diverging_loss_stops_at_the_first_non_finite_step_and_saves_nothing_after(setup, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    with pytest.raises(TrainError) as stop:
        train(config(setup, out, max_train_steps=30, checkpointing_steps=1, learning_rate=1e12, max_grad_norm=1e30),
              **QUIET)
    message = str(stop.value)
    step = int(message.split(" at step ")[1].split(":")[0])
    assert ("the loss is" in message or "the gradient norm is" in message) and ("nan" in message or "inf" in message)
    assert 1 < step < 30, message
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved == list(range(1, step)), "every step before the bad one, none after"
    for path in out.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())
    assert not (out / "train_state.json").exists(), "no final model from a diverged run"
    assert f"checkpoint-{step - 1}" in message


def _damaged_shards(setup, folder: Path) -> tuple[Path, Path]:  # noqa: F811
    """A copy of the build's shards: one cut short mid-member, one with a corrupt JPEG."""
    root, _ = setup
    shutil.copytree(root / "shards" / "shards", folder)
    tars = sorted(folder.glob("*.tar"))
    cut, corrupt = tars[0], tars[1]
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * 0.6)])
    with tarfile.open(corrupt) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(corrupt, "w") as tar:
        for member, data in members:
            if member.name.endswith(".jpg") and not any(m.name.endswith(".jpg") and m.name < member.name
                                                         for m, _ in members):
                data = b"\xff\xd8 not a picture" + data[:10]
                member.size = len(data)
            tar.addfile(member, __import__("io").BytesIO(data))
    return cut, corrupt


def test_bad_samples_are_counted_per_shard_named_once_and_reported(setup, tmp_path):  # noqa: F811
    cut, corrupt = _damaged_shards(setup, tmp_path / "shards")
    lines: list[str] = []
    out = tmp_path / "run"
    result = train(config(setup, out, shards=[str(tmp_path / "shards")], max_train_steps=12, max_bad_fraction=0.5,
                          dataloader_num_workers=2), log=lines.append)
    per_shard = result["bad_samples"]["per_shard"]
    assert per_shard.get(str(cut), 0) >= 1 and per_shard.get(str(corrupt), 0) >= 1, per_shard
    assert result["bad_samples"]["bad"] == sum(per_shard.values()) > 0
    for shard in (cut, corrupt):
        assert sum(str(shard) in line and "skipping unreadable" in line for line in lines) == 1, "named once"
    assert any(line.startswith("bad samples: ") for line in lines), "in the final summary"
    state = json.loads((out / "train_state.json").read_text())
    assert state["bad_samples"]["per_shard"] == per_shard and state["bad_samples"]["read"] >= 12 * 2


def test_more_bad_samples_than_the_limit_stop_the_run_clearly(setup, tmp_path):  # noqa: F811
    _damaged_shards(setup, tmp_path / "shards")
    with pytest.raises(TrainError, match=r"too many bad samples: \d+ bad of \d+ samples read .* --max-bad-fraction"):
        train(config(setup, tmp_path / "run", shards=[str(tmp_path / "shards")], max_train_steps=200,
                     max_bad_fraction=0.01), **QUIET)


def test_a_wrong_condition_is_named_before_any_step(setup, tmp_path):  # noqa: F811
    with pytest.raises(TrainError, match=r"has no seg\.png \(it has: canny\); set --condition"):
        train(config(setup, tmp_path / "run", condition="seg"), **QUIET)


def test_a_full_disk_while_saving_is_one_line_exit_3_and_resume_latest_goes_on(setup, straight, tmp_path, capsys,  # noqa: F811
                                                                                monkeypatch):
    import errno

    from pipeline.cli import main
    from test_train import _distributed_args

    out = tmp_path / "run"
    args = ["train", *_distributed_args(setup, out), "--max-train-steps", "6", "--checkpointing-steps", "2",
            "--learning-rate", "1e-3", "--train-batch-size", "2"]
    real_save = torch.save

    def save(obj, f, *a, **k):  # the disk fills up while checkpoint-4 is written
        if "checkpoint-4" in str(f) and str(f).endswith("optimizer.bin"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    line = err[-1]
    assert line.startswith("error: disk full: no space left on device at ") and "checkpoint-4.partial/optimizer.bin" in line
    assert "free there now" in line and "the newest complete checkpoint is checkpoint-2" in line
    assert line.endswith("rerun the same command with --resume latest")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4.partial"]
    monkeypatch.setattr(torch, "save", real_save)
    assert main([*args, "--resume", "latest"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    resumed = load_file(out / "diffusion_pytorch_model.safetensors")
    assert _same(resumed, {k: v for k, v in _weights(straight).items()}), "the same weights as an uninterrupted run"
