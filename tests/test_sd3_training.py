"""`controlnext train` on an SD3 base: both methods learn through the same loop and resume exactly."""

import types

import numpy as np
import pytest
import torch
from training_helpers import TINY_MODULE, circle_example, losses

from controlnext.control.loading import load_control
from controlnext.errors import ControlNextError
from controlnext.testing import save_tiny_sd3_pipeline
from controlnext.training import TrainConfig
from controlnext.training.data import collate
from controlnext.training.flow_matching import FlowMatching, noisy_latents
from controlnext.training.trainer import Trainer, diffusion_loss


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory):
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3-base"))


def sd3_config(base, output, **overrides) -> TrainConfig:
    values = dict(base=str(base), data="", output_dir=str(output), module_config=TINY_MODULE, resolution=32,
                  batch_size=2, max_steps=12, learning_rate=3e-3, checkpoint_every=0, validation_every=0,
                  tensorboard=False, progress_bar=False, generated_examples=2)
    return TrainConfig(**{**values, **overrides})


def examples():
    return [circle_example(0), circle_example(1)]  # 64 px, resized to 32 by the data pipeline


def fixed_loss(trainer: Trainer, batch: dict) -> float:
    with torch.no_grad():
        return float(np.mean([float(diffusion_loss(trainer.model, trainer.base, batch, trainer.config,
                                                   torch.Generator().manual_seed(s), "cpu")) for s in range(8)]))


@pytest.fixture(scope="module", params=["controlnext", "controlnet"])
def trained(request, sd3_base, tmp_path_factory):
    torch.set_num_threads(1)
    config = sd3_config(sd3_base, tmp_path_factory.mktemp(request.param) / "out", method=request.param,
                        checkpoint_every=6, validation_every=12, validation_examples=2, validation_sampling_steps=2,
                        trainable=["auto"] if request.param == "controlnext" else ["none"])
    trainer = Trainer(config, examples())
    batch = collate([trainer.dataset[0], trainer.dataset[1]])
    before = fixed_loss(trainer, batch)
    output = trainer.run()
    return types.SimpleNamespace(trainer=trainer, output=output, before=before, after=fixed_loss(trainer, batch))


def test_flow_matching_draws_shifted_sigmas_and_targets_the_velocity():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for density in ("logit_normal", "mode", "uniform"):
        timesteps, sigmas = FlowMatching(density=density).sample(scheduler, 64, torch.Generator().manual_seed(0))
        assert ((sigmas > 0) & (sigmas <= 1)).all()
        torch.testing.assert_close(timesteps, sigmas * 1000)  # the scheduler's own (shifted) pairs
    latents, noise, sigmas = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([0.25, 1.0])
    assert torch.equal(noisy_latents(latents, noise, sigmas)[1], noise[1])
    assert float(FlowMatching().loss(noise - latents, latents, noise, sigmas)) == 0.0


def test_training_lowers_the_flow_matching_loss(trained):
    assert trained.trainer.base.prediction_type == "flow_matching"
    assert trained.after < 0.97 * trained.before
    assert sorted(losses(trained.output)) == list(range(1, 13))


def test_controlnext_trains_the_joint_blocks_attention_outputs(trained):
    trainer = trained.trainer
    if trainer.config.method != "controlnext":
        pytest.skip("ControlNet keeps the base locked")
    assert trainer.control.injection == "pos_embed"
    blocks = trainer.base.unet.config.num_layers
    # the last joint block updates no text tokens, so it has no to_add_out
    expected = [f"transformer_blocks.{i}.attn.{part}.{kind}" for i in range(blocks) for part in ("to_out.0", "to_add_out")
                for kind in ("weight", "bias") if not (i == blocks - 1 and part == "to_add_out")]
    assert sorted(trainer.selected) == sorted(expected)


def test_saved_control_loads_on_the_base_and_logs_fidelity(trained):
    loaded = load_control(trained.output, trained.trainer.base.unet)
    assert loaded.method == trained.trainer.config.method
    log = (trained.output / "log.csv").read_text()
    assert "edge_f1" in log.splitlines()[0] and (trained.output / "validation" / "step-000012.png").is_file()


@pytest.mark.parametrize("method", ["controlnext", "controlnet"])
def test_resume_from_a_checkpoint_repeats_the_uninterrupted_run(sd3_base, tmp_path, method):
    torch.set_num_threads(1)
    trainable = ["auto"] if method == "controlnext" else ["none"]
    whole = sd3_config(sd3_base, tmp_path / "whole", method=method, max_steps=4, checkpoint_every=2, trainable=trainable)
    Trainer(whole, examples()).run()
    resumed = sd3_config(sd3_base, tmp_path / "resumed", method=method, max_steps=4, trainable=trainable,
                         checkpoint_every=2, resume=str(tmp_path / "whole" / "checkpoints" / "checkpoint-000002"))
    Trainer(resumed, examples()).run()
    assert losses(tmp_path / "resumed") == {k: v for k, v in losses(tmp_path / "whole").items() if k > 2}
    first = load_control(tmp_path / "whole", None).model.state_dict()
    second = load_control(tmp_path / "resumed", None).model.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("trainable, blocks", [(["sd3"], [0, 1]), (["spaced"], [0])])
def test_trainable_presets_select_joint_blocks_attention_outputs(trainable, blocks):
    from controlnext.testing import tiny_sd3_pipeline
    from controlnext.training.selection import resolve_patterns, select_parameters

    transformer = tiny_sd3_pipeline().transformer
    selected = select_parameters(transformer, resolve_patterns(transformer, trainable, is_sdxl=False, spaced_every=2))
    assert {int(name.split(".")[1]) for name in selected} == set(blocks)
    assert all(".attn.to_out.0." in name or ".attn.to_add_out." in name for name in selected)


def test_pixel_loss_on_a_flow_matching_base_is_one_clear_error(sd3_base, tmp_path):
    with pytest.raises(ControlNextError, match="--pixel-loss-weight works for image bases") as error:
        Trainer(sd3_config(sd3_base, tmp_path / "out", pixel_loss_weight=1.0), examples())
    assert "\n" not in str(error.value)
