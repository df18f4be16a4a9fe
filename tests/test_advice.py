"""Notes for input the model cannot use well: unseen words, untrained sizes, a colour photo as an edge map."""

import pytest
from PIL import Image

from controlnext.advice import condition_note, prompt_note, size_note, trained_vocabulary, unknown_words
from controlnext.cli import main
from controlnext.request import DEFAULT_BASE, configured_size


def test_the_embedded_models_vocabulary_is_its_captions_words():
    assert trained_vocabulary(None) == {"a", "an", "and", "on", "background", "black", "blue", "green", "orange",
                                        "purple", "red", "white", "yellow", "circle", "square", "triangle"}
    assert unknown_words("A red circle, on a BLUE background", None) == []
    assert unknown_words("a cat on a red sofa", None) == ["cat", "sofa"]


def test_other_bases_get_no_vocabulary_or_size_notes(tiny_base):
    assert trained_vocabulary(str(tiny_base)) is None
    assert prompt_note("a cat", str(tiny_base)) is None and size_note(512, 512, str(tiny_base)) is None


def test_size_and_condition_notes():
    side = configured_size(DEFAULT_BASE)[0]  # the embedded default's own size
    assert size_note(None, None, None) is None and size_note(side, side, None) is None
    assert f"{side}x{side}" in size_note(2 * side, None, None)
    colour = Image.new("RGB", (64, 64), (200, 30, 30))
    edges = Image.new("RGB", (64, 64))
    edges.paste((255, 255, 255), (10, 10, 50, 11))
    assert "--annotator canny" in condition_note("/models/my-canny", "none", colour)
    assert condition_note("/models/my-canny", "canny", colour) is None
    assert condition_note("/models/my-canny", "none", edges) is None
    assert condition_note("/models/depth", "none", colour) is None


def test_the_cli_warns_on_stderr_and_still_generates(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (30, 70, 215)).save(photo)
    side = configured_size(DEFAULT_BASE)[0]
    argv = ["generate", "-p", "a cat", "--control", "canny", "--image", str(photo), "--width", str(2 * side),
            "--steps", "1", "--no-progress", "-o", str(tmp_path / "out.png")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "never saw 'cat'" in err and f"trained at {side}x{side}" in err and "expects an edge map" in err
    assert (tmp_path / "out.png").is_file()
