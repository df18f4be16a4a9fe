"""`controlnext generate` end to end on a tiny model: determinism, the metadata chunk, and one-line errors."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from controlnext.cli import main
from controlnext.cli.generate import read_parameters


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
    assert params["scheduler"] == "unipc" and (params["width"], params["height"]) == (64, 64)


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


def test_console_script_and_debug_traceback(tmp_path, tiny_base):
    argv = [sys.executable, "-m", "controlnext", "generate", "-p", "x", "--base", str(tiny_base), "-c",
            str(tmp_path / "missing"), "-i", "x.png"]
    quiet = subprocess.run(argv, capture_output=True, text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and "not found" in quiet.stderr
    loud = subprocess.run(argv + ["--debug"], capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


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
