"""Conditions made at the size of use: line density independent of the photo's size, lines that survive
resizing, upright photos, a pixel limit, and one-line errors for any bad input or option."""

from __future__ import annotations

import numpy as np
import pytest
from annotator_helpers import array, shapes_image, shared_image
from PIL import Image, ImageDraw

from controlnext.annotators import annotate, annotate_at_size, get_annotator, parse_options
from controlnext.annotators.registry import resize_line_map
from controlnext.errors import ControlNextError
from controlnext.images import MAX_PIXELS, load_image, open_image

WEIGHT_FREE = ["canny", "lineart", "scribble", "softedge", "lines", "mask", "shuffle", "color_segments", "tile", "blur"]


def line_fraction(image: Image.Image) -> float:
    return float((array(image).max(axis=2) > 127).mean())


def enlarged(image: Image.Image, factor: int) -> Image.Image:
    """The same scene as a photo `factor` times larger."""
    return image.convert("RGB").resize((image.width * factor, image.height * factor), Image.BICUBIC)


@pytest.mark.parametrize("file", ["building.png", "man.png"])
def test_edge_density_at_the_size_of_use_does_not_depend_on_the_photos_size(file):
    photo = shared_image(file)
    at_use = line_fraction(annotate("canny", photo, output_size=(512, 512)))
    from_large = line_fraction(annotate("canny", enlarged(photo, 3), output_size=(512, 512)))
    assert at_use > 0.01
    assert abs(from_large - at_use) < 0.15 * at_use  # a 3x larger photo: the same edges at 512 pixels


@pytest.mark.parametrize("resolution", [1024, 2048])
def test_a_resolution_above_the_photos_size_keeps_its_edges(resolution):
    photo = shared_image("man.png")  # 564 x 846
    native = line_fraction(annotate("canny", photo))
    assert line_fraction(annotate("canny", photo, resolution=resolution)) > 0.8 * native


def test_resolution_512_on_a_smaller_photo_keeps_its_edges():
    photo = shared_image("bag.png")  # 458 x 600
    native = line_fraction(annotate("canny", photo))
    assert line_fraction(annotate("canny", photo, resolution=512)) > 0.9 * native


