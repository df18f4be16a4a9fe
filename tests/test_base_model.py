"""The embedded base model: its tokenizer, its builders, its training script and the shipped weights."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from controlnext.data.shapes import PALETTE, ShapesWorld, make_sample
from controlnext.errors import ControlNextError
from controlnext.metrics import background_rgb, mean_shape_scores
from controlnext.models.tiny_sd import (BASE_MODEL_DIR, TinySDConfig, build_scheduler, build_text_encoder,
                                        build_tokenizer, build_unet, build_vae, learn_merges, load_base_pipeline,
                                        shapes_words)
from controlnext.training.base_model import (BaseTrainingConfig, evaluate_base, latent_scaling_factor,
                                             render_scenes, render_training_set, snr_weights, train_base_model)

TINY = TinySDConfig(resolution=32, text_hidden_size=16, text_layers=1, text_heads=2, vae_channels=(8, 16),
                    unet_channels=(8, 16), unet_attention=(), attention_heads=2, norm_groups=4)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_every_shapes_word_is_one_token(tokenizer):
    for word in shapes_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"]


@pytest.mark.parametrize("index", range(4))
def test_captions_tokenize_word_by_word_and_decode_back(tokenizer, index):
    caption = make_sample(index).caption
    ids = tokenizer(caption).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == len(caption.replace(",", " ,").split()) + 2
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",") == caption


def test_other_text_falls_back_to_byte_symbols(tokenizer):
    ids = tokenizer("A zebra!", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids[1:] and tokenizer.decode(ids) == "a zebra !"


def test_merges_are_deterministic_and_spell_each_word_whole():
    words = ["red", "green", "greed", "reed"]
    merges = learn_merges(words)
    assert merges == learn_merges(list(reversed(words)))
    assert {a + b for a, b in merges} >= {word + "</w>" for word in words}


def test_tokenizer_pads_to_its_max_length(tokenizer):
    ids = tokenizer("a red circle", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert tokenizer.model_max_length == 32 and len(ids) == 32 and ids[-1] == tokenizer.pad_token_id


def test_builders_fit_together(tokenizer):
    torch.manual_seed(0)
    vae, unet, text_encoder = build_vae(TINY), build_unet(TINY), build_text_encoder(tokenizer, TINY)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(2, 3, 32, 32)).latent_dist.mean  # (2, 4, 16, 16)
        hidden = text_encoder(tokenizer(["a red circle", ""], padding="max_length", return_tensors="pt").input_ids)[0]
        out = unet(latents, torch.tensor([1, 500]), hidden).sample
    assert latents.shape == (2, 4, TINY.latent_size, TINY.latent_size) and out.shape == latents.shape
    assert hidden.shape == (2, 32, 16)


def test_scaling_factor_makes_latents_unit_variance():
    means, stds = torch.randn(64, 4, 8, 8) * 3 + 1, torch.full((64, 4, 8, 8), 4.0)
    factor = latent_scaling_factor(means, stds)
    samples = (means + stds * torch.randn_like(stds)) * factor
    assert samples.std().item() == pytest.approx(1.0, abs=0.05)


def test_min_snr_weights_cap_easy_timesteps():
    scheduler = build_scheduler()
    timesteps = torch.tensor([0, 500, 999])
    epsilon = snr_weights(scheduler, timesteps, gamma=5.0, prediction_type="epsilon")
    assert epsilon[0] < 0.01 and epsilon[2] == 1.0 and torch.all(epsilon <= 1.0)
    velocity = snr_weights(scheduler, timesteps, gamma=5.0, prediction_type="v_prediction")
    assert velocity[0] < 0.01 and velocity[2] < 0.01 and torch.all(velocity <= epsilon)
    assert torch.all(snr_weights(scheduler, timesteps, gamma=0.0) == 1.0)


def test_min_snr_weights_follow_the_formula_on_the_schedule():
    scheduler = build_scheduler()
    timesteps = torch.arange(0, 1000, 37)
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)  # SNR(t) = alpha_t^2 / sigma_t^2
    for prediction, denominator in (("epsilon", snr), ("v_prediction", snr + 1)):
        expected = torch.minimum(snr, torch.tensor(5.0)) / denominator  # Hang et al. (2023), Eq. 9
        torch.testing.assert_close(snr_weights(scheduler, timesteps, 5.0, prediction), expected, rtol=1e-5, atol=0)


def test_moving_average_matches_the_warm_up_average_it_replaced():
    """diffusers' EMAModel against the script's former average, theta <- d theta + (1 - d) theta_new with
    d = min(decay, (1 + n) / (10 + n)) from n = 0; the only difference, diffusers copying at the first
    update, weighs 0.1 * prod(d_n) ~ 1e-15 after 200 steps and ~1e-27 after the recipe's thousands."""
    from controlnext.training.base_model import averaged_copies, moving_average

    module = torch.nn.Linear(4, 3)
    former = [p.detach().clone() for p in module.parameters()]
    ema = moving_average([module], decay=0.998)
    g = torch.Generator().manual_seed(0)
    for n in range(200):
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=g) * 0.1)
        ema.step(list(module.parameters()))
        decay = min(0.998, (1 + n) / (10 + n))
        former = [a.lerp(p.detach(), 1 - decay) for a, p in zip(former, module.parameters())]
    (averaged,) = averaged_copies(ema, [module])
    for mine, theirs in zip(averaged.parameters(), former):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert not any(torch.equal(a, p) for a, p in zip(averaged.parameters(), module.parameters()))


