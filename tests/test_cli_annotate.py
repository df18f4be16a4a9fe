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
