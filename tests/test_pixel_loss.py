"""The decoded-image loss: the one-step estimate inverts the noising, only low timesteps count, a perfect
prediction costs nothing, and training adds it to the latent objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from training_helpers import circle_example, losses, tiny_config, write_data_folder

from controlnext.errors import ControlNextError
from controlnext.training.base import load_training_base
from controlnext.training.pixel_loss import clean_latents, decode, image_distance, pixel_loss
from controlnext.training.trainer import Trainer

TIMESTEPS = torch.tensor([0, 120, 480, 999])


def targets(scheduler, latents, noise, timesteps):
    return {"epsilon": noise, "v_prediction": scheduler.get_velocity(latents, noise, timesteps), "sample": latents}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_one_step_estimate_inverts_the_noising(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    noisy = scheduler.add_noise(latents, noise, TIMESTEPS)
    prediction = targets(scheduler, latents, noise, TIMESTEPS)[prediction_type]
    estimate = clean_latents(scheduler, noisy, prediction, TIMESTEPS, prediction_type)
    assert torch.allclose(estimate, latents, atol=2e-3 if prediction_type == "epsilon" else 1e-5)


def test_flow_matching_prediction_is_refused():
    with pytest.raises(ControlNextError, match="drop the flag"):
        clean_latents(DDPMScheduler(), torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([3]),
                      "flow_matching")


def test_image_distance_counts_pixels_and_their_edges():
    image = torch.zeros(1, 3, 16, 16)
    image[..., 4:12, 4:12] = 1.0
    assert float(image_distance(image, image)) == 0.0
    brighter = image_distance(image + 0.25, image)  # the same edges: only the pixel term
    assert float(brighter) == pytest.approx(0.25)
    shifted = image_distance(torch.roll(image, 1, dims=-1), image)  # the same mean, edges one pixel off
    pixels_only = (torch.roll(image, 1, dims=-1) - image).abs().mean()
    assert float(shifted) > 1.5 * float(pixels_only)


@pytest.fixture(scope="module")
def base(tiny_base):
    return load_training_base(tiny_base)


def noisy_batch(base, timesteps, cached: bool):
    """A batch of two circles as the data loader or the latent cache gives it, the clean scaled latents, the
    noise and the noisy latents."""
    torch.manual_seed(0)
    pixels = torch.stack([torch.from_numpy(np.asarray(circle_example(i)[0], dtype=np.float32)).permute(2, 0, 1)
                          / 127.5 - 1 for i in range(2)])  # (2, 3, 64, 64)
    with torch.no_grad():
        mean = base.vae.encode(pixels).latent_dist.mean  # (2, 4, 8, 8)
    latents = mean * base.vae.config.scaling_factor
    batch = {"latent_mean": mean} if cached else {"pixel_values": pixels}
    noise = torch.randn(latents.shape)
    return batch, latents, noise, base.noise_scheduler.add_noise(latents, noise, timesteps)


@pytest.mark.parametrize("cached", [False, True], ids=["pixels", "latent cache"])
def test_only_examples_below_the_limit_count(base, cached):
    timesteps = torch.tensor([50, 700])
    batch, _, noise, noisy = noisy_batch(base, timesteps, cached)
    prediction = (noise + 0.3 * torch.randn(noise.shape)).requires_grad_()
    loss = pixel_loss(base.vae, base.noise_scheduler, batch, noisy, prediction, timesteps, "epsilon", 400)
    loss.backward()
    assert float(loss.detach()) > 0
    assert prediction.grad[0].abs().sum() > 0 and prediction.grad[1].abs().sum() == 0
    none_below = pixel_loss(base.vae, base.noise_scheduler, batch, noisy, prediction, timesteps, "epsilon", 10)
    assert float(none_below) == 0.0 and none_below.requires_grad


def test_a_perfect_prediction_costs_nothing_against_the_cached_target(base):
    timesteps = torch.tensor([30, 90])
    batch, latents, noise, noisy = noisy_batch(base, timesteps, cached=True)
    exact = pixel_loss(base.vae, base.noise_scheduler, batch, noisy, noise, timesteps, "epsilon", 400)
    assert float(exact) < 1e-4
    off = pixel_loss(base.vae, base.noise_scheduler, batch, noisy, noise + 0.5, timesteps, "epsilon", 400)
    assert float(off) > 100 * max(float(exact), 1e-7)
    target = decode(base.vae, latents)
    assert target.shape == (2, 3, 64, 64)


def test_training_adds_the_weighted_pixel_loss(tiny_base, tmp_path):
    data = write_data_folder(tmp_path / "data", count=2)
    common = dict(max_steps=2, learning_rate=0.0, module_learning_rate=0.0, pixel_loss_max_timestep=1000)
    plain = losses(Trainer(tiny_config(tiny_base, data, tmp_path / "plain", **common)).run())
    weighted = losses(Trainer(tiny_config(tiny_base, data, tmp_path / "pixel", pixel_loss_weight=10.0,
                                          **common)).run())
    assert weighted.keys() == plain.keys() == {1, 2}
    assert all(weighted[step] > plain[step] + 1e-4 for step in plain)  # the same draws, with the pixel term on top


@pytest.mark.parametrize("values", [dict(pixel_loss_weight=-1.0), dict(pixel_loss_max_timestep=0)])
def test_bad_pixel_loss_values_are_one_clear_error(tiny_base, tmp_path, values):
    with pytest.raises(ControlNextError, match="--pixel-loss"):
        tiny_config(tiny_base, "data", tmp_path / "out", **values).validate()
