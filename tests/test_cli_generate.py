"""`controlnext generate` end to end on a tiny model: determinism, the metadata chunk, and one-line errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from controlnext.cli import main
from controlnext.cli.generate import read_parameters
from controlnext.request import DEFAULT_GUIDANCE, recommended_guidance


@pytest.fixture(scope="module")
def condition(tmp_path_factory):
    path = tmp_path_factory.mktemp("cond") / "circle.png"
    image = Image.new("RGBA", (70, 90), (0, 0, 0, 0))  # odd size and transparency: both handled
    image.paste((255, 255, 255, 255), (20, 30, 50, 60))
    image.save(path)
    return path


def generate(tmp_path, tiny_base, tiny_control, condition, name="out.png", *extra):
    out = tmp_path / name
    argv = ["generate", "-p", "a red circle", "--base", str(tiny_base), "-c", str(tiny_control), "-i", str(condition),
            "--steps", "2", "--no-progress", "-o", str(out), *extra]
    assert main(argv) == 0
    return out


def test_same_seed_same_image_and_parameters_are_stored(tmp_path, tiny_base, tiny_control, condition):
    a = generate(tmp_path, tiny_base, tiny_control, condition, "a.png", "--seed", "7", "--scale", "0.5")
    b = generate(tmp_path, tiny_base, tiny_control, condition, "b.png", "--seed", "7", "--scale", "0.5")
    c = generate(tmp_path, tiny_base, tiny_control, condition, "c.png", "--seed", "8", "--scale", "0.5")
    pixels = [np.asarray(Image.open(p)) for p in (a, b, c)]
    np.testing.assert_array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])
    params = read_parameters(a)
    assert params["seed"] == 7 and params["prompt"] == "a red circle" and params["steps"] == 2
    assert params["controls"][0]["scale"] == 0.5 and params["controls"][0]["image"] == str(condition)
    assert params["scheduler"] == "ddim" and (params["width"], params["height"]) == (64, 64)


def test_several_images_get_their_own_seed(tmp_path, tiny_base, tiny_control, condition):
    generate(tmp_path, tiny_base, tiny_control, condition, "many.png", "--num-images", "2", "--seed", "3")
    assert [read_parameters(tmp_path / f"many_{k}.png")["seed"] for k in range(2)] == [3, 4]


def corrupt_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG not really")
    return str(path)


ERRORS = [
    (lambda t, b, c, i: ["-c", c, "-i", str(t / "missing.png")], "not found"),
    (lambda t, b, c, i: ["-c", c, "-i", corrupt_image(t)], "cannot read"),
    (lambda t, b, c, i: ["-c", str(t / "nope"), "-i", i], "control weights not found"),
    (lambda t, b, c, i: ["-c", c, "-i", i, "-i", i], "one image per control"),
    (lambda t, b, c, i: ["-c", c, "-i", i, "--scheduler", "magic"], "unknown scheduler"),
    (lambda t, b, c, i: ["-c", c, "-i", i, "--width", "100"], "multiple of 8"),
    (lambda t, b, c, i: ["-c", c, "-i", i, "--dtype", "fp16", "--device", "cpu"], "fp16"),
    (lambda t, b, c, i: ["-c", c, "-i", i, "--task", "img2img"], "--init-image"),
    (lambda t, b, c, i: ["-c", c, "-i", i, "--scale", "1", "--scale", "2"], "scale values"),
]


@pytest.mark.parametrize("make_args,message", ERRORS)
def test_errors_are_one_line_with_exit_2(tmp_path, tiny_base, tiny_control, condition, capsys, make_args, message):
    argv = ["generate", "-p", "x", "--base", str(tiny_base), "--steps", "1", "-o", str(tmp_path / "o.png"),
            *make_args(tmp_path, tiny_base, str(tiny_control), str(condition))]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error" in line]) == 1 and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o.png").exists()


def test_control_for_another_base_is_refused(tmp_path, tiny_base, condition, capsys):
    from controlnext.control.loading import save_controlnext
    from controlnext.testing import tiny_controlnext

    wide = save_controlnext(tmp_path / "wide", tiny_controlnext(out_channels=320))
    argv = ["generate", "-p", "x", "--base", str(tiny_base), "-c", str(wide), "-i", str(condition)]
    assert main(argv) == 2
    assert "base model" in capsys.readouterr().err


def test_console_script_and_debug_traceback(tmp_path, tiny_base, condition):
    argv = [sys.executable, "-m", "controlnext", "generate", "-p", "x", "--base", str(tiny_base), "-c",
            str(tmp_path / "missing"), "-i", str(condition)]
    quiet = subprocess.run(argv, capture_output=True, text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].endswith(f"control weights not found: {tmp_path / 'missing'}")
    loud = subprocess.run(argv + ["--debug"], capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "control weights not found" in loud.stderr


def test_annotator_turns_a_photo_into_the_condition(tmp_path, tiny_base, tiny_control, shared_images):
    photo = shared_images / "building.png"
    raw = generate(tmp_path, tiny_base, tiny_control, photo, "raw.png")
    edges = generate(tmp_path, tiny_base, tiny_control, photo, "edges.png", "--annotator", "canny")
    assert read_parameters(edges)["controls"][0]["annotator"] == "canny"
    assert not np.array_equal(np.asarray(Image.open(raw)), np.asarray(Image.open(edges)))


def test_unknown_annotator_lists_the_known_ones(tmp_path, tiny_base, tiny_control, condition, capsys):
    argv = ["generate", "-p", "x", "--base", str(tiny_base), "-c", str(tiny_control), "-i", str(condition),
            "--annotator", "telepathy"]
    assert main(argv) == 2
    assert "canny" in capsys.readouterr().err


def test_resize_mode_and_unet_weights_flags(tmp_path, tiny_base, condition, capsys):
    import torch
    from diffusers import UNet2DConditionModel

    from controlnext.control.loading import save_controlnext
    from controlnext.testing import tiny_controlnext

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    trained = {k: p.detach() + 0.1 * p.detach().std() * torch.randn(p.shape, generator=g)
               for k, p in unet.named_parameters() if "to_out" in k}
    control = save_controlnext(tmp_path / "trained", tiny_controlnext(seed=3), trained)
    runs = {name: generate(tmp_path, tiny_base, control, condition, f"{name}.png", *flags) for name, flags in {
        "auto": (), "absolute": ("--unet-weights", "absolute"), "increments": ("--unet-weights", "increments"),
        "stretched": ("--resize-mode", "just_resize"),
    }.items()}
    pixels = {name: np.asarray(Image.open(path)) for name, path in runs.items()}
    np.testing.assert_array_equal(pixels["auto"], pixels["absolute"])  # the tensors read as absolute weights
    assert not np.array_equal(pixels["auto"], pixels["increments"])
    assert not np.array_equal(pixels["auto"], pixels["stretched"])  # the 70 x 90 condition is stretched, not cropped
    params = read_parameters(runs["stretched"])
    assert params["resize_mode"] == "just_resize" and params["controls"][0]["unet_weights"] == "auto"
    assert read_parameters(runs["increments"])["controls"][0]["unet_weights"] == "increments"

    capsys.readouterr()
    for flags, message in ((("--resize-mode", "squash"), "unknown resize mode"),
                           (("--unet-weights", "relative"), "unknown --unet-weights"),
                           (("--unet-weights", "auto", "--unet-weights", "auto"), "one per --control")):
        argv = ["generate", "-p", "x", "--base", str(tiny_base), "-c", str(control), "-i", str(condition),
                "--steps", "1", "-o", str(tmp_path / "bad.png"), *flags]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len([line for line in err if "error" in line]) == 1 and message in err[-1]


def test_png_records_the_values_used_not_the_defaults_left_open(tmp_path, tiny_base, tiny_control, condition):
    params = read_parameters(generate(tmp_path, tiny_base, tiny_control, condition, "used.png"))
    assert params["controls"][0]["scale"] == 1.0  # the control's recommended scale
    assert (params["dtype"], params["device"], params["scheduler"], params["seed"]) == ("fp32", "cpu", "ddim", 0)
    assert (params["width"], params["height"]) == (64, 64)
    assert None not in (params["controls"][0][key] for key in ("scale", "start", "end", "annotator"))


def test_guidance_left_open_is_the_one_the_control_recommends(tmp_path, tiny_base, tiny_control, condition):
    """A control.json's "guidance" is what generation uses when none is given: the image of naming it."""
    recommending = tmp_path / "recommending"
    shutil.copytree(tiny_control, recommending)
    recorded = json.loads((recommending / "control.json").read_text())
    (recommending / "control.json").write_text(json.dumps({**recorded, "guidance": 2.5}))
    left_open = generate(tmp_path, tiny_base, recommending, condition, "open.png")
    named = generate(tmp_path, tiny_base, tiny_control, condition, "named.png", "--guidance", "2.5")
    overridden = generate(tmp_path, tiny_base, recommending, condition, "overridden.png", "--guidance", "6")
    assert [read_parameters(path)["guidance"] for path in (left_open, named, overridden)] == [2.5, 2.5, 6]
    pixels = [np.asarray(Image.open(path)) for path in (left_open, named, overridden)]
    np.testing.assert_array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])
    plain = generate(tmp_path, tiny_base, tiny_control, condition, "plain.png")  # its control.json names none
    assert read_parameters(plain)["guidance"] == DEFAULT_GUIDANCE == 7.5


