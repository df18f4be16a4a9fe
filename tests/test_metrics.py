"""Control-fidelity and shapes-world metrics: 1 for agreement, low for unrelated inputs, robust to input types."""

import cv2
import numpy as np
import pytest
from PIL import Image

from controlnext.data.shapes import PALETTE, SHAPE_KINDS, Shape, ShapesSpec, make_sample, render_condition, render_image
from controlnext.errors import ControlNextError
from controlnext.evaluation import check_targets, grouped_shape_scores
from controlnext.metrics import (background_rgb, binary_f1, binary_iou, canny_edges, classify_shape, detect_shapes,
                                 edge_f1, foreground_mask, interior_noise, mask_iou, mean_shape_scores, nearest_colour,
                                 shape_scores)


def square_map(top: int, left: int, side: int = 8, size: int = 32) -> np.ndarray:
    result = np.zeros((size, size), bool)
    result[top:top + side, left:left + side] = True
    return result


def test_binary_f1_counts_matches_within_the_tolerance():
    line = np.zeros((16, 16), bool)
    line[8, 2:14] = True
    shifted = np.roll(line, 1, axis=0)
    assert binary_f1(line, line, tolerance=0) == 1.0
    assert binary_f1(shifted, line, tolerance=1) == 1.0
    assert binary_f1(shifted, line, tolerance=0) == 0.0
    assert binary_f1(np.roll(line, 5, axis=0), line, tolerance=2) == 0.0


def test_binary_f1_of_empty_maps():
    empty, line = np.zeros((8, 8), bool), np.eye(8, dtype=bool)
    assert binary_f1(empty, empty) == 1.0 and binary_f1(empty, line) == 0.0 and binary_f1(line, empty) == 0.0


def test_binary_iou_values():
    assert binary_iou(square_map(0, 0), square_map(0, 0)) == 1.0
    assert binary_iou(square_map(0, 0), square_map(16, 16)) == 0.0
    assert binary_iou(square_map(0, 0), square_map(0, 4)) == pytest.approx(32 / 96)
    assert binary_iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0


def test_maps_of_different_sizes_raise_a_user_error():
    with pytest.raises(ControlNextError):
        binary_iou(np.zeros((4, 4)), np.zeros((5, 5)))
    with pytest.raises(ControlNextError):
        binary_f1(np.zeros((4, 4)), np.zeros((5, 5)))


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_edge_f1_is_one_for_the_image_own_edges_and_low_for_another_image(index):
    image, other = make_sample(index).image, make_sample(index + 10).image
    own_edges = Image.fromarray(canny_edges(image).astype(np.uint8) * 255)
    assert edge_f1(own_edges, image) == 1.0
    assert edge_f1(render_condition(make_sample(index + 10).spec, "canny"), image) < 0.3


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_mask_iou_is_one_for_the_own_mask_and_low_for_another(index):
    sample = make_sample(index)
    assert mask_iou(sample.conditions["mask"], sample.image) == 1.0
    assert mask_iou(make_sample(index + 10).conditions["mask"], sample.image) < 0.5


