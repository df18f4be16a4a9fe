"""Training data: (image, condition, caption) examples from a folder, a Hugging Face dataset or Python.

Every source is indexable, so the data order is a seeded function of the position in the stream of
examples, and a resumed run continues exactly where the checkpoint left off. Images of another size
than the training resolution are resized so that the short side equals it, then centre-cropped (the
condition likewise, or it is made from the cropped image by an annotator).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.shapes import CONDITION_KINDS
from ..errors import ControlNextError, MissingDependencyError
from ..images import cover_and_crop_box, load_image, open_image, pil_to_tensor, resize_and_crop, to_rgb, upright
from .config import TrainConfig

Example = tuple[Image.Image, Image.Image | None, str]  # image, condition (None: made by --annotator), caption

# Generated data sets by name (`--data NAME`): name -> factory(config) returning a sequence of examples or a
# callable(index) -> example. The synthetic shapes world plugs in with one line here.
GENERATED_DATA: dict[str, Callable[[TrainConfig], Sequence[Example] | Callable[[int], Example]]] = {}


def shapes_world(kind: str) -> Callable[[TrainConfig], Callable[[int], Example]]:
    """`--data shapes-KIND`: the synthetic shapes world's training split with its KIND condition."""

    def factory(config: TrainConfig) -> Callable[[int], Example]:
        from ..data.shapes import ShapesWorld

        world = ShapesWorld(resolution=config.resolution, conditions=(kind,))

        def example(index: int) -> Example:
            sample = world.sample(index, "train")
            return sample.image, sample.conditions[kind], sample.caption

        return example

    return factory


GENERATED_DATA.update({f"shapes-{kind}": shapes_world(kind) for kind in CONDITION_KINDS})


