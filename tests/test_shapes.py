"""The shapes world: determinism, captions that match the scene, conditions that match the image, the writer."""

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from controlnext.data.shapes import (CONDITION_KINDS, LIMB_COLOURS, PALETTE, SHAPE_KINDS, Shape, ShapesDataset,
                                     ShapesSpec, ShapesWorld, make_sample, read_shapes_metadata, render_condition,
                                     render_image, write_shapes_dataset)
from controlnext.errors import ControlNextError
from controlnext.metrics import binary_f1, binary_map, edge_f1, mask_iou

INDICES = range(12)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("index", [0, 5, 11])
def test_same_seed_and_index_give_the_same_sample(index):
    first, second = make_sample(index, seed=3), make_sample(index, seed=3)
    assert first.caption == second.caption and first.spec == second.spec
    assert np.array_equal(pixels(first.image), pixels(second.image))
    for kind in CONDITION_KINDS:
        assert np.array_equal(pixels(first.conditions[kind]), pixels(second.conditions[kind]))


def test_seed_split_and_index_each_change_the_scene():
    base = ShapesWorld(seed=0)
    specs = {base.spec(0), base.spec(1), base.spec(0, "test"), ShapesWorld(seed=1).spec(0)}
    assert len(specs) == 4


def test_the_splits_do_not_share_scenes():
    world = ShapesWorld(seed=0)
    train, test, validation = ({world.spec(index, split) for index in range(300)}
                               for split in ("train", "test", "validation"))
    assert len(train) == len(test) == len(validation) == 300
    assert not train & test and not train & validation and not test & validation


@pytest.mark.parametrize("index", INDICES)
def test_scene_is_valid(index):
    spec = ShapesWorld(seed=0).spec(index)
    assert 1 <= len(spec.shapes) <= 3
    assert spec.background in PALETTE
    for shape in spec.shapes:
        assert shape.kind in SHAPE_KINDS and shape.colour in PALETTE and shape.colour != spec.background
        assert all(shape.size <= coordinate <= 1 - shape.size for coordinate in shape.centre)
    for first, second in itertools.combinations(spec.shapes, 2):
        distance = np.hypot(first.centre[0] - second.centre[0], first.centre[1] - second.centre[1])
        assert distance > first.size + second.size
    assert [shape.centre[0] for shape in spec.shapes] == sorted(shape.centre[0] for shape in spec.shapes)


@pytest.mark.parametrize("index", INDICES)
def test_caption_names_every_shape_in_order_and_the_background(index):
    sample = make_sample(index)
    caption = sample.caption
    assert caption.endswith(f" {sample.spec.background} background")
    positions = [caption.index(f"{shape.colour} {shape.kind}") for shape in sample.spec.shapes]
    assert positions == sorted(positions)
    words = caption.replace(",", "").split()
    assert sum(word in SHAPE_KINDS for word in words) == len(sample.spec.shapes)
    articles = [(word, words[i + 1]) for i, word in enumerate(words) if word in ("a", "an")]
    assert all(article == ("an" if noun[0] in "aeiou" else "a") for article, noun in articles)


def test_caption_grammar_for_one_two_and_three_shapes():
    captions = {len(make_sample(index).spec.shapes): make_sample(index).caption for index in range(30)}
    assert " and " not in captions[1] and "," not in captions[1]
    assert captions[2].count(" and ") == 1 and "," not in captions[2]
    assert captions[3].count(",") == 1 and captions[3].count(" and ") == 1


@pytest.mark.parametrize("index", INDICES)
def test_image_colours_match_the_spec(index):
    sample = make_sample(index)
    array = np.asarray(sample.image)
    assert tuple(array[0, 0]) == PALETTE[sample.spec.background]
    for shape in sample.spec.shapes:
        x, y = (int(coordinate * 64) for coordinate in shape.centre)
        assert tuple(array[y, x]) == PALETTE[shape.colour]


@pytest.mark.parametrize("index", INDICES)
def test_mask_condition_covers_exactly_the_non_background_pixels(index):
    sample = make_sample(index)
    assert mask_iou(sample.conditions["mask"], sample.image) == pytest.approx(1.0)


@pytest.mark.parametrize("index", INDICES)
def test_canny_condition_matches_canny_of_the_image(index):
    sample = make_sample(index)
    assert edge_f1(sample.conditions["canny"], sample.image, tolerance=1) > 0.95


@pytest.mark.parametrize("index", INDICES)
def test_canny_condition_is_a_thin_boundary_inside_the_mask(index):
    sample = make_sample(index, resolution=128)
    edges, mask = binary_map(sample.conditions["canny"]), binary_map(sample.conditions["mask"])
    assert not (edges & ~mask).any()
    perimeters = {"circle": 2 * np.pi, "square": 4 * np.sqrt(2), "triangle": 3 * np.sqrt(3)}
    perimeter = sum(perimeters[shape.kind] * shape.size * 128 for shape in sample.spec.shapes)
    assert 0.65 * perimeter < edges.sum() < 1.5 * perimeter
    assert set(np.unique(np.asarray(sample.conditions["canny"]))) <= {0, 255}


@pytest.mark.parametrize("index", INDICES)
def test_outline_follows_the_shape_boundaries(index):
    sample = make_sample(index)
    assert binary_f1(binary_map(sample.conditions["outline"]), binary_map(sample.conditions["canny"]), 2) > 0.9


