"""A synthetic world of coloured shapes, in the spirit of fill50k: images, captions and exact conditions.

Every sample is drawn from a seeded random stream (world seed, split, index), so sample i of a world is
the same on every machine. Geometry is kept in units of the image side, so one scene renders at any
resolution. Images are anti-aliased by supersampling; the conditions are rendered from the geometry
itself, never by running a detector on the image:

- "canny":   one-pixel boundary of every shape, white on black (what a canny map of the image looks like);
- "mask":    the filled shapes, white on black;
- "outline": the shapes' outlines drawn with a pen of about 1/32 of the image side;
- "skeleton": what a pose map is to a person: each shape's keypoints (its centre and its corners; for a
  circle the four points of its rim on the axes) as white dots, joined to the centre by limbs of one
  colour per limb (the first limb points at the first corner), on black.

Scenes hold one to three shapes that do not overlap, on a background of another colour; squares and
triangles stand nearly upright (turned by at most `max_angle` degrees) and a shape alone is drawn
larger, so that a small model can learn each kind. Captions list the shapes from left to right: "a red
circle, a blue square and a green triangle on a white background". The "train", "test" and "validation"
splits are separate random streams of the same world (validation: for choosing among trained models, so
that the test scenes judge only the choice).

`write_shapes_dataset` writes a folder laid out as

    images/000000.png    canny/000000.png    mask/000000.png    outline/000000.png    skeleton/000000.png
    metadata.jsonl

with one JSON line per sample: {"image", "conditioning_image" (the first condition kind written),
"text", one column per condition kind ("canny": "canny/000000.png", ...), "spec"}; paths are relative
to the folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ControlNextError
from ..images import check_size, pil_to_tensor

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 25, 35),
    "green": (30, 165, 55),
    "blue": (30, 70, 215),
    "yellow": (245, 220, 40),
    "orange": (245, 125, 15),
    "purple": (135, 45, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPE_KINDS = ("circle", "square", "triangle")
CONDITION_KINDS = ("canny", "mask", "outline", "skeleton")
SPLITS = {"train": 0, "test": 1, "validation": 2}

_VERTEX_COUNTS = {"square": 4, "triangle": 3}
_MARGIN = 0.03  # free border around shapes, in units of the image side
_GAP = 0.05  # least free space between two shapes
_OUTLINE_WIDTH = 1 / 32
_LIMB_WIDTH = 1 / 32
_JOINT_RADIUS = 1 / 40
# one colour per limb, as pose maps colour theirs: limb k of every shape has colour k
LIMB_COLOURS = ((255, 60, 60), (60, 220, 60), (70, 110, 255), (255, 200, 40))


@dataclass(frozen=True)
class Shape:
    """One shape: kind, colour name, centre (x, y) and circumradius in units of the image side, angle in degrees."""

    kind: str
    colour: str
    centre: tuple[float, float]
    size: float
    angle: float = 0.0

    def vertices(self) -> np.ndarray:
        """Corners of a square or triangle, (n, 2) in units of the image side."""
        count = _VERTEX_COUNTS[self.kind]
        upright = -np.pi / 2 + (np.pi / count if count % 2 == 0 else 0.0)  # angle 0: flat base, edges axis-aligned
        turns = upright + np.deg2rad(self.angle) + 2 * np.pi * np.arange(count) / count  # (n,)
        return np.stack([self.centre[0] + self.size * np.cos(turns), self.centre[1] + self.size * np.sin(turns)], 1)

    def keypoints(self) -> np.ndarray:
        """The skeleton's ends, (n, 2): the corners, or for a circle the rim's points on the axes (right first)."""
        if self.kind != "circle":
            return self.vertices()
        turns = np.pi / 2 * np.arange(4)  # (4,)
        return np.stack([self.centre[0] + self.size * np.cos(turns), self.centre[1] + self.size * np.sin(turns)], 1)

    def signed_distance(self, points: np.ndarray) -> np.ndarray:
        """Distance of points (..., 2) to the boundary, negative inside (exact inside; mitred corners outside)."""
        offsets = points - np.asarray(self.centre)  # (..., 2)
        if self.kind == "circle":
            return np.linalg.norm(offsets, axis=-1) - self.size
        corners = self.vertices()  # (n, 2)
        edges = np.roll(corners, -1, axis=0) - corners  # (n, 2)
        normals = np.stack([edges[:, 1], -edges[:, 0]], 1) / np.linalg.norm(edges, axis=1, keepdims=True)  # (n, 2)
        apothem = self.size * np.cos(np.pi / len(corners))
        return (offsets @ normals.T).max(axis=-1) - apothem  # (...)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class ShapesSpec:
    """A scene: background colour name and shapes ordered from left to right."""

    background: str
    shapes: tuple[Shape, ...]

    def caption(self) -> str:
        """'a red circle, a blue square and a green triangle on a white background'."""
        names = [f"{_article(shape.colour)} {shape.colour} {shape.kind}" for shape in self.shapes]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"{listed} on {_article(self.background)} {self.background} background"

    def to_dict(self) -> dict:
        return {"background": self.background, "shapes": [asdict(shape) for shape in self.shapes]}

    @classmethod
    def from_dict(cls, data: dict) -> ShapesSpec:
        shapes = tuple(
            Shape(s["kind"], s["colour"], tuple(s["centre"]), s["size"], s.get("angle", 0.0)) for s in data["shapes"]
        )
        return cls(data["background"], shapes)


@dataclass(frozen=True)
class ShapesSample:
    """An image, its caption, its conditions (one per kind asked for) and the scene behind them."""

    image: Image.Image
    caption: str
    conditions: dict[str, Image.Image]
    spec: ShapesSpec


@dataclass(frozen=True)
class ShapesWorld:
    """A seeded world of scenes: `sample(i, split)` is the same for the same seed on every machine."""

    seed: int = 0
    resolution: int = 64
    max_shapes: int = 3
    # circumradius ranges for scenes of one, two and three shapes, so that single shapes are drawn large
    size_ranges: tuple[tuple[float, float], ...] = ((0.2, 0.3), (0.15, 0.21), (0.12, 0.2))
    max_angle: float = 15.0  # squares and triangles turn by up to this many degrees either way
    supersample: int = 5
    conditions: tuple[str, ...] = field(default=CONDITION_KINDS)

    def __post_init__(self):
        check_size(self.resolution, self.resolution, what="shapes image")
        check_condition_kinds(self.conditions)
        if not 1 <= self.max_shapes <= 3:
            raise ControlNextError(f"max_shapes={self.max_shapes} is out of range; pick 1, 2 or 3")

    def spec(self, index: int, split: str = "train") -> ShapesSpec:
        """The scene of sample `index` of `split` ("train", "test" or "validation")."""
        if split not in SPLITS:
            raise ControlNextError(f"unknown split {split!r}; pick one of {sorted(SPLITS)}")
        rng = np.random.default_rng([self.seed, SPLITS[split], index])
        return random_spec(rng, self.max_shapes, self.size_ranges, self.max_angle)

    def sample(self, index: int, split: str = "train") -> ShapesSample:
        spec = self.spec(index, split)
        image = render_image(spec, self.resolution, self.supersample)
        conditions = {kind: render_condition(spec, kind, self.resolution, self.supersample) for kind in self.conditions}
        return ShapesSample(image, spec.caption(), conditions, spec)

    def samples(self, count: int, split: str = "train", start: int = 0) -> Iterator[ShapesSample]:
        for index in range(start, start + count):
            yield self.sample(index, split)


def make_sample(index: int, seed: int = 0, split: str = "train", resolution: int = 64) -> ShapesSample:
    """Sample `index` of the world with `seed`, with all condition kinds."""
    return ShapesWorld(seed=seed, resolution=resolution).sample(index, split)


def check_condition_kinds(kinds: Sequence[str]) -> None:
    unknown = [kind for kind in kinds if kind not in CONDITION_KINDS]
    if unknown or not kinds:
        raise ControlNextError(f"unknown condition kinds {unknown or list(kinds)}; pick from {list(CONDITION_KINDS)}")


def random_spec(rng: np.random.Generator, max_shapes: int, size_ranges: Sequence[tuple[float, float]],
                max_angle: float) -> ShapesSpec:
    """Draw a background, then one to `max_shapes` shapes of other colours that neither overlap nor leave the image."""
    background = str(rng.choice(list(PALETTE)))
    shape_colours = [name for name in PALETTE if name != background]
    count = int(rng.integers(1, max_shapes + 1))
    shapes: list[Shape] = []
    low, high = size_ranges[count - 1]
    while len(shapes) < count:
        for _attempt in range(200):
            size = float(rng.uniform(low, high))
            centre = rng.uniform(size + _MARGIN, 1 - size - _MARGIN, size=2)
            if all(np.hypot(*(centre - other.centre)) >= size + other.size + _GAP for other in shapes):
                break
        else:  # no room at this size: shrink the range and draw again
            low, high = low * 0.9, high * 0.9
            continue
        kind = str(rng.choice(SHAPE_KINDS))
        colour = str(rng.choice(shape_colours))
        angle = float(rng.uniform(-max_angle, max_angle)) if kind != "circle" else 0.0
        shapes.append(Shape(kind, colour, (float(centre[0]), float(centre[1])), size, angle))
    shapes.sort(key=lambda shape: shape.centre[0])
    return ShapesSpec(background, tuple(shapes))


def coverage(shape: Shape, resolution: int, supersample: int = 5, pen_width: float | None = None) -> np.ndarray:
    """Fraction of each pixel inside the shape, or with `pen_width` within pen_width / 2 of its boundary, (R, R).

    Anti-aliasing by supersampling: s x s points per pixel, looked at only near the shape.
    """
    reach = shape.size + (pen_width or 0.0)
    (x0, x1), (y0, y1) = [(max(int(np.floor((c - reach) * resolution)) - 1, 0),
                           min(int(np.ceil((c + reach) * resolution)) + 1, resolution)) for c in shape.centre]
    step = 1.0 / (resolution * supersample)
    xs = (np.arange(x0 * supersample, x1 * supersample) + 0.5) * step
    ys = (np.arange(y0 * supersample, y1 * supersample) + 0.5) * step
    points = np.stack(np.meshgrid(xs, ys), -1)  # (h*s, w*s, 2)
    distance = shape.signed_distance(points)  # (h*s, w*s)
    hits = distance <= 0 if pen_width is None else np.abs(distance) <= pen_width / 2
    blocks = hits.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))  # (h, w)
    result = np.zeros((resolution, resolution), np.float32)
    result[y0:y1, x0:x1] = blocks
    return result


def segment_coverage(start: np.ndarray, end: np.ndarray, width: float, resolution: int,
                     supersample: int = 5) -> np.ndarray:
    """Fraction of each pixel within width / 2 of the segment start-end (units of the image side), (R, R).

    Supersampled as `coverage`, looked at only in the segment's box."""
    reach = width / 2
    (x0, x1), (y0, y1) = [(max(int(np.floor((min(a, b) - reach) * resolution)) - 1, 0),
                           min(int(np.ceil((max(a, b) + reach) * resolution)) + 1, resolution))
                          for a, b in zip(start, end)]
    step = 1.0 / (resolution * supersample)
    xs = (np.arange(x0 * supersample, x1 * supersample) + 0.5) * step
    ys = (np.arange(y0 * supersample, y1 * supersample) + 0.5) * step
    points = np.stack(np.meshgrid(xs, ys), -1)  # (h*s, w*s, 2)
    direction = end - start
    along = np.clip(((points - start) @ direction) / max(float(direction @ direction), 1e-12), 0.0, 1.0)  # (h*s, w*s)
    distance = np.linalg.norm(points - (start + along[..., None] * direction), axis=-1)  # (h*s, w*s)
    hits = distance <= reach
    result = np.zeros((resolution, resolution), np.float32)
    result[y0:y1, x0:x1] = hits.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))
    return result