def test_learning_rate_warms_up_linearly_then_falls_on_half_a_cosine_to_zero():
    from controlnext.training.base_model import cosine_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = cosine_schedule(optimizer, total=110, warmup=10)
    rates = []
    for _ in range(110):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates[:10] == pytest.approx([step / 10 for step in range(10)])  # linear warm-up
    assert rates[10] == pytest.approx(1.0) and rates[60] == pytest.approx(0.5)  # peak, then half way down
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and rates[-1] < 1e-3


def test_scheduler_leaves_almost_no_signal_at_the_last_step():
    scheduler = build_scheduler()
    assert scheduler.alphas_cumprod[-1].sqrt() < 0.01 and scheduler.config.prediction_type == "v_prediction"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    config = BaseTrainingConfig(seed=3, train_images=8, vae_steps=2, vae_batch=4, vae_crop=16, unet_steps=3,
                                unet_batch=4, warmup_steps=1, eval_every=0, model=TINY)
    folders = [tmp_path_factory.mktemp(f"run{i}") / "model" for i in range(2)]
    for folder in folders:
        train_base_model(folder, config, log=lambda line: None)
    return folders


def test_training_script_output_loads_as_a_stable_diffusion_pipeline(tiny_runs):
    from diffusers import StableDiffusionPipeline

    folder = tiny_runs[0]
    assert {"vocab.json", "merges.txt"} <= {path.name for path in (folder / "tokenizer").iterdir()}
    assert list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
    pipeline = StableDiffusionPipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red circle on a blue background", num_inference_steps=2, height=32, width=32,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32) and pipeline.vae.config.scaling_factor > 0
    assert json.loads((folder / "training_config.json").read_text())["config"]["seed"] == 3


def test_training_is_reproducible_for_a_seed(tiny_runs):
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        first, second = load_file(tiny_runs[0] / part), load_file(tiny_runs[1] / part)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first)


def test_a_run_started_from_a_trained_folder_begins_at_its_weights(tiny_runs, tmp_path):
    """No steps from --init-from gives back the folder's weights; a few steps move them; other sizes are refused."""
    base = dict(seed=4, train_images=8, vae_batch=4, unet_batch=4, warmup_steps=1, eval_every=0,
                init_from=str(tiny_runs[0]))
    parts = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
             "vae/diffusion_pytorch_model.safetensors")
    moved = {}
    for steps in (0, 2):
        folder = train_base_model(tmp_path / f"steps{steps}", BaseTrainingConfig(unet_steps=steps, model=TINY, **base),
                                  log=lambda line: None)
        for part in parts:
            start, now = load_file(tiny_runs[0] / part), load_file(folder / part)
            moved[steps, part] = max((now[key].float() - start[key].float()).abs().max().item() for key in start)
    assert all(moved[0, part] == 0 for part in parts)
    assert moved[2, parts[0]] > 0 and moved[2, parts[1]] > 0 and moved[2, parts[2]] == 0
    wider = replace(TINY, unet_channels=tuple(2 * width for width in TINY.unet_channels))
    with pytest.raises(ControlNextError, match="does not fit the model sizes"):
        train_base_model(tmp_path / "wider", BaseTrainingConfig(unet_steps=0, model=wider, **base), log=lambda line: None)


