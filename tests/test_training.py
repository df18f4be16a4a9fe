"""Training a control in-process on tiny components: it learns, touches only what it should, saves what loads."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import circle_example, losses, tiny_config, write_data_folder

from controlnext.control import ControlUnit, attach_control
from controlnext.control.loading import load_control
from controlnext.errors import ControlNextError, MissingDependencyError
from controlnext.testing import tiny_controlnext
from controlnext.training.base import load_training_base
from controlnext.training.data import collate
from controlnext.training.trainer import Trainer, diffusion_loss, make_optimizer


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data_folder(tmp_path_factory.mktemp("data"), count=4)


def fixed_loss(trainer: Trainer, batch: dict, seeds=range(8)) -> float:
    """The loss on one batch, averaged over fixed noise and timesteps."""
    with torch.no_grad():
        return float(np.mean([float(diffusion_loss(trainer.model, trainer.base, batch, trainer.config,
                                                   torch.Generator().manual_seed(s), "cpu")) for s in seeds]))


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """16 steps on two examples, with the loss on them before and after, and the weights before."""
    torch.set_num_threads(1)
    examples = [circle_example(0), circle_example(1)]
    config = tiny_config(tiny_base, "", tmp_path_factory.mktemp("run") / "out", max_steps=16, checkpoint_every=8,
                         keep_checkpoints=1, generated_examples=2)
    trainer = Trainer(config, examples)
    batch = collate([trainer.dataset[0], trainer.dataset[1]])
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    frozen = {name: p.detach().clone() for m in (trainer.base.vae, *trainer.base.text_encoders)
              for name, p in m.named_parameters()}
    loss_before = fixed_loss(trainer, batch)
    output = trainer.run()
    return types.SimpleNamespace(trainer=trainer, batch=batch, before=before, frozen=frozen, output=output,
                                 loss_before=loss_before, loss_after=fixed_loss(trainer, batch))


def test_training_lowers_the_loss(trained):
    assert trained.loss_after < 0.99 * trained.loss_before
    assert len(losses(trained.output)) == 16


def test_only_the_selected_weights_change(trained):
    trainer = trained.trainer
    assert trainer.selected and all("to_out" in name for name in trainer.selected)  # the sd15 preset ("auto")
    for name, param in trainer.model.named_parameters():
        changed = not torch.equal(param.detach(), trained.before[name])
        trainable = name.startswith("control.") or name.removeprefix("unet.") in trainer.selected
        assert changed == trainable, name
    for module in (trainer.base.vae, *trainer.base.text_encoders):
        for name, param in module.named_parameters():
            assert torch.equal(param, trained.frozen[name]), name


def prediction(unet, control, unet_weights, batch, seed=5):
    """One UNet prediction with `control` attached the way generate does."""
    g = torch.Generator().manual_seed(seed)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 16, generator=g)
    unit = ControlUnit(control, batch["conditioning"], unet_weights=unet_weights)
    with attach_control(unet, unit, cfg=False), torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), text).sample


@pytest.mark.parametrize("increments", [False, True])
def test_saved_control_predicts_like_the_trained_model(trained, tiny_base, tmp_path, increments):
    trainer = trained.trainer
    expected = prediction(trainer.base.unet, trainer.control, None, trained.batch)
    folder = trained.output
    if increments:
        folder = trainer.method.save(tmp_path / "increments", trainer.control,
                                     {n: p for n, p in trainer.base.unet.named_parameters() if n in trainer.changed},
                                     original_weights=trainer.original, increments=True, metadata={})
        stored = load_file(str(folder / "unet.safetensors"))
        name = trainer.selected[0]
        delta = dict(trainer.base.unet.named_parameters())[name].detach() - trainer.original[name]
        assert torch.equal(stored[name], delta)
    fresh = load_training_base(tiny_base).unet  # the original base weights
    loaded = load_control(folder, fresh)
    assert set(loaded.unet_weights) == set(trainer.selected)
    torch.testing.assert_close(prediction(fresh, loaded.model, loaded.unet_weights, trained.batch), expected,
                               rtol=0, atol=1e-6 if increments else 0)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_control_saved_in_half_precision_stores_its_weights_so_and_loads_in_fp32(tiny_base, data, tmp_path, precision):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    trainer = Trainer(tiny_config(tiny_base, data, tmp_path / "out", max_steps=2, save_precision=precision))
    folder = trainer.run()
    full = trainer.method.save(tmp_path / "fp32", trainer.control,
                               {n: p for n, p in trainer.base.unet.named_parameters() if n in trainer.changed},
                               original_weights=trainer.original, metadata={})
    for name in ("diffusion_pytorch_model.safetensors", "unet.safetensors"):
        stored, reference = load_file(str(folder / name)), load_file(str(full / name))
        assert set(stored) == set(reference) and all(v.dtype == dtype for v in stored.values()), name
        assert all(torch.equal(stored[k], reference[k].to(dtype)) for k in stored), name
    loaded = load_control(folder, load_training_base(tiny_base).unet)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert set(loaded.unet_weights) == set(trainer.changed)  # still read as absolute weights, not increments
    live = dict(trainer.base.unet.named_parameters())
    for name, value in loaded.unet_weights.items():
        assert torch.equal(value.float(), live[name].detach().to(dtype).float()), name  # cast when attached


def test_controlnet_saved_in_fp16_stores_its_copy_so_and_loads_in_fp32(tiny_base, data, tmp_path):
    trainer = Trainer(tiny_config(tiny_base, data, tmp_path / "out", method="controlnet", module_config=None,
                                  max_steps=2, save_precision="fp16"))
    folder = trainer.run()
    stored = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    live = trainer.control.state_dict()
    assert stored.keys() == live.keys() and all(v.dtype == torch.float16 for v in stored.values())
    loaded = load_control(folder, load_training_base(tiny_base).unet)
    assert loaded.method == "controlnet"
    for name, value in loaded.model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, live[name].half().float()), name


def test_checkpoints_hold_the_state_and_the_export(trained):
    checkpoints = sorted((trained.output / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["checkpoint-000016"]  # keep_checkpoints=1
    folder = checkpoints[0]
    assert {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "random_states_0.pt", "trainer_state.json",
            "control"} <= {p.name for p in folder.iterdir()}
    saved = load_file(str(folder / "trainable.safetensors"))
    live = dict(trained.trainer.model.named_parameters())
    assert set(saved) == {n for n, p in live.items() if p.requires_grad}
    assert all(torch.equal(saved[n], live[n].detach()) and saved[n].dtype == torch.float32 for n in saved)
    exported = load_control(folder / "control")
    assert exported.metadata["steps"] == 16 and exported.guidance == trained.trainer.config.guidance_scale


def test_mixed_precision_keeps_trainable_weights_and_optimizer_state_fp32(tiny_base, data, tmp_path):
    trainer = Trainer(tiny_config(tiny_base, data, tmp_path / "out", mixed_precision="bf16", max_steps=2))
    trainer.run()
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    frozen_unet = [p for p in trainer.base.unet.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen_unet)
    states = [trainer.optimizer.state[p] for p in trainable]
    assert all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32 for s in states)
    assert all(np.isfinite(v) for v in losses(tmp_path / "out").values())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_base, data, tmp_path):
    trainer = Trainer(tiny_config(tiny_base, data, tmp_path / "out"))
    batch = collate([trainer.dataset[0], trainer.dataset[1]])

    def gradients():
        trainer.model.zero_grad()
        diffusion_loss(trainer.model, trainer.base, batch, trainer.config, torch.Generator().manual_seed(0),
                       "cpu").backward()
        return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    trainer.model.train()
    plain = gradients()
    trainer.base.unet.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_optimizer_gives_the_module_ten_times_the_base_rate(tiny_base, data, tmp_path, monkeypatch):
    config = tiny_config(tiny_base, data, tmp_path, learning_rate=2e-5)
    control, weight = tiny_controlnext(), torch.nn.Parameter(torch.zeros(3))
    optimizer = make_optimizer(control, [weight], config)
    assert [group["lr"] for group in optimizer.param_groups] == [2e-4, 2e-5]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    config.use_8bit_adam = True
    with pytest.raises(MissingDependencyError, match="bitsandbytes"):
        make_optimizer(control, [weight], config)


def test_sdxl_base_gets_pooled_text_and_size_conditioning(tmp_path):
    """A tiny SDXL-like base: the UNet receives text_embeds and time_ids (original size, crop corner, target)."""
    from diffusers import StableDiffusionXLPipeline

    from controlnext.testing import tiny_sdxl_components

    base = tmp_path / "sdxl"
    StableDiffusionXLPipeline(**tiny_sdxl_components()).save_pretrained(base)
    image, condition, caption = circle_example(0, size=(96, 64))  # landscape: resized to 64 high, cropped in width
    config = tiny_config(base, "", tmp_path / "out", max_steps=2, generated_examples=1, validation_every=2,
                         validation_sampling_steps=2, validation_metric="none")
    trainer = Trainer(config, [(image, condition, caption)])
    assert trainer.control.injection == "conv_in" and trainer.control.config.out_channels == 8
    assert trainer.selected and all(".attn2.to_out" in name for name in trainer.selected)
    seen = {}
    trainer.base.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs["added_cond_kwargs"]), with_kwargs=True)
    batch = collate([trainer.dataset[0]])
    diffusion_loss(trainer.model, trainer.base, batch, config, torch.Generator().manual_seed(0), "cpu")
    assert seen["time_ids"].tolist() == [[64, 96, 0, 16, 64, 64]]  # (h, w) original, (top, left) crop, target
    assert seen["text_embeds"].shape == (1, 16)
    trainer.run()
    assert len(losses(tmp_path / "out")) == 2
    assert (tmp_path / "out" / "validation" / "step-000002.png").is_file()
    assert load_control(tmp_path / "out", trainer.base.unet).model.injection == "conv_in"


def test_validation_saves_a_grid_and_logs_fidelity(tiny_base, data, tmp_path, monkeypatch):
    calls = []

    def edge_f1(condition, generated):
        calls.append((condition.size, generated.size))
        return 0.25

    monkeypatch.setitem(sys.modules, "controlnext.metrics", types.SimpleNamespace(edge_f1=edge_f1))
    config = tiny_config(tiny_base, data, tmp_path / "out", max_steps=2, validation_every=2, validation_examples=3,
                         validation_sampling_steps=2)
    Trainer(config).run()
    from PIL import Image

    grid = Image.open(tmp_path / "out" / "validation" / "step-000002.png")
    assert grid.size == (2 * 64, 3 * 64)  # one row per example: condition | generated
    assert (tmp_path / "out" / "validation" / "step-000000.png").is_file()  # before training: the curve's start
    assert calls == [((64, 64), (64, 64))] * 6
    rows = (tmp_path / "out" / "log.csv").read_text().splitlines()
    assert rows[0].endswith("fidelity_edge_f1") and rows[1].startswith("0,") and rows[1].endswith(",0.25")
    assert rows[2].startswith("1,") and rows[2].endswith(",") and rows[3].endswith(",0.25")


# -- errors: one clear line each ----------------------------------------------------------------------------

def _other_base(tiny_base, tmp_path):
    """The tiny base with a UNet of another architecture (wider time embedding is enough to differ)."""
    import json
    import shutil

    other = tmp_path / "other-base"
    shutil.copytree(tiny_base, other)
    config = json.loads((other / "unet" / "config.json").read_text())
    config["norm_eps"] = 1e-6
    (other / "unet" / "config.json").write_text(json.dumps(config))
    return other


ERRORS = [
    ("missing column", dict(caption_column="caption"), "has no column 'caption'"),
    ("empty data", "empty", "is empty"),
    ("pattern selects nothing", dict(trainable=["no_such_layer"]), "selects no UNet parameter"),
    ("bad pattern", dict(trainable=["to_out("]), "not a valid regular expression"),
    ("weights for another base", "wide control", "made for a base model with 16 channels"),
    ("resume another configuration", dict(learning_rate=1e-4, resume="latest"), "--learning-rate"),
    ("resume on another base", "other base", "trained on another base model"),
    ("resume under another default module rate", "other factor", "--module-learning-rate 0.03"),
    ("explicit metric missing", dict(validation_every=1, validation_metric="mask_iou"), "controlnext.metrics"),
    ("fp16 on the CPU", dict(mixed_precision="fp16", cpu=True), "fp16 needs a GPU"),
]


@pytest.mark.parametrize("case, change, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_input_is_one_clear_error(case, change, message, trained, tiny_base, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "controlnext.metrics", None)
    config = tiny_config(tiny_base, data, tmp_path / "out")
    if isinstance(change, dict):
        for name, value in change.items():
            setattr(config, name, value)
    if case.startswith("resume"):
        config.output_dir, config.data, config.generated_examples = str(trained.output), "", 2
        config.max_steps, config.checkpoint_every, config.keep_checkpoints = 16, 8, 1
        config.resume = "latest"
    if change == "empty":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "metadata.jsonl").write_text("\n")
        config.data = str(tmp_path / "empty")
    if change == "wide control":
        from controlnext.control.loading import save_controlnext

        config.module_config = None
        config.init_control = str(save_controlnext(tmp_path / "wide", tiny_controlnext(out_channels=16)))
    if change == "other base":
        config.base = str(_other_base(tiny_base, tmp_path))
    if change == "other factor":  # the method's default rate changed since the checkpoint was made
        from controlnext.methods import METHODS

        monkeypatch.setitem(METHODS, "controlnext", dataclasses.replace(METHODS["controlnext"], module_lr_factor=5.0))
    examples = [circle_example(0), circle_example(1)] if case.startswith("resume") else None
    with pytest.raises(ControlNextError, match=message) as error:
        Trainer(config, examples).run()
    assert "\n" not in str(error.value)


def test_init_control_starts_from_saved_weights(trained, tiny_base, data, tmp_path):
    config = tiny_config(tiny_base, data, tmp_path / "out", module_config=None, init_control=str(trained.output),
                         trainable=["none"], max_steps=1)
    trainer = Trainer(config)
    saved = trained.trainer.control.state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in trainer.control.state_dict().items())
    assert trainer.selected == [] and trainer.changed == trained.trainer.selected
    trainer.run()
    exported = load_file(str(tmp_path / "out" / "unet.safetensors"))  # still carries the weights it started from
    trained_unet = dict(trained.trainer.base.unet.named_parameters())
    assert exported.keys() == set(trained.trainer.selected)
    assert all(torch.equal(exported[name], trained_unet[name].detach()) for name in exported)
    config = json.loads((tmp_path / "out" / "config.json").read_text())  # not the folder it started from
    assert config["_class_name"] == "ControlNeXtModel" and "_name_or_path" not in config


def test_controlnet_trains_through_the_same_loop_and_loads_back(tiny_base, data, tmp_path):
    from controlnext.control.loading import load_control
    from controlnext.training import train

    out = train(tiny_config(tiny_base, data, tmp_path / "controlnet", method="controlnet", module_config=None,
                            max_steps=3, guidance_scale=2.0))
    loaded = load_control(out, load_training_base(tiny_base).unet)
    assert loaded.method == "controlnet" and loaded.unet_weights is None
    assert loaded.guidance == 2.0  # the validation guidance, recorded for generation
    zero_convs = [p for n, p in loaded.model.named_parameters() if n.startswith("controlnet_down_blocks")]
    assert any(p.abs().max() > 0 for p in zero_convs)  # trained away from their zero initialisation


def test_shapes_world_is_a_generated_data_set(tiny_base, tmp_path):
    from controlnext.data.shapes import ShapesWorld
    from controlnext.training.data import GENERATED_DATA

    config = tiny_config(tiny_base, "shapes-mask", tmp_path / "run", generated_examples=8)
    image, condition, caption = GENERATED_DATA["shapes-mask"](config)(3)
    sample = ShapesWorld(conditions=("mask",)).sample(3, "train")
    assert caption == sample.caption and np.array_equal(np.asarray(condition), np.asarray(sample.conditions["mask"]))
    assert np.array_equal(np.asarray(image), np.asarray(sample.image))


# -- validation and prompts come from the family's own pipeline -------------------------------------------------

def former_sampling_loop(base, control, conditions, prompts, steps, guidance_scale, seed):
    """The hand-written DDIM loop validation used before it ran the pipeline: the reference it must equal."""
    from diffusers import DDIMScheduler

    from controlnext.training.trainer import ControlledUNet

    scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    n, _, height, width = conditions.shape
    latents = torch.randn((n, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(seed))
    tokenizer, encoder = base.pipe.tokenizer, base.text_encoders[0]
    ids = tokenizer([""] * n + prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    hidden = encoder(ids)[0]  # (2n, tokens, d): unconditional first
    model = ControlledUNet(base.unet, control, 0.8)
    for t in scheduler.timesteps:
        prediction = model(scheduler.scale_model_input(torch.cat([latents, latents]), t), t, hidden,
                           torch.cat([conditions, conditions]))
        unconditional, conditional = prediction.chunk(2)
        latents = scheduler.step(unconditional + guidance_scale * (conditional - unconditional), t, latents).prev_sample
    images = base.vae.decode(latents / base.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def test_validation_runs_the_pipeline_as_the_former_loop_did(tiny_base):
    from controlnext.training.validation import generate

    base = load_training_base(tiny_base)
    conditions = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle", "a blue square"]
    control = tiny_controlnext(seed=4)
    with torch.no_grad():
        expected = former_sampling_loop(base, control, conditions, prompts, 3, 5.0, seed=7)
        tokenizer = base.pipe.tokenizer
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        hidden, pooled = base.encode_prompts(prompts, "cpu")
        assert torch.equal(hidden, base.text_encoders[0](ids)[0]) and pooled is None
    got = generate(base, control, conditions, prompts, steps=3, guidance_scale=5.0, seed=7, scale=0.8)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # CPUs differ in their last float bits
    assert not base.unet._forward_pre_hooks  # detached after the call


def test_latent_cache_filled_by_worker_processes_encodes_with_their_own_copy(tiny_base, data, tmp_path, monkeypatch):
    """Forked data-loading processes cannot use the trainer's VAE once it is on a GPU: they encode with a CPU copy
    made before they start, and give the losses of a run without workers."""
    plain = Trainer(tiny_config(tiny_base, data, tmp_path / "plain", max_steps=3)).run()
    cache = tmp_path / "cache"
    trainer = Trainer(tiny_config(tiny_base, data, tmp_path / "workers", max_steps=3, latent_cache=str(cache),
                                  num_workers=2))

    def trainers_vae(*args, **kwargs):
        raise AssertionError("a data-loading process encoded with the trainer's VAE")

    monkeypatch.setattr(trainer.base.vae, "encode", trainers_vae)
    assert losses(trainer.run()) == pytest.approx(losses(plain), rel=1e-4)
    assert len(sorted(cache.rglob("*.safetensors"))) == 4


def test_latent_cache_trains_as_encoding_each_step_and_is_read_back(tiny_base, data, tmp_path, monkeypatch):
    """A run with --latent-cache gives the losses of a run without (the same draws from the same posteriors); a
    second run reads every example back without encoding; a changed resolution keys a new folder."""
    plain = Trainer(tiny_config(tiny_base, data, tmp_path / "plain", max_steps=3)).run()
    cache = tmp_path / "cache"
    cached = Trainer(tiny_config(tiny_base, data, tmp_path / "cached", max_steps=3, latent_cache=str(cache))).run()
    assert losses(cached) == pytest.approx(losses(plain), rel=1e-4)
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 4  # each of the four examples encoded once
    written = {path: path.stat().st_mtime_ns for path in files}

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded although cached")

    trainer = Trainer(tiny_config(tiny_base, data, tmp_path / "again", max_steps=3, latent_cache=str(cache)))
    monkeypatch.setattr(trainer.base.vae, "encode", no_encoding)
    assert losses(trainer.run()) == pytest.approx(losses(cached), rel=1e-6)
    assert {path: path.stat().st_mtime_ns for path in cache.rglob("*.safetensors")} == written
    item = trainer.dataset[1]
    assert item["caption"] == circle_example(1)[2] and item["conditioning"].shape == (3, 64, 64)
    assert set(item) >= {"latent_mean", "latent_std"} and "pixel_values" not in item
    Trainer(tiny_config(tiny_base, data, tmp_path / "other", max_steps=1, resolution=32, latent_cache=str(cache))).run()
    assert len({path.parent.parent for path in cache.rglob("*.safetensors")}) == 2  # one key per resolution