def render_skeleton(spec: ShapesSpec, resolution: int = 64, supersample: int = 5) -> Image.Image:
    """The scene's skeleton map: coloured limbs from each centre to its keypoints, white joints, on black."""
    canvas = np.zeros((resolution, resolution, 3), np.float32)
    for shape in spec.shapes:
        centre = np.asarray(shape.centre)
        for index, point in enumerate(shape.keypoints()):
            alpha = segment_coverage(centre, point, _LIMB_WIDTH, resolution, supersample)[..., None]  # (R, R, 1)
            canvas += alpha * (np.asarray(LIMB_COLOURS[index], np.float32) - canvas)
        for point in (centre, *shape.keypoints()):
            alpha = segment_coverage(point, point, 2 * _JOINT_RADIUS, resolution, supersample)[..., None]
            canvas += alpha * (255.0 - canvas)
    return Image.fromarray(np.round(canvas).astype(np.uint8))


def render_image(spec: ShapesSpec, resolution: int = 64, supersample: int = 5) -> Image.Image:
    """Paint the scene: flat colours on the background, anti-aliased edges."""
    canvas = np.empty((resolution, resolution, 3), np.float32)
    canvas[:] = PALETTE[spec.background]
    for shape in spec.shapes:
        alpha = coverage(shape, resolution, supersample)[..., None]  # (R, R, 1)
        canvas += alpha * (np.asarray(PALETTE[shape.colour], np.float32) - canvas)  # (R, R, 3)
    return Image.fromarray(np.round(canvas).astype(np.uint8))