@pytest.mark.parametrize("recommended, expected", [
    ([], DEFAULT_GUIDANCE),
    ([None, None], DEFAULT_GUIDANCE),
    ([None, 3, 1.5], 3.0),  # the first control that names one
    ([0, 2], 0.0),  # zero is a recommendation, not "none"
])
def test_recommended_guidance_rule(recommended, expected):
    assert recommended_guidance(iter(recommended)) == expected


def test_from_png_regenerates_the_image_identically(tmp_path, tiny_base, tiny_control, condition):
    first = generate(tmp_path, tiny_base, tiny_control, condition, "first.png", "--seed", "4", "--scale", "0.7",
                     "--scheduler", "euler_a", "--height", "72", "--guidance", "3", "--start", "0.1", "--end", "0.9",
                     "-n", "blurry", "--num-images", "2")
    again = tmp_path / "again.png"
    assert main(["generate", "--from", str(tmp_path / "first_1.png"), "--no-progress", "-o", str(again)]) == 0
    assert read_parameters(again) == read_parameters(tmp_path / "first_1.png")
    # alone rather than in a batch of two: the arithmetic rounds differently, by at most a level here and there
    batched, alone = (np.asarray(Image.open(path), dtype=np.int16) for path in (tmp_path / "first_1.png", again))
    assert np.abs(batched - alone).max() <= 1
    once_more = tmp_path / "once_more.png"
    assert main(["generate", "--from", str(again), "--no-progress", "-o", str(once_more)]) == 0
    assert once_more.read_bytes() == again.read_bytes()  # an image made alone comes back byte for byte
    other = tmp_path / "other.png"
    assert main(["generate", "--from", str(again), "--seed", "9", "--scale", "0.2", "--no-progress",
                 "-o", str(other)]) == 0  # flags given replace the stored values
    params = read_parameters(other)
    assert (params["seed"], params["controls"][0]["scale"], params["scheduler"]) == (9, 0.2, "euler_a")
    assert not first.exists()  # two images: first_0.png and first_1.png