def test_scene_renders_the_same_at_any_resolution():
    spec = ShapesWorld(seed=0, resolution=128).spec(4)
    assert spec == ShapesWorld(seed=0, resolution=64).spec(4)
    large = render_image(spec, 128).resize((64, 64), Image.BOX)
    assert np.abs(pixels(large) - pixels(render_image(spec, 64))).mean() < 2.0


def test_conditions_are_rgb_white_on_black():
    sample = make_sample(2)
    for kind in CONDITION_KINDS:
        image = render_condition(sample.spec, kind)
        assert image.mode == "RGB" and image.size == (64, 64)
        array = np.asarray(image)
        assert array[0, 0].tolist() == [0, 0, 0] and array.max() == 255


@pytest.mark.parametrize("kind, limbs", [("circle", 4), ("square", 4), ("triangle", 3)])
@pytest.mark.parametrize("angle", [0.0, 12.0])
def test_skeleton_joins_the_centre_to_each_keypoint_in_limb_colours(kind, limbs, angle):
    shape = Shape(kind, "red", (0.5, 0.5), 0.3, angle if kind != "circle" else 0.0)
    array = pixels(render_condition(ShapesSpec("white", (shape,)), "skeleton", 128))
    points = shape.keypoints()
    assert len(points) == limbs
    assert np.allclose(np.linalg.norm(points - 0.5, axis=1), 0.3)  # on the circumcircle
    for index, point in enumerate(points):
        middle = np.round((np.asarray(shape.centre) + point) / 2 * 128 - 0.5).astype(int)  # halfway along the limb
        assert array[middle[1], middle[0]].tolist() == list(LIMB_COLOURS[index])
        end = np.round(point * 128 - 0.5).astype(int)
        assert array[end[1], end[0]].tolist() == [255, 255, 255]  # a joint
    assert array[64, 64].tolist() == [255, 255, 255]
    lit = (array.max(axis=2) > 0).mean()
    assert 0.01 < lit < 0.08  # sparse, as a pose map: limbs and joints, nothing filled


def test_skeleton_tells_the_kinds_apart():
    maps = {kind: pixels(render_condition(ShapesSpec("white", (Shape(kind, "red", (0.5, 0.5), 0.3),)), "skeleton"))
            for kind in SHAPE_KINDS}
    for first, second in itertools.combinations(SHAPE_KINDS, 2):
        assert np.abs(maps[first] - maps[second]).mean() > 3


def test_spec_round_trips_through_json():
    spec = make_sample(7).spec
    assert ShapesSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_dataset_items_are_tensors_matching_the_world():
    dataset = ShapesDataset(5, seed=2, split="test", conditions=("mask", "canny"))
    item = dataset[3]
    sample = ShapesWorld(seed=2).sample(3, "test")
    assert len(dataset) == 5 and item["text"] == sample.caption and dataset.spec(3) == sample.spec
    assert item["image"].shape == (3, 64, 64) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert set(item["conditions"]) == {"mask", "canny"}
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["conditions"]["canny"].shape == (4, 3, 64, 64)
    with pytest.raises(IndexError):
        dataset[5]


def test_writer_round_trips(tmp_path):
    write_shapes_dataset(tmp_path, 3, seed=1, conditions=("mask", "canny"), start=10)
    records = read_shapes_metadata(tmp_path)
    assert len(records) == 3
    for offset, record in enumerate(records):
        sample = make_sample(10 + offset, seed=1)
        assert record["text"] == sample.caption and record["spec"] == sample.spec
        assert record["conditioning_image"] == record["mask"]
        assert np.array_equal(pixels(Image.open(record["image"])), pixels(sample.image))
        assert np.array_equal(pixels(Image.open(record["canny"])), pixels(sample.conditions["canny"]))
    first_line = json.loads((tmp_path / "metadata.jsonl").read_text().splitlines()[0])
    assert first_line["image"] == "images/000010.png" and first_line["conditioning_image"] == "mask/000010.png"


@pytest.mark.parametrize("make", [
    lambda: ShapesWorld(resolution=60),
    lambda: ShapesWorld(conditions=("depth",)),
    lambda: ShapesWorld(max_shapes=4),
    lambda: ShapesWorld().spec(0, "dev"),
    lambda: render_condition(make_sample(0).spec, "pose"),
])
def test_bad_input_raises_a_user_error(make):
    with pytest.raises(ControlNextError):
        make()


def test_reading_a_folder_without_metadata_raises_a_user_error(tmp_path):
    with pytest.raises(ControlNextError, match="metadata.jsonl"):
        read_shapes_metadata(tmp_path)


def test_palette_colours_are_far_apart():
    colours = np.array(list(PALETTE.values()), float)
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=2)
    assert distances[~np.eye(len(colours), dtype=bool)].min() > 90


def test_angle_zero_is_upright():
    square = Shape("square", "red", (0.5, 0.5), 0.2).vertices()
    triangle = Shape("triangle", "red", (0.5, 0.5), 0.2).vertices()
    assert len(np.unique(square[:, 0].round(9))) == 2 and len(np.unique(square[:, 1].round(9))) == 2
    apex = triangle[triangle[:, 1].argmin()]
    assert apex[0] == pytest.approx(0.5) and np.allclose(np.sort(triangle[:, 1])[1:], triangle[:, 1].max())


def test_turns_stay_within_max_angle_and_single_shapes_are_large():
    world = ShapesWorld(seed=0, max_angle=10.0)
    specs = [world.spec(index) for index in range(200)]
    assert all(abs(shape.angle) <= 10.0 for spec in specs for shape in spec.shapes)
    singles = [spec.shapes[0].size for spec in specs if len(spec.shapes) == 1]
    assert singles and min(singles) >= world.size_ranges[0][0]