def render_condition(spec: ShapesSpec, kind: str, resolution: int = 64, supersample: int = 5) -> Image.Image:
    """Render a condition kind ("canny", "mask", "outline": white on black; "skeleton": coloured) as RGB."""
    check_condition_kinds([kind])
    if kind == "skeleton":
        return render_skeleton(spec, resolution, supersample)
    values = np.zeros((resolution, resolution), np.float32)
    for shape in spec.shapes:
        if kind == "mask":
            values = np.maximum(values, coverage(shape, resolution, supersample))
        elif kind == "outline":
            values = np.maximum(values, coverage(shape, resolution, supersample, pen_width=_OUTLINE_WIDTH))
        else:  # canny: the pixels of the shape's own digital area that touch a pixel outside it
            inside = coverage(shape, resolution, supersample) >= 0.5
            padded = np.pad(inside, 1)
            interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & inside
            values[inside & ~interior] = 1.0
    grey = np.round(values * 255).astype(np.uint8)  # (R, R)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


class ShapesDataset(torch.utils.data.Dataset):
    """`count` samples of a world as tensors: {"image": (3, R, R), "conditions": {kind: (3, R, R)}, "text", "index"}.

    Image and conditions are in [0, 1]; `spec(i)` gives the scene of item i.
    """

    def __init__(self, count: int, seed: int = 0, split: str = "train", resolution: int = 64,
                 conditions: Sequence[str] = CONDITION_KINDS, start: int = 0):
        self.world = ShapesWorld(seed=seed, resolution=resolution, conditions=tuple(conditions))
        self.count, self.split, self.start = count, split, start

    def __len__(self) -> int:
        return self.count

    def spec(self, item: int) -> ShapesSpec:
        return self.world.spec(self.start + item, self.split)

    def __getitem__(self, item: int) -> dict:
        if not 0 <= item < self.count:
            raise IndexError(item)
        sample = self.world.sample(self.start + item, self.split)
        return {
            "image": pil_to_tensor(sample.image),
            "conditions": {kind: pil_to_tensor(image) for kind, image in sample.conditions.items()},
            "text": sample.caption,
            "index": self.start + item,
        }