def test_training_set_is_the_same_drawn_by_several_processes():
    images, captions = render_training_set(7, seed=2, resolution=32)
    for workers in (2, 3):
        parallel, parallel_captions = render_training_set(7, seed=2, resolution=32, workers=workers)
        assert torch.equal(parallel, images) and parallel_captions == captions
    assert images.shape == (7, 3, 32, 32) and len(set(captions)) > 1


def test_scenes_are_drawn_from_the_split_asked_for():
    world = ShapesWorld(seed=2)
    for split in ("train", "test"):
        images, captions = render_scenes(2, 32, 3, 6, split)
        assert captions == [world.spec(index, split).caption() for index in range(3, 6)]
        assert np.array_equal(images[0], np.asarray(make_sample(3, seed=2, split=split, resolution=32).image))
    assert render_scenes(2, 32, 3, 6, "test")[1] != render_scenes(2, 32, 3, 6)[1]


def test_a_device_this_machine_lacks_is_refused_before_any_work(tmp_path):
    lines = []
    config = BaseTrainingConfig(train_images=8, device="cuda:7" if torch.cuda.is_available() else "cuda", model=TINY)
    with pytest.raises(ControlNextError, match="not available"):
        train_base_model(tmp_path / "model", config, log=lines.append)
    assert lines == [] and not list(tmp_path.iterdir())


@pytest.mark.parametrize("script, arguments", [("train_base.py", ["--train-images", "8"]), ("quality.py", ["--count", "1"])])
def test_scripts_refuse_a_device_this_machine_lacks_in_one_line(script, arguments, tmp_path, monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / script
    device = "cuda:7" if torch.cuda.is_available() else "cuda"
    output = ["--output", str(tmp_path / "model")] if script == "train_base.py" else []
    monkeypatch.setattr(sys, "argv", [str(path), *arguments, *output, "--device", device])
    threads = torch.get_num_threads()  # quality.py sets its own
    try:
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(str(path), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1
    assert error.startswith(f"{script}: error: device '{device}' is not available")
    assert not list(tmp_path.iterdir())  # nothing written


def test_training_evaluation_draws_the_images_the_quality_script_judges(tiny_base):
    """scripts/eval_base.py (evaluate_base) and scripts/quality.py (uncontrolled_images) give the same figures."""
    from controlnext.evaluation import uncontrolled_images
    from controlnext.pipelines import ControlledPipeline

    pipe = ControlledPipeline.from_pretrained(str(tiny_base))
    pipe.set_progress_bar_config(disable=True)
    sampling = dict(count=5, seed=7, steps=2, guidance=3.0, batch=2)
    _, ours = evaluate_base(pipe.pipe, **sampling)
    theirs = uncontrolled_images(pipe, **sampling)
    assert len(ours) == len(theirs) == 5
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, theirs))
    _, other_seed = evaluate_base(pipe.pipe, **{**sampling, "seed": 8})
    assert not np.array_equal(np.asarray(other_seed[0]), np.asarray(ours[0]))


# The shipped base model. Measured: see scripts/README.md; the floors below sit well under it.
shipped = pytest.mark.skipif(not (BASE_MODEL_DIR / "model_index.json").is_file(),
                             reason="the embedded base model is not shipped in this checkout yet")


@pytest.fixture(scope="module")
def base_pipeline():
    pipeline = load_base_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@shipped
