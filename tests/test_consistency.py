"""Consistency fine-tuning (ControlNet++): the differentiable edge map, the one-step clean
estimate, and the trainer's loss term (tiny random-weight SD base: plumbing and gradients,
not whether it helps; bench/reproduce.py measures that)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def square(size: int = 32) -> torch.Tensor:
    image = torch.zeros(1, 3, size, size)
    image[..., 8:24, 8:24] = 1.0
    return image


def test_soft_edges_lie_on_the_border_and_are_differentiable():
    from train.consistency import soft_edges

    image = square().requires_grad_(True)
    edges = soft_edges(image)[0, 0]
    border = torch.zeros(32, 32, dtype=torch.bool)
    border[5:27, 5:27] = True
    border[11:21, 11:21] = False  # a band of 3 px each side of the square's outline (the blur's reach)
    assert edges.shape == (32, 32) and 0 <= edges.min() and edges.max() <= 1
    assert edges[border].max() > 0.7, "a clear step gives a clear edge"
    assert edges[~border].max() < 0.05, "flat areas give none"
    edges.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_edge_loss_prefers_the_right_edges():
    """Through an identity 'VAE': the loss is lower for the image whose edges the condition has."""
    from train.consistency import edge_loss

    class Identity(torch.nn.Module):
        config = type("C", (), {"scaling_factor": 1.0})()

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def decode(self, latents):
            return type("D", (), {"sample": latents * 2 - 1})()

    from train.consistency import soft_edges

    condition = (soft_edges(square()) > 0.5).float().expand(1, 3, 32, 32)
    shifted = torch.roll(square(), 6, dims=-1)
    assert edge_loss(Identity(), square(), condition) < 0.5 * edge_loss(Identity(), shifted, condition)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_clean_inverts_the_noising(prediction_type):
    from diffusers import DDPMScheduler

    from train.consistency import predicted_clean

    scheduler = DDPMScheduler(prediction_type=prediction_type)
    clean, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 150, 999])
    noisy = scheduler.add_noise(clean, noise, t)
    output = noise if prediction_type == "epsilon" else scheduler.get_velocity(clean, noise, t)
    torch.testing.assert_close(predicted_clean(scheduler, noisy, output, t), clean, atol=2e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import write_synthetic
    from pipeline.build import run_build
    from pipeline.config import BuildConfig
    from tiny_models import make_tiny_sd

    root = tmp_path_factory.mktemp("consistency")
    base = make_tiny_sd(root / "sd")
    write_synthetic(root / "in", 4, size=(64, 64))
    run_build(BuildConfig(input=[str(root / "in")], output=str(root / "out"), resolution=64, min_size=64,
                          caption_model="none", executor="local", preview=0, report_samples=0), log=lambda *_: None)
    return base, root / "out"


def config(tiny, out, **kw):
    from train.config import TrainConfig

    base, shards = tiny
    values = dict(shards=[str(shards)], pretrained_model=str(base), output_dir=str(out), resolution=64,
                  train_batch_size=2, max_train_steps=2, checkpointing_steps=100, num_validation_images=0,
                  dataloader_num_workers=0, shuffle_buffer=4, report_to="none", learning_rate=1e-3, seed=3)
    values.update(kw)
    return TrainConfig(**values)


def test_the_loss_term_reaches_the_controlnet_and_weight_zero_changes_nothing(tiny, tmp_path, monkeypatch):
    """Weight 0 is the plain run, bit for bit (no extra random draws); a positive weight adds
    the term (it is called, once per step, with timesteps below the limit) and changes the
    losses and the trained weights."""
    from train import consistency
    from train.trainer import train

    plain = train(config(tiny, tmp_path / "plain"), log=lambda *_: None)
    zero = train(config(tiny, tmp_path / "zero", consistency_weight=0.0), log=lambda *_: None)
    assert plain["losses"] == zero["losses"]

    drawn = []
    low = consistency.low_timesteps
    monkeypatch.setattr(consistency, "low_timesteps", lambda *a: drawn.append(low(*a)) or drawn[-1])
    weighted = train(config(tiny, tmp_path / "weighted", consistency_weight=5.0, consistency_max_timestep=50),
                     log=lambda *_: None)
    assert len(drawn) == 2 and all(int(t.max()) < 50 for t in drawn)
    assert weighted["losses"] != plain["losses"]
    a = plain["models"]["controlnet"].state_dict()
    b = weighted["models"]["controlnet"].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_the_term_alone_has_a_gradient_on_the_controlnet(tiny):
    """The consistency term's own gradient reaches the ControlNet's condition encoder (through
    the VAE decoder, the UNet and the zero convolutions once they are not zero)."""
    from train import families

    base, _ = tiny
    frozen = families.load(str(base), torch.float32)
    family = frozen.family
    net = family.new_controlnet(frozen, "random")  # zero convolutions would block it at step 0
    from train.config import TrainConfig

    cfg = TrainConfig(pretrained_model=str(base), resolution=64, consistency_weight=1.0)
    latents = torch.randn(2, 4, 16, 16) if frozen.vae_scale_factor == 4 else torch.randn(2, 4, 8, 8)
    hidden, added = family.conditioning(frozen, ["a", "b"], "cpu")
    condition = torch.from_numpy((np.random.default_rng(0).random((2, 3, 64, 64)) > 0.9).astype(np.float32))
    loss = family.consistency_loss(frozen, latents, hidden, added, condition, frozen.denoiser, net, cfg, "cpu")
    loss.backward()
    grads = [p.grad for p in net.controlnet_cond_embedding.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_refused_where_there_is_no_counterpart(tiny, tmp_path):
    from tiny_models import make_tiny_flux
    from train.trainer import TrainError, train

    with pytest.raises(TrainError, match="no differentiable counterpart"):
        train(config(tiny, tmp_path / "a", condition="hed", consistency_weight=1.0), log=lambda *_: None)
    flux = make_tiny_flux(tmp_path / "flux")
    with pytest.raises(TrainError, match="not Flux"):
        train(config(tiny, tmp_path / "b", pretrained_model=str(flux), consistency_weight=1.0), log=lambda *_: None)
