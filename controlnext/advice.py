"""Warnings for input a model cannot use well: words its tokenizer never saw, a size it was not trained at, a colour
photo given as an edge map. They are notes, not errors: the generation still runs. The CLI prints them on stderr,
the web app shows them; nothing here imports torch.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from PIL import Image

from .request import DEFAULT_BASE

TRAINING_CONFIG = "training_config.json"  # written beside a base model by the project's base-model script
EDGE_CONTROLS = {"canny", "lineart", "scribble", "softedge", "lines", "edge", "edges", "hed", "mlsd", "outline"}
COLOURFUL_CHROMA = 48  # max - min of a pixel's channels above which it counts as coloured
COLOURFUL_SHARE = 0.05  # an edge map has (almost) no coloured pixels


@lru_cache(maxsize=8)
def trained_vocabulary(base: str | None) -> frozenset[str] | None:
    """Words the tokenizer of a base trained by this project saw whole (None: not such a base; any tokenizer then).

    Its BPE was learnt on the training captions alone, so a word it saw is one whole-word token; the pieces BPE
    learnt on the way to a word ("ircle", "ed" of "red") are the ends of longer ones, and single characters are
    its alphabet ("a" aside).
    """
    folder = Path(base) if base is not None else DEFAULT_BASE
    vocab_file = folder / "tokenizer" / "vocab.json"
    if not (folder / TRAINING_CONFIG).is_file() or not vocab_file.is_file():
        return None
    whole = [t[:-4] for t in json.loads(vocab_file.read_text()) if t.endswith("</w>") and t[:-4].isascii()]
    words = {w for w in whole if len(w) > 1 and not any(o != w and o.endswith(w) for o in whole)}
    return frozenset(words | {"a"} & set(whole))


def trained_resolution(base: str | None) -> int | None:
    """The image side a base trained by this project was trained at (None: not such a base)."""
    folder = Path(base) if base is not None else DEFAULT_BASE
    try:
        return int(json.loads((folder / TRAINING_CONFIG).read_text())["config"]["model"]["resolution"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def unknown_words(prompt: str, base: str | None) -> list[str]:
    """The prompt's words the base's tokenizer never saw in training ([] when it cannot tell)."""
    known = trained_vocabulary(base)
    if known is None:
        return []
    words = re.findall(r"[a-z]+", prompt.lower())
    return list(dict.fromkeys(w for w in words if w not in known))


def prompt_note(prompt: str, base: str | None) -> str | None:
    unknown = unknown_words(prompt, base)
    if not unknown:
        return None
    known = sorted(trained_vocabulary(base))
    return (f"the base model never saw {', '.join(repr(w) for w in unknown)} in training; it knows only: "
            f"{', '.join(known)} (e.g. 'a red circle on a blue background')")


def size_note(width: int | None, height: int | None, base: str | None) -> str | None:
    side = trained_resolution(base)
    if side is None or (width or side, height or side) == (side, side):
        return None
    return f"the base model was trained at {side}x{side} pixels only; at {width or side}x{height or side} it draws poorly"


def is_edge_control(control: str) -> bool:
    return bool(set(re.split(r"[^a-z0-9]+", Path(str(control)).name.lower())) & EDGE_CONTROLS)


def is_colourful(image: Image.Image) -> bool:
    """True for a colour photo or drawing, False for an edge map, a mask or a grey image."""
    small = image.convert("RGB")
    small.thumbnail((256, 256))
    pixels = list(small.getdata())
    coloured = sum(1 for r, g, b in pixels if max(r, g, b) - min(r, g, b) > COLOURFUL_CHROMA)
    return coloured > COLOURFUL_SHARE * len(pixels)


def condition_note(control: str, annotator: str, image: Image.Image) -> str | None:
    if annotator != "none" or not is_edge_control(control) or not is_colourful(image):
        return None
    name = Path(str(control)).name
    return (f"control {name!r} expects an edge map, but its condition is a colour image used as is; make the edges "
            "with an annotator (--annotator canny; in the web UI, the unit's Annotator)")