def write_shapes_dataset(folder: str | Path, count: int, seed: int = 0, split: str = "train", resolution: int = 64,
                         conditions: Sequence[str] = CONDITION_KINDS, start: int = 0) -> Path:
    """Save `count` samples as PNGs plus metadata.jsonl (layout in the module docstring); return the metadata path."""
    world = ShapesWorld(seed=seed, resolution=resolution, conditions=tuple(conditions))
    folder = Path(folder)
    for name in ("images", *conditions):
        (folder / name).mkdir(parents=True, exist_ok=True)
    metadata = folder / "metadata.jsonl"
    with metadata.open("w") as lines:
        for index in range(start, start + count):
            sample = world.sample(index, split)
            stem = f"{index:06d}.png"
            sample.image.save(folder / "images" / stem)
            record = {"image": f"images/{stem}", "conditioning_image": f"{conditions[0]}/{stem}",
                      "text": sample.caption}
            for kind, image in sample.conditions.items():
                image.save(folder / kind / stem)
                record[kind] = f"{kind}/{stem}"
            record["spec"] = sample.spec.to_dict()
            lines.write(json.dumps(record) + "\n")
    return metadata


def read_shapes_metadata(folder: str | Path) -> list[dict]:
    """Records of a folder written by `write_shapes_dataset`, with absolute paths and `spec` as a ShapesSpec."""
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise ControlNextError(f"no metadata.jsonl in {folder}; write one with write_shapes_dataset")
    records = []
    for line in metadata.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("text", "spec"):
                record[key] = str(folder / value)
        if "spec" in record:
            record["spec"] = ShapesSpec.from_dict(record["spec"])
        records.append(record)
    return records
