"""Weight-free annotators on real images, the `annotate` contract (sizes, modes, resizing) and its errors."""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest
from annotator_helpers import array, long_straight_lines, shapes_image, shared_image
from PIL import Image

from controlnext.annotators import annotate, get_annotator, list_annotators, parse_options, register_annotator
from controlnext.annotators import registry
from controlnext.errors import ControlNextError, MissingDependencyError

CLASSICAL = ["canny", "lineart", "scribble", "softedge", "lines", "mask", "shuffle", "color_segments", "tile", "blur"]


def edge_fraction(out: np.ndarray) -> float:
    return float((out.max(axis=2) > 127).mean())


def check_canny(out, source):
    assert set(np.unique(out)) <= {0, 255}  # one-pixel binary edges
    assert 0.02 < edge_fraction(out) < 0.3
    lines = long_straight_lines(out)
    vertical = np.abs(lines[:, 0] - lines[:, 2]) <= 3
    assert len(lines) >= 5 and vertical.sum() >= 2  # the facade's long straight edges


def check_lines(out, source):
    assert set(np.unique(out)) <= {0, 255}
    canny = array(annotate("canny", source))
    assert edge_fraction(out) < 0.6 * edge_fraction(canny)  # texture left out
    assert len(long_straight_lines(out)) >= 5  # ...but the long structure kept


def check_lineart(out, source):
    strong = out[..., 0] > 128
    assert 0.005 < strong.mean() < 0.3
    assert len(np.unique(out)) > 20  # soft strength, not binary
    near_canny = cv2.dilate(array(annotate("canny", source))[..., 0], np.ones((5, 5), np.uint8)) > 0
    assert near_canny[strong].mean() > 0.8  # the lines are where the image has edges


def check_scribble(out, source):
    assert set(np.unique(out)) <= {0, 255}
    strokes = (out[..., 0] > 0).astype(np.uint8)
    thick = cv2.erode(strokes, np.ones((2, 2), np.uint8))
    assert thick.sum() > 0.5 * strokes.sum()  # strokes are several pixels wide
    assert edge_fraction(out) > edge_fraction(array(annotate("canny", source)))


def check_softedge(out, source):
    assert len(np.unique(out)) > 50  # grey levels, not binary
    canny = array(annotate("canny", source))[..., 0]
    far_from_edges = cv2.dilate(canny, np.ones((11, 11), np.uint8)) == 0
    assert out[..., 0][canny > 0].mean() > 3 * out[..., 0][far_from_edges].mean()


def check_luminance_mask(out, source):
    assert set(np.unique(out)) <= {0, 255}
    grey = np.asarray(source.convert("L"))
    assert np.array_equal(out[..., 0] == 255, grey < 240)  # invert=True: the dark bag, not its white page


def check_alpha_mask(out, source):
    assert source.mode == "RGBA" and np.asarray(source.getchannel("A")).min() == 255
    assert (out == 255).all()  # the shared RGBA images are fully opaque: the alpha mask covers all