REFUSED_BEFORE_LOADING = [
    (["--scale", "nan"], "--scale nan: must be a finite number"),
    (["--scale", "inf"], "--scale inf: must be a finite number"),
    (["--guidance", "-1"], "--guidance -1.0: must be at least 0"),
    (["--width", "68"], "--width 68: must be a multiple of 8"),
    (["--width", "65"], "--width 65: must be a multiple of 8"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--num-images", "0"], "--num-images 0: must be at least 1"),
    (["--seed", "-1"], "--seed -1: must be at least 0"),
    (["--start", "0.9", "--end", "0.2"], "--start 0.9 is after --end 0.2"),
    (["--task", "img2img", "--init-image", "{image}", "--strength", "0"], "--strength 0.0: must be more than 0"),
    (["--apply-to", "neither"], "unknown apply to 'neither'"),
    (["--lora", "style.safetensors:nan"], "--lora weight nan: must be a finite number"),
]


@pytest.mark.parametrize("extra,message", REFUSED_BEFORE_LOADING, ids=[" ".join(c[0]) for c in REFUSED_BEFORE_LOADING])
def test_out_of_range_values_are_refused_in_one_line(tmp_path, tiny_control, condition, capsys, monkeypatch, extra,
                                                     message):
    from controlnext.pipelines import ControlledPipeline

    monkeypatch.setattr(ControlledPipeline, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "style.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    extra = [arg.replace("{image}", str(condition)) for arg in extra]
    argv = ["generate", "-p", "x", "-c", str(tiny_control), "-i", str(condition), "-o", "o.png", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o.png").exists()


def test_a_refused_value_costs_no_heavy_import(tiny_control, condition):
    """Checking the flags imports neither torch nor diffusers, so the error comes in a fraction of a second."""
    code = ("import sys; from controlnext.cli import main; "
            f"rc = main(['generate', '-p', 'x', '-c', {str(tiny_control)!r}, '-i', {str(condition)!r}, '--scale', 'nan']); "
            "print(rc, [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split("\n")[0] == "2 []", done.stderr


@pytest.fixture
def only_mps(monkeypatch):
    """A machine without CUDA whose torch reports Apple's MPS."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


def cli_device(tiny_base, tiny_control, condition, monkeypatch) -> str:
    from controlnext.errors import ControlNextError
    from controlnext.pipelines import ControlledPipeline

    seen = {}

    def load(*args, device, **kwargs):
        seen["device"] = device
        raise ControlNextError("stop before loading")

    monkeypatch.setattr(ControlledPipeline, "from_pretrained", load)
    main(["generate", "-p", "x", "--base", str(tiny_base), "-c", str(tiny_control), "-i", str(condition)])
    return seen["device"]


def web_device(tiny_base, tiny_control, condition, monkeypatch) -> str:
    web = pytest.importorskip("controlnext.web.app")
    pytest.importorskip("gradio")
    config = web.WebConfig(base=[str(tiny_base)], hide_embedded=True, api_only=True)
    return web.create_app(config).state.engine.device


def annotator_device(tiny_base, tiny_control, condition, monkeypatch) -> str:
    from controlnext.annotators.local_models import resolve_device

    return str(resolve_device("auto"))


@pytest.mark.parametrize("device_of", [cli_device, web_device, annotator_device], ids=["cli", "web", "annotators"])
def test_auto_device_is_one_rule_cuda_then_mps_then_cpu(only_mps, tiny_base, tiny_control, condition, monkeypatch,
                                                        device_of):
    assert device_of(tiny_base, tiny_control, condition, monkeypatch) == "mps"


def test_a_device_the_machine_lacks_is_one_line(tiny_base, tiny_control, condition, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["generate", "-p", "x", "--base", str(tiny_base), "-c", str(tiny_control), "-i", str(condition),
            "--device", "cuda"]
    assert main(argv) == 2
    assert "device 'cuda' is not available: this machine has no CUDA device" in capsys.readouterr().err


def test_annotator_works_at_the_generation_size(tmp_path, tiny_base, tiny_control, shared_images, monkeypatch):
    import controlnext.annotators as annotators
    from controlnext.annotators import registry

    sizes = []
    original = registry.annotate

    def recording(name, image, **kwargs):
        sizes.append(kwargs.get("output_size"))
        return original(name, image, **kwargs)

    monkeypatch.setattr(registry, "annotate", recording)
    monkeypatch.setattr(annotators, "annotate", recording)
    generate(tmp_path, tiny_base, tiny_control, shared_images / "building.png", "edges.png", "--annotator", "canny",
             "--width", "64", "--height", "80")  # fmt: skip
    assert sizes == [(64, 80)]  # annotated as the control sees it, not at the photo's 564 x 848


def test_bad_serve_settings_are_one_line(capsys):
    for argv, message in [(["serve", "--port", "-5"], "not a port number"), (["serve", "--queue-size", "0"], "at least 1")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["--debug", "generate"], ["generate", "--debug"]])
def test_debug_works_before_and_after_the_subcommand(argv, tiny_control):
    with pytest.raises(Exception, match="image file not found"):
        main([*argv, "-p", "x", "-c", str(tiny_control), "-i", "missing.png"])


@pytest.mark.parametrize("command, expected", [
    ("generate", ["(per control; default: none)", "(default: 20)", "(default: output.png)", "(default: auto)"]),
    ("serve", ["(default: 7860)", "(default: 127.0.0.1)", "(default: 8)"]),
])
def test_help_shows_the_defaults(command, expected, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(default in text for default in expected)


def test_bitsandbytes_import_notices_are_hidden(capsys):
    import logging

    from controlnext.cli import quiet_unused_bitsandbytes

    quiet_unused_bitsandbytes()
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
    assert "gemm_4bit" not in capsys.readouterr().err
    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)