def test_shipped_model_was_trained_by_the_continuation_retrain_sh_runs():
    """scripts/retrain.sh's continuation stage repeats the recipe recorded beside the shipped weights."""
    script = (BASE_MODEL_DIR.parents[2] / "scripts" / "retrain.sh").read_text()
    command = script[script.index('--output "$RUNS/base-continued"'):]
    command = command[:command.index("\n  rm -rf")].replace('"$ASSETS', '"controlnext/assets')
    flags = dict(re.findall(r"--([a-z-]+) \"?([^\s\"]+)", command))
    recorded = json.loads((BASE_MODEL_DIR / "training_config.json").read_text())["config"]
    checked = {name: value for name, value in flags.items() if name not in ("output", "log", "threads")}
    assert set(checked) >= {"init-from", "unet-steps", "unet-batch", "unet-lr", "train-images"}
    for name, value in checked.items():
        expected = recorded[name.replace("-", "_")]
        assert (value if isinstance(expected, str) else type(expected)(float(value))) == expected, name


@shipped
def test_shipped_model_is_small_and_stored_as_safetensors():
    files = list(BASE_MODEL_DIR.rglob("*.safetensors"))
    assert len(files) == 3 and not list(BASE_MODEL_DIR.rglob("*.bin"))
    assert sum(path.stat().st_size for path in files) < 20 * 2**20  # small enough to ship


@shipped
def test_shipped_model_loads_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(BASE_MODEL_DIR))
    assert pipeline.unet.dtype == pipeline.text_encoder.dtype == torch.float32 and pipeline.safety_checker is None


@shipped
def test_shipped_model_draws_the_colours_the_caption_asks_for(base_pipeline):
    world = ShapesWorld(seed=0)
    specs = [world.spec(index, "test") for index in range(16)]
    side = base_pipeline.unet.config.sample_size * base_pipeline.vae_scale_factor
    images = base_pipeline([spec.caption() for spec in specs], num_inference_steps=10, guidance_scale=5.0,
                           generator=torch.Generator().manual_seed(0)).images
    assert side == 128 and all(image.size == (side, side) for image in images)
    scores = mean_shape_scores(images, specs)
    assert scores["background"] >= 0.8 and scores["colour"] >= 0.6


@shipped
@pytest.mark.parametrize("background", ["black", "white", "blue"])
def test_shipped_model_background_follows_a_one_word_change(base_pipeline, background):
    image = base_pipeline(f"a red circle on a {background} background", num_inference_steps=8, guidance_scale=5.0,
                          generator=torch.Generator().manual_seed(1)).images[0]
    assert np.linalg.norm(background_rgb(image) - PALETTE[background]) < 60


def test_sd3_training_script_output_loads_and_its_training_is_reproducible(tmp_path):
    """The shapes-world SD3 trainer: a diffusers SD3 folder, the same weights for the same seed, and
    weights that moved from their initialisation (the moving average of trained weights is what it saves)."""
    from controlnext.models.tiny_sd3 import TinySD3Config, load_sd3_base_pipeline
    from controlnext.training.base_model_sd3 import SD3BaseTrainingConfig, train_sd3_base_model

    model = TinySD3Config(resolution=32, text_hidden_size=16, text_layers=1, text_projection=16, vae_channels=(8, 16),
                          norm_groups=4, layers=1, heads=2, head_dim=8, t5_tokens=4)
    base = dict(seed=1, train_images=8, vae_from="", vae_steps=2, batch=4, warmup_steps=1, eval_every=0,
                half_precision_storage=False, model=model)
    folders = [train_sd3_base_model(tmp_path / name, SD3BaseTrainingConfig(steps=steps, **base), log=lambda line: None)
               for name, steps in (("a", 3), ("b", 3), ("untrained", 0))]
    part = "transformer/diffusion_pytorch_model.safetensors"
    first, again, untrained = (load_file(folder / part) for folder in folders)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert max((first[key] - untrained[key]).abs().max().item() for key in first) > 0
    pipeline = load_sd3_base_pipeline(folders[0])  # diffusers' StableDiffusion3Pipeline, without T5
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red circle on a blue background", num_inference_steps=2, height=32, width=32,
                     max_sequence_length=model.t5_tokens, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