def check_shuffle(out, source):
    rgb = array(source)
    assert np.abs(out.astype(int) - rgb).mean() > 20  # the layout is gone...
    source_cubes = set(map(tuple, np.unique(rgb.reshape(-1, 3) // 16, axis=0)))
    kept = np.mean([tuple(c) in source_cubes for c in out.reshape(-1, 3)[::7] // 16])
    assert kept > 0.98  # ...the colours stay
    assert not np.array_equal(out, array(annotate("shuffle", source, seed=1)))


def check_color_segments(out, source):
    colours = np.unique(out.reshape(-1, 3), axis=0)
    assert 4 <= len(colours) <= 8
    assert np.abs(out.astype(int) - array(source)).mean() < 25


def laplacian_variance(rgb: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def check_smoothed(out, source):
    rgb = array(source)
    assert np.abs(out.astype(int) - rgb).mean() < 15
    assert laplacian_variance(out) < 0.5 * laplacian_variance(rgb)


CASES = [
    ("canny", "building.png", {}, check_canny),
    ("lines", "building.png", {}, check_lines),
    ("lines", "building.png", {"method": "hough"}, check_lines),
    ("lineart", "bag.png", {}, check_lineart),
    ("scribble", "bag.png", {}, check_scribble),
    ("scribble", "bag.png", {"method": "edges"}, check_scribble),
    ("softedge", "room.png", {}, check_softedge),
    ("mask", "bag.png", {"source": "luminance", "threshold": 240, "invert": True}, check_luminance_mask),
    ("mask", "bag.png", {"source": "alpha"}, check_alpha_mask),
    ("shuffle", "dog.png", {"seed": 3}, check_shuffle),
    ("color_segments", "dog.png", {"colors": 8}, check_color_segments),
    ("tile", "house.png", {}, check_smoothed),
    ("blur", "house.png", {}, check_smoothed),
]


@pytest.mark.parametrize("name, file, options, check", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_classical_annotator_on_real_image(name, file, options, check):
    source = shared_image(file)
    out = annotate(name, source, **options)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == source.size
    assert np.array_equal(array(out), array(annotate(name, source, **options)))  # deterministic
    check(array(out), source)


def test_every_classical_annotator_is_covered_by_a_case():
    assert {case[0] for case in CASES} == set(CLASSICAL)
    assert set(CLASSICAL) | {"openpose", "openpose_json", "depth", "normals", "segmentation"} == set(list_annotators())


def test_mask_follows_an_alpha_channel():
    source = shared_image("human.png").convert("RGBA")
    alpha = np.zeros((source.height, source.width), np.uint8)
    cv2.circle(alpha, (source.width // 2, source.height // 2), source.height // 3, 255, -1)
    source.putalpha(Image.fromarray(alpha))
    out = array(annotate("mask", source))  # "auto" picks the alpha of a transparent image
    assert np.array_equal(out[..., 0], alpha)
    inverted = array(annotate("mask", source, invert=True))
    assert np.array_equal(inverted[..., 0], 255 - alpha)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA", "1", "I;16", "CMYK"])
@pytest.mark.parametrize("name", CLASSICAL)
def test_any_mode_and_odd_size_gives_rgb_of_the_same_size(name, mode):
    source = shapes_image(37, 53, mode)
    out = annotate(name, source)
    assert out.mode == "RGB" and out.size == (37, 53)


@pytest.mark.parametrize("name", ["canny", "mask", "blur"])
def test_transparent_pixels_count_as_black(name):
    rgba = shapes_image(40, 40, "RGBA")
    black_behind = Image.new("RGB", rgba.size)
    black_behind.paste(rgba, mask=rgba.getchannel("A"))
    options = {"source": "luminance"} if name == "mask" else {}
    assert np.array_equal(array(annotate(name, rgba, **options)), array(annotate(name, black_behind, **options)))


def test_resolution_is_the_short_side_the_annotator_works_at():
    seen = []
    register_annotator("probe", lambda image: (seen.append(image.size), image)[1])
    try:
        out = annotate("probe", shapes_image(300, 200), resolution=100)
        assert seen == [(150, 100)] and out.size == (300, 200)
    finally:
        registry._REGISTRY.pop("probe")


@pytest.mark.parametrize("mode", ["crop_and_resize", "just_resize", "resize_and_fill"])
def test_output_size_and_resize_modes(mode):
    source = shared_image("building.png")  # portrait 564 x 848
    out = array(annotate("blur", source, resolution=256, resize_mode=mode, output_size=(320, 256)))
    assert out.shape == (256, 320, 3)
    side_columns = np.concatenate([out[:, :40], out[:, -40:]], axis=1)
    if mode == "resize_and_fill":
        assert side_columns.max() == 0  # the portrait is centred on black bars
    else:
        assert side_columns.mean() > 30


def test_binary_maps_stay_binary_and_label_maps_keep_their_colours_when_resized():
    source = shared_image("building.png")
    edges = array(annotate("canny", source, resolution=200, output_size=(700, 900)))
    assert set(np.unique(edges)) == {0, 255}
    small = array(annotate("color_segments", source, resolution=128, colors=5))
    large = array(annotate("color_segments", source, resolution=128, colors=5, output_size=(600, 900)))
    assert {tuple(c) for c in np.unique(large.reshape(-1, 3), axis=0)} <= {
        tuple(c) for c in np.unique(small.reshape(-1, 3), axis=0)
    }


def test_seeded_annotators_depend_on_the_seed_only():
    source = shapes_image(64, 48)
    for name in ("shuffle", "color_segments"):
        assert np.array_equal(array(annotate(name, source, seed=7)), array(annotate(name, source, seed=7)))
    assert not np.array_equal(array(annotate("shuffle", source, seed=7)), array(annotate("shuffle", source, seed=8)))


def test_custom_annotator_by_decorator_and_duplicate_names():
    @register_annotator("invert_test")
    def invert_test(image, *, amount: int = 255):
        """Inverted colours."""
        return Image.fromarray((amount - array(image).astype(int)).clip(0, 255).astype(np.uint8))

    try:
        assert "invert_test" in list_annotators() and get_annotator("invert_test").summary == "Inverted colours."
        out = array(annotate("invert_test", shapes_image(), amount=200))
        assert np.array_equal(out, (200 - array(shapes_image()).astype(int)).clip(0, 255))
        with pytest.raises(ControlNextError, match="already registered"):
            register_annotator("invert_test", invert_test)
    finally:
        registry._REGISTRY.pop("invert_test")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda img: annotate("cany", img), "unknown annotator 'cany'; known annotators: blur, canny"),
        (lambda img: annotate("canny", img, low=1), "no option 'low'; its options: low_threshold, high_threshold"),
        (lambda img: annotate("lines", img, method="mlsd"), "must be one of lsd, hough"),
        (lambda img: annotate("canny", img, resize_mode="stretch"), "unknown resize mode"),
        (lambda img: annotate("canny", img, resolution=0), "resolution must be a positive"),
        (lambda img: annotate("canny", img, output_size=(512,)), "output_size must be"),
        (lambda img: annotate("canny", np.zeros((8, 8, 3))), "needs a PIL image"),
        (lambda img: annotate("canny", img, low_threshold=300), "low_threshold <= high_threshold"),
        (lambda img: annotate("mask", img, source="alpha"), "no alpha channel"),
        (lambda img: annotate("color_segments", img, colors=1), "2 <= colors"),
        (lambda img: annotate("openpose_json", img), "needs json_path"),
        (lambda img: annotate("depth", img), "needs model_path"),
    ],
)
def test_errors_say_what_was_wrong(call, message):
    with pytest.raises(ControlNextError, match=message.replace("(", r"\(")):
        call(shapes_image())


def test_missing_mediapipe_names_the_pose_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # makes `import mediapipe` fail
    with pytest.raises(MissingDependencyError, match=r"controlnext\[pose\]") as caught:
        annotate("openpose", shapes_image())
    assert caught.value.extra == "pose" and caught.value.package == "mediapipe"


@pytest.mark.parametrize(
    "pairs, expected",
    [
        (["low_threshold=50", "high_threshold=150"], {"low_threshold": 50, "high_threshold": 150}),
        (["sigma=2"], {"sigma": 2.0}),
        (["model_path=none"], {"model_path": None}),
        (["model-path=/models/hed"], {"model_path": "/models/hed"}),
        (["invert=yes", "threshold=10", "source=alpha"], {"invert": True, "threshold": 10, "source": "alpha"}),
    ],
)
def test_options_are_typed_from_strings(pairs, expected):
    owner = {"low_threshold": "canny", "sigma": "softedge", "model_path": "softedge", "invert": "mask"}
    name = owner[next(iter(expected))]
    parsed = parse_options(name, pairs)
    assert parsed == expected and all(type(parsed[k]) is type(v) for k, v in expected.items())


@pytest.mark.parametrize(
    "name, pairs, message",
    [
        ("canny", ["low_threshold"], "write it as KEY=VALUE"),
        ("canny", ["low_threshold=1.5"], "not a valid int"),
        ("mask", ["invert=maybe"], "not a valid bool"),
        ("mask", ["source=colour"], "must be one of auto, alpha, luminance"),
        ("canny", ["sigma=1"], "no option 'sigma'"),
    ],
)
def test_bad_option_strings(name, pairs, message):
    with pytest.raises(ControlNextError, match=message):
        parse_options(name, pairs)
