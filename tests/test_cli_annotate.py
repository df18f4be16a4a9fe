"""`controlnext annotate` end to end: writes the condition image, prints its path, exits 2 on bad input."""

from __future__ import annotations

import numpy as np
import pytest
from annotator_helpers import IMAGES, array, shapes_image
from PIL import Image

import controlnext.cli as cli
from controlnext.annotators import annotate


@pytest.fixture(autouse=True)
def only_annotate(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["annotate"])  # other subcommands live on other branches


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    shapes_image(90, 70, "RGBA").save(path)
    return path


def test_annotate_writes_the_condition_and_prints_its_path(photo, tmp_path, capsys):
    out = tmp_path / "out" / "edges.png"
    options = ["--option", "low_threshold=20", "high_threshold=60"]
    code = cli.main(["annotate", "canny", str(photo), "-o", str(out), *options])
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    expected = annotate("canny", Image.open(photo), low_threshold=20, high_threshold=60)
    assert np.array_equal(array(Image.open(out)), array(expected))


def test_resolution_resize_mode_and_output_size(photo, tmp_path):
    out = tmp_path / "blur.png"
    argv = ["annotate", "blur", str(photo), "-o", str(out), "--resolution", "35", "--resize-mode", "resize_and_fill",
            "--output-size", "64x32", "--option", "sigma=1.5"]  # fmt: skip
    assert cli.main(argv) == 0
    expected = annotate(
        "blur", Image.open(photo), resolution=35, resize_mode="resize_and_fill", output_size=(64, 32), sigma=1.5
    )
    assert Image.open(out).size == (64, 32) and np.array_equal(array(Image.open(out)), array(expected))


def test_real_photo_to_jpeg(tmp_path):
    source = IMAGES / "building.png"
    if not source.is_file():
        pytest.skip("shared test images not available")
    out = tmp_path / "lines.jpg"
    assert cli.main(["annotate", "lines", str(source), "-o", str(out), "--option", "method=hough"]) == 0
    assert Image.open(out).format == "JPEG" and Image.open(out).size == Image.open(source).size


@pytest.mark.parametrize(
    "argv, message",
    [
        (["annotate", "cany", "{photo}", "-o", "{out}"], "unknown annotator 'cany'; known annotators: blur, canny"),
        (["annotate", "canny", "{missing}", "-o", "{out}"], "image file not found"),
        (["annotate", "canny", "{photo}", "-o", "{out}", "--option", "low=3"], "has no option 'low'"),
        (["annotate", "canny", "{photo}", "-o", "{out}", "--option", "low_threshold"], "write it as KEY=VALUE"),
        (["annotate", "canny", "{photo}", "-o", "{out}", "--option", "low_threshold=x"], "not a valid int"),
        (["annotate", "canny", "{photo}", "-o", "{out}", "--resize-mode", "stretch"], "unknown resize mode"),
        (["annotate", "canny", "{photo}", "-o", "{out}", "--output-size", "64"], "must be WIDTHxHEIGHT"),
        (["annotate", "canny", "{photo}", "-o", "{out}.xyz"], "use a .png or .jpg"),
        (["annotate", "depth", "{photo}", "-o", "{out}", "--option", "model_path={missing}"], "model folder not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(photo, tmp_path, capsys, argv, message):
    fill = {"photo": str(photo), "out": str(tmp_path / "out.png"), "missing": str(tmp_path / "missing")}
    code = cli.main([part.format(**fill) for part in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_usage_errors_exit_2(photo, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["annotate", "canny", str(photo)])  # no -o
    assert caught.value.code == 2 and "-o/--output" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--output-size", "100000x100000"], "100000x100000 pixels is too large"),
        (["--resolution", "100000"], "too large"),
        (["--option", "device=cuda"], "not available"),
    ],
)
def test_sizes_beyond_the_limit_and_missing_devices_are_one_line(photo, tmp_path, capsys, monkeypatch, extra, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    name = "depth" if "device=cuda" in extra else "canny"
    code = cli.main(["annotate", name, str(photo), "-o", str(tmp_path / "out.png"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_color_segments_of_a_one_pixel_image(tmp_path):
    source = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (5, 6, 7)).save(source)
    assert cli.main(["annotate", "color_segments", str(source), "-o", str(tmp_path / "out.png")]) == 0


def test_a_phone_portrait_gives_an_upright_condition(tmp_path):
    stored = shapes_image(90, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown turned 90 degrees clockwise
    stored.save(tmp_path / "phone.jpg", exif=exif)
    assert cli.main(["annotate", "canny", str(tmp_path / "phone.jpg"), "-o", str(tmp_path / "out.png")]) == 0
    assert Image.open(tmp_path / "out.png").size == (60, 90)


def run_module(code: str) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_annotate_and_the_error_paths_do_not_import_the_generation_stack(photo, tmp_path):
    """Start-up time is printed by scripts/bench_startup.py; here: the heavy libraries stay unimported."""
    heavy = ("torch", "diffusers", "transformers", "gradio", "mediapipe")
    calls = [
        ["annotate", "canny", str(photo), "-o", str(tmp_path / "out.png")],
        ["annotate", "canny", str(tmp_path / "missing.png"), "-o", str(tmp_path / "out.png")],
        ["generate", "-p", "x", "-c", "canny", "-i", str(tmp_path / "missing.png")],
        ["generate", "-p", "x", "-c", "canny", "-i", str(photo), "--annotator", "telepathy"],
        ["train", "--data", "x"],
        ["train", "--data", "x", "--output-dir", str(tmp_path / "run"), "--resolution", "7"],
        ["serve", "--port", "-5"],
        ["bench", "--threads", "0"],
    ]
    for argv in calls:
        code = (
            "import contextlib, io, sys\nfrom controlnext.cli import main\n"
            f"with contextlib.redirect_stderr(io.StringIO()) as err:\n    status = main({argv!r})\n"
            f"print(status, err.getvalue().count(chr(10)), [m for m in {heavy!r} if m in sys.modules])"
        )
        assert run_module(code).splitlines()[-1] == ("0 0 []" if argv == calls[0] else "2 1 []"), argv