def test_flat_image_has_no_edges_and_no_foreground():
    flat = np.full((32, 32, 3), 200, np.uint8)
    black = np.zeros((32, 32), np.uint8)
    assert edge_f1(black, flat) == 1.0 and mask_iou(black, flat) == 1.0
    assert edge_f1(np.full((32, 32), 255, np.uint8), flat) == 0.0


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_interior_noise_is_zero_for_flat_shapes_and_rises_with_speckle(index):
    image = np.asarray(make_sample(index, resolution=128).image).copy()
    assert interior_noise(image) == 0.0
    inside = np.argwhere(foreground_mask(image))
    spots = np.random.default_rng(index).choice(len(inside), len(inside) // 20, replace=False)
    speckled = image.copy()
    for y, x in inside[spots]:  # dark 2 x 2 spots on 5% of the shapes' pixels, as over-guided controls draw
        speckled[y:y + 2, x:x + 2] = speckled[y:y + 2, x:x + 2] // 3
    assert interior_noise(speckled) > 0.02
    blurred = cv2.GaussianBlur(image, (5, 5), 0)  # soft edges alone are not speckle
    assert interior_noise(blurred) < 0.2 * interior_noise(speckled)


def test_interior_noise_of_an_image_without_shapes_is_zero():
    assert interior_noise(np.full((32, 32, 3), 90, np.uint8)) == 0.0


@pytest.mark.parametrize("convert", [
    lambda image: image,
    lambda image: np.asarray(image),
    lambda image: np.asarray(image).astype(np.float32) / 255.0,
    lambda image: np.asarray(image.convert("L")),
])
def test_metrics_accept_pil_images_and_arrays(convert):
    sample = make_sample(5)
    mask, canny = sample.conditions["mask"], sample.conditions["canny"]
    assert mask_iou(convert(mask), sample.image) == 1.0
    assert edge_f1(convert(canny), sample.image) == pytest.approx(edge_f1(canny, sample.image))
    if convert(mask) is not mask and np.ndim(convert(mask)) == 3:
        assert mask_iou(mask, convert(sample.image)) == 1.0


def test_foreground_counts_a_blended_rim_pixel_only_when_it_is_mostly_shape():
    image = np.zeros((9, 9, 3), np.float32)
    image[4, 2:7] = 1.0
    image[4, 1] = 0.4
    image[4, 7] = 0.6
    foreground = foreground_mask(image)
    assert foreground[4, 2:8].all() and not foreground[4, 1] and foreground.sum() == 6


@pytest.mark.parametrize("name", list(PALETTE))
def test_nearest_colour_names_palette_colours_even_when_off_a_little(name):
    rgb = np.array(PALETTE[name], float)
    assert nearest_colour(rgb) == name
    assert nearest_colour(np.clip(rgb + [18, -18, 12], 0, 255)) == name


@pytest.mark.parametrize("kind", SHAPE_KINDS)
@pytest.mark.parametrize("size", [0.13, 0.3])
@pytest.mark.parametrize("angle", [0.0, 20.0, 45.0])
def test_classify_shape_recognises_rendered_shapes(kind, size, angle):
    spec = ShapesSpec("black", (Shape(kind, "white", (0.5, 0.5), size, angle),))
    mask = np.asarray(render_condition(spec, "mask"))[..., 0] >= 128
    assert classify_shape(mask) == kind


@pytest.mark.parametrize("index", range(8))
def test_shape_scores_are_perfect_for_the_rendered_scene(index):
    sample = make_sample(index)
    assert shape_scores(sample.image, sample.spec) == {"background": 1.0, "colour": 1.0, "kind": 1.0, "shape": 1.0,
                                                       "count": 1.0, "kind_in_place": 1.0, "colour_in_place": 1.0}
    found = detect_shapes(sample.image)
    assert [(shape.colour, shape.kind) for shape in found] == [(s.colour, s.kind) for s in sample.spec.shapes]


def test_shape_scores_of_a_wrong_picture_are_low():
    spec = ShapesSpec("white", (Shape("circle", "red", (0.3, 0.3), 0.2), Shape("square", "blue", (0.7, 0.7), 0.2)))
    wrong = ShapesSpec("black", (Shape("triangle", "green", (0.5, 0.5), 0.25),))
    scores = shape_scores(render_image(wrong), spec)
    assert scores == {"background": 0.0, "colour": 0.0, "kind": 0.0, "shape": 0.0, "count": 0.0,
                      "kind_in_place": 0.0, "colour_in_place": 0.0}
    blank = shape_scores(Image.new("RGB", (64, 64), PALETTE["white"]), spec)
    assert blank["background"] == 1.0 and blank["colour"] == 0.0 and blank["count"] == 0.0


def test_shape_scores_give_partial_credit():
    spec = ShapesSpec("white", (Shape("circle", "red", (0.3, 0.3), 0.2), Shape("square", "blue", (0.7, 0.7), 0.2)))
    half = ShapesSpec("white", (Shape("circle", "red", (0.3, 0.3), 0.2), Shape("triangle", "green", (0.7, 0.7), 0.2)))
    scores = shape_scores(render_image(half), spec)
    assert scores == {"background": 1.0, "colour": 0.5, "kind": 0.5, "shape": 0.5, "count": 1.0,
                      "kind_in_place": 0.5, "colour_in_place": 0.5}


SCENE = ShapesSpec("white", (Shape("circle", "red", (0.25, 0.3), 0.15), Shape("square", "blue", (0.72, 0.7), 0.18)))


@pytest.mark.parametrize("drawn, kind_in_place, colour_in_place", [
    # the scene itself
    (SCENE, 1.0, 1.0),
    # the right shapes, colours swapped between places: every colour found somewhere, none in place
    (ShapesSpec("white", (Shape("circle", "blue", (0.25, 0.3), 0.15), Shape("square", "red", (0.72, 0.7), 0.18))),
     1.0, 0.0),
    # a disc of the right colour and size at every place: placement without shape
    (ShapesSpec("white", (Shape("circle", "red", (0.25, 0.3), 0.15), Shape("circle", "blue", (0.72, 0.7), 0.18))),
     0.5, 1.0),
    # the right shapes, drawn elsewhere
    (ShapesSpec("white", (Shape("circle", "red", (0.7, 0.25), 0.15), Shape("square", "blue", (0.25, 0.72), 0.18))),
     0.0, 0.0),
    # off by a fifth of the size: still in place
    (ShapesSpec("white", (Shape("circle", "red", (0.28, 0.3), 0.15), Shape("square", "blue", (0.72, 0.66), 0.18))),
     1.0, 1.0),
])
def test_in_place_scores_need_the_right_shape_at_the_right_place(drawn, kind_in_place, colour_in_place):
    scores = shape_scores(render_image(drawn, 128), SCENE)
    assert (scores["kind_in_place"], scores["colour_in_place"]) == (kind_in_place, colour_in_place)
    if drawn.shapes[0].colour == "blue":  # swapped colours still score as found anywhere
        assert scores["colour"] == 1.0 and scores["kind"] == 1.0


def test_mean_shape_scores_average_over_images():
    samples = [make_sample(index) for index in range(3)]
    wrong_specs = [samples[0].spec, samples[1].spec, ShapesSpec("purple", samples[2].spec.shapes)]
    scores = mean_shape_scores([sample.image for sample in samples], wrong_specs)
    assert scores["background"] == pytest.approx(2 / 3) and all(0.0 <= value <= 1.0 for value in scores.values())
    with pytest.raises(ControlNextError):
        mean_shape_scores([samples[0].image], wrong_specs)


def test_background_colour_is_the_border_median():
    image = np.zeros((20, 20, 3), np.uint8)
    image[:] = PALETTE["orange"]
    image[0, :5] = PALETTE["blue"]
    assert nearest_colour(background_rgb(image)) == "orange"


def test_grouped_shape_scores_split_scenes_by_shape_count():
    samples = [make_sample(index) for index in range(12)]
    specs = [sample.spec for sample in samples]
    # every one-shape scene drawn empty, on another background
    wrong = [render_image(ShapesSpec("white" if spec.background != "white" else "black", ()), 64)
             if len(spec.shapes) == 1 else sample.image for spec, sample in zip(specs, samples)]
    groups = grouped_shape_scores(wrong, specs)
    counts = {name: sum(len(spec.shapes) == count for spec in specs)
              for count, name in ((1, "one_shape"), (2, "two_shapes"), (3, "three_shapes"))}
    assert groups["all"]["scenes"] == 12 and all(groups[name]["scenes"] == n for name, n in counts.items() if n)
    assert groups["one_shape"]["kind_in_place"] == 0.0 and groups["one_shape"]["background"] == 0.0
    assert all(groups[name]["kind_in_place"] == 1.0 for name in ("two_shapes", "three_shapes") if counts[name])
    assert groups["all"]["kind"] == pytest.approx(1 - counts["one_shape"] / 12)


@pytest.mark.parametrize("value, met", [(0.95, True), (0.9, True), (0.899, False), (None, False)])
def test_targets_are_met_at_their_least_value_and_missed_when_not_measured(value, met):
    report = {"base": {"one_shape": {"background": 1.0, "colour": 1.0, "kind": 1.0}}, "controls": {}}
    if value is not None:
        report["controls"]["canny"] = {"controlled": value, "controlled_kind_in_place": 1.0,
                                       "controlled_colour_in_place": 1.0}
    targets = {target["target"]: target for target in check_targets(report)}
    edge = targets["canny control: edge F1 at 1 px"]
    assert (edge["value"], edge["met"]) == (value, met)
    assert targets["no control: shape kind, one-shape captions"]["met"]