def derive_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (seed, rank, counter, ...)."""
    words = np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


# -- sources ------------------------------------------------------------------------------------------

class PythonExamples:
    """Examples given in Python: a sequence, a callable(index) with a length, or an iterable (read up to length)."""

    def __init__(self, examples: Sequence[Example] | Callable[[int], Example] | Iterable[Example], length: int):
        if callable(examples) and not hasattr(examples, "__getitem__"):
            self.get, self.length = examples, length
        else:
            if not (hasattr(examples, "__getitem__") and hasattr(examples, "__len__")):
                examples = list(itertools.islice(examples, length))
            self.get, self.length = examples.__getitem__, len(examples)
        self.name = "the given examples"

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Example:
        example = self.get(index)
        if not (isinstance(example, (tuple, list)) and len(example) == 3):
            raise ControlNextError(f"example {index} of {self.name} is not an (image, condition, caption) triple")
        return tuple(example)


class Rows:
    """Rows with named columns (a metadata.jsonl folder or a Hugging Face dataset) -> examples."""

    def __init__(self, name: str, rows, columns: list[str], config: TrainConfig, root: Path | None = None):
        self.name, self.rows, self.root = name, rows, root
        if len(rows) == 0:
            raise ControlNextError(f"data set {name} is empty; it needs at least one example")
        self.image_column = config.image_column
        self.condition_column = None if config.annotator else config.conditioning_image_column
        self.caption_column = config.caption_column
        for option, column in (("image-column", self.image_column), ("caption-column", self.caption_column),
                               ("conditioning-image-column", self.condition_column)):
            if column is not None and column not in columns:
                raise ControlNextError(f"data set {name} has no column {column!r} (columns: {', '.join(columns)}); "
                                       f"pass --{option}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Example:
        row = self.rows[index]
        image = _as_image(row[self.image_column], self.root, f"{self.name} row {index}")
        condition = None
        if self.condition_column is not None:
            condition = _as_image(row[self.condition_column], self.root, f"{self.name} row {index}")
        caption = row[self.caption_column]
        caption = caption[0] if isinstance(caption, list) and caption else caption
        return image, condition, "" if caption is None else str(caption)


def read_metadata(folder: Path) -> tuple[list[dict], list[str]]:
    """The rows of folder/metadata.jsonl and the union of their keys."""
    rows = []
    with open(folder / "metadata.jsonl", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ControlNextError(f"{folder / 'metadata.jsonl'} line {number} is not JSON ({error})") from None
            if not isinstance(row, dict):
                raise ControlNextError(f"{folder / 'metadata.jsonl'} line {number} is not a JSON object")
            rows.append(row)
    columns = sorted(set().union(*rows)) if rows else []
    return rows, columns


def load_hf_dataset(path: Path):
    """A dataset saved with save_to_disk, a parquet file, or a folder of parquet files -> datasets.Dataset."""
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("datasets", "train") from None
    try:
        if path.is_dir() and not any(path.rglob("*.parquet")):
            data = datasets.load_from_disk(str(path))
        else:
            files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
            data = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except (OSError, ValueError, FileNotFoundError) as error:
        raise ControlNextError(f"cannot read the data set {path}: {str(error).splitlines()[0]}") from None
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    return data


def open_source(config: TrainConfig, examples=None):
    """The configured data as an indexable source of examples; raise for missing, unreadable or empty data."""
    path = Path(config.data)
    if examples is not None:
        source = PythonExamples(examples, config.generated_examples)
    elif not path.exists() and config.data in GENERATED_DATA:
        source = PythonExamples(GENERATED_DATA[config.data](config), config.generated_examples)
        source.name = f"generated data set {config.data!r}"
    elif path.is_dir() and (path / "metadata.jsonl").is_file():
        rows, columns = read_metadata(path)
        source = Rows(str(path), rows, columns, config, root=path)
    elif _is_hf_data(path):
        data = load_hf_dataset(path)
        source = Rows(str(path), data, list(data.column_names), config, root=path if path.is_dir() else path.parent)
    elif path.exists():
        raise ControlNextError(f"--data {path}: no metadata.jsonl, saved Hugging Face dataset or parquet files there")
    else:
        known = f"; generated data sets: {', '.join(GENERATED_DATA)}" if GENERATED_DATA else ""
        raise ControlNextError(f"--data {config.data}: no such folder or file{known}")
    if len(source) == 0:
        raise ControlNextError(f"data set {source.name} is empty; it needs at least one example")
    return source


def _is_hf_data(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".parquet"
    saved = ("dataset_info.json", "dataset_dict.json", "state.json")
    return path.is_dir() and (any((path / name).is_file() for name in saved) or any(path.rglob("*.parquet")))


def _as_image(value: Any, root: Path | None, where: str) -> Image.Image:
    """A PIL image, a {"bytes", "path"} record (Hugging Face datasets) or a path relative to the data folder."""
    if isinstance(value, Image.Image):
        return upright(value)
    if isinstance(value, dict) and value.get("bytes"):
        return open_image(value["bytes"], where)
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, (str, Path)):
        path = Path(value)
        return load_image(path if path.is_absolute() or root is None else root / path)
    raise ControlNextError(f"{where}: cannot read an image from a value of type {type(value).__name__}")


# -- examples -> tensors ----------------------------------------------------------------------------------

class ControlDataset(torch.utils.data.Dataset):
    """Examples as training tensors at one square resolution (resize the short side, centre-crop)."""

    def __init__(self, source, resolution: int, annotator: str | None = None):
        self.source, self.resolution, self.annotator = source, resolution, annotator
        if annotator:
            annotation_function()  # fail now, not in a worker

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        image, condition, caption = self.source[index]
        size = self.resolution
        image = to_rgb(image)
        original_size = (image.height, image.width)
        _, crop_top_left = cover_and_crop_box(image.width, image.height, size, size)
        image = resize_and_crop(image, size, size) if image.size != (size, size) else image
        if self.annotator:  # made from the cropped image: annotated at the size it trains at
            condition = to_rgb(annotation_function()(self.annotator, image, **worker_options(self.annotator)))
        elif condition is None:
            raise ControlNextError(f"example {index} has no condition image; give one or pass --annotator")
        condition = to_rgb(condition)
        condition = resize_and_crop(condition, size, size) if condition.size != (size, size) else condition
        return {
            "pixel_values": pil_to_tensor(image) * 2 - 1,  # (3, H, W) in [-1, 1]
            "conditioning": pil_to_tensor(condition),  # (3, H, W) in [0, 1]
            "caption": caption,
            "original_size": torch.tensor(original_size),  # (2,) height, width
            "crop_top_left": torch.tensor(crop_top_left),  # (2,) top, left
        }


def annotation_function():
    try:
        from ..annotators import annotate
    except ImportError:
        raise ControlNextError("--annotator needs controlnext.annotators, which this installation lacks") from None
    return annotate


def worker_options(annotator: str) -> dict:
    """Options for an annotator run in a forked data-loading process, which cannot use a GPU that the trainer
    has started: an annotator with a `device` option (a learned model) runs there on the CPU."""
    if torch.utils.data.get_worker_info() is None:
        return {}
    from ..annotators import get_annotator

    return {"device": "cpu"} if "device" in get_annotator(annotator).options else {}


def collate(items: list[dict]) -> dict:
    return {key: [item[key] for item in items] if key == "caption" else torch.stack([item[key] for item in items])
            for key in items[0]}


class StreamBatchSampler(torch.utils.data.Sampler):
    """Endless batches of one process's share of a seeded stream of indices (a fresh permutation each epoch).

    Global micro-batch k holds stream positions [k * B * world, (k + 1) * B * world); process r takes its
    B of them, so the order depends only on (seed, position) and resuming at a position repeats it.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self._permutations: dict[int, torch.Tensor] = {}

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._permutations = {epoch: torch.randperm(self.n, generator=generator)}
        return int(self._permutations[epoch][offset])

    def __iter__(self):
        position = self.start + self.rank * self.batch_size
        while True:
            yield [self.index_at(position + j) for j in range(self.batch_size)]
            position += self.batch_size * self.world_size


def make_loader(dataset: ControlDataset, config: TrainConfig, rank: int, world_size: int, start: int, pin_memory=False):
    """An endless DataLoader for this process, starting at stream position `start`."""
    sampler = StreamBatchSampler(len(dataset), config.batch_size, config.seed, rank, world_size, start)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                       collate_fn=collate, pin_memory=pin_memory)