def grid(size: int = 600, step: int = 30) -> Image.Image:
    """One-pixel white lines on black: a grid and a diagonal."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for x in range(step // 2, size, step):
        draw.line((x, 0, x, size), fill="white")
        draw.line((0, x, size, x), fill="white")
    draw.line((0, 0, size, size), fill="white")
    return image


@pytest.mark.parametrize("target", [200, 97, 64])
def test_shrinking_a_line_map_keeps_every_line(target):
    out = array(resize_line_map(grid(), (target, target)))[..., 0] > 0  # (t, t)
    assert set(np.unique(array(resize_line_map(grid(), (target, target))))) <= {0, 255}
    scale = target / 600
    for x in range(15, 600, 30):
        column = round(x * scale)
        assert out[:, max(0, column - 1) : column + 2].any(axis=1).mean() > 0.95  # each vertical line is there
    assert np.mean([out[i, max(0, i - 1) : i + 2].any() for i in range(target)]) > 0.95  # the diagonal too


def test_canny_shrunk_to_an_output_size_keeps_its_lines():
    photo = shared_image("building.png")
    native = line_fraction(annotate("canny", photo))
    third = (photo.width // 3, photo.height // 3)
    shrunk = line_fraction(annotate("canny", photo, resolution=min(photo.size), output_size=third))
    assert shrunk > 1.5 * native  # the same lines on a third of the pixels: denser, not faded away


def test_annotate_at_size_works_at_that_size_and_keeps_none_as_is():
    seen = []
    spec = get_annotator("blur")
    original = spec.function
    try:
        object.__setattr__(spec, "function", lambda image, **kw: (seen.append(image.size), original(image, **kw))[1])
        out = annotate_at_size("blur", shapes_image(300, 200), (64, 80))
    finally:
        object.__setattr__(spec, "function", original)
    assert out.size == (64, 80) and seen == [(120, 80)]  # covers 64x80 at the photo's aspect, then cropped
    rgba = shapes_image(30, 20, "RGBA")
    assert annotate_at_size("none", rgba, (64, 64)).mode == "RGB"
    with pytest.raises(ControlNextError, match="takes no options"):
        annotate_at_size("none", rgba, (64, 64), sigma=2)


@pytest.mark.parametrize("mode", ["crop_and_resize", "just_resize", "resize_and_fill"])
def test_output_size_without_resolution_is_exact_in_every_mode(mode):
    photo = shapes_image(90, 50)
    out = annotate("canny", photo, output_size=(40, 40), resize_mode=mode)
    assert out.size == (40, 40) and set(np.unique(array(out))) <= {0, 255}


def exif_portrait(path, orientation: int = 6) -> tuple[Image.Image, str]:
    """A landscape-stored JPEG whose EXIF says: turn me (6: 90 degrees clockwise), as phones write them."""
    stored = shapes_image(80, 40)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif, quality=95)
    return stored, str(path)


def test_exif_orientation_is_applied_on_every_read(tmp_path):
    stored, path = exif_portrait(tmp_path / "phone.jpg")
    upright = load_image(path)
    assert upright.size == (40, 80)
    turned = [np.abs(array(upright).astype(int) - array(stored.transpose(t))).mean()
              for t in (Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_90)]  # fmt: skip
    assert turned[0] < 0.3 * turned[1]  # turned clockwise, as the tag says
    assert open_image(open(path, "rb").read()).size == (40, 80)
    assert annotate("canny", load_image(path)).size == (40, 80)


def test_web_uploads_are_turned_upright(tmp_path):
    pytest.importorskip("pydantic")
    import base64

    from controlnext.web.schemas import decode_image

    _, path = exif_portrait(tmp_path / "phone.jpg", orientation=8)
    assert decode_image(base64.b64encode(open(path, "rb").read()).decode()).size == (40, 80)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"output_size": (100000, 100000)}, "the condition of 100000x100000 pixels is too large"),
        ({"resolution": 100000}, "too large"),
        ({"output_size": (20000, 20)}, "too large"),  # covering a thin strip scales the photo up hugely
    ],
)
def test_sizes_beyond_the_pixel_limit_are_refused(kwargs, message):
    with pytest.raises(ControlNextError, match=message):
        annotate("canny", shapes_image(64, 48), **kwargs)


def test_images_beyond_the_pixel_limit_are_refused_before_decoding(tmp_path):
    side = int(MAX_PIXELS**0.5) + 8
    path = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(path)  # a tiny file of too many pixels
    with pytest.raises(ControlNextError, match="too large"):
        load_image(path)


def test_color_segments_of_a_one_pixel_image():
    out = annotate("color_segments", Image.new("RGB", (1, 1), (10, 200, 30)))
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (10, 200, 30)


EXTREMES = {int: [-1, 0, 10**9], float: [-1.0, 0.0, 1e9, float("nan"), float("inf")]}


@pytest.mark.parametrize("name", WEIGHT_FREE)
def test_any_option_value_gives_a_condition_or_one_error(name):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    for key, kind in get_annotator(name).option_types().items():
        for value in EXTREMES.get(kind, []):
            try:
                out = annotate(name, image, **{key: value})
            except ControlNextError as error:
                assert "\n" not in str(error)
            else:
                assert out.size == image.size


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1), (2, 2), (16, 16)])
@pytest.mark.parametrize("name", WEIGHT_FREE)
def test_tiny_and_flat_images_give_a_condition_or_one_error(name, size):
    for image in (Image.new("RGB", size, (90, 90, 90)), shapes_image(*size) if min(size) >= 8 else None):
        if image is None:
            continue
        try:
            out = annotate(name, image)
        except ControlNextError as error:
            assert "\n" not in str(error)
        else:
            assert out.size == size


def test_a_device_this_machine_lacks_is_one_error(monkeypatch):
    torch = pytest.importorskip("torch")
    from controlnext.annotators.local_models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ControlNextError, match="'cuda' is not available: this machine has no CUDA device"):
        annotate("depth", shapes_image(), model_path="/nonexistent", device="cuda")
    with pytest.raises(ControlNextError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    assert str(resolve_device("auto")) == "cpu"


# -- masks ----------------------------------------------------------------------------------------------


def centre_and_corners(mask: np.ndarray) -> tuple[float, float]:
    h, w = mask.shape
    corners = np.concatenate([mask[: h // 10, : w // 10].ravel(), mask[: h // 10, -w // 10 :].ravel()])
    return float(mask[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean()), float(corners.mean())


@pytest.mark.parametrize(
    "file, source",
    [
        ("human.png", "auto"),  # a man against a bright sky: the sky is not the subject
        ("bag.png", "auto"),  # a bag on a white page
        ("dog.png", "subject"),
        ("toy.png", "subject"),
        ("human.png", "person"),
        ("man.png", "person"),
    ],
)
def test_mask_of_an_opaque_photo_is_its_subject(file, source):
    if source != "subject":
        pytest.importorskip("mediapipe")
    photo = shared_image(file).convert("RGB")
    mask = array(annotate("mask", photo, source=source))[..., 0] > 0
    centre, corners = centre_and_corners(mask)
    assert centre > 0.8 and corners < 0.15 and 0.1 < mask.mean() < 0.8


def test_invert_is_named_alone():
    assert parse_options("mask", ["invert"]) == {"invert": True}
    assert parse_options("mask", ["invert", "source=subject"]) == {"invert": True, "source": "subject"}
    with pytest.raises(ControlNextError, match="write it as KEY=VALUE"):
        parse_options("canny", ["low_threshold"])
