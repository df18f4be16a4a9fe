"""Write the example condition images in examples/ from the shapes world's renderer (deterministic), at the
embedded default model's size."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlnext.data.shapes import Shape, ShapesSpec, render_condition  # noqa: E402
from controlnext.request import DEFAULT_BASE, configured_size  # noqa: E402


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# file stem -> (scene, condition kinds to write)
SCENES = {
    "circle": (ShapesSpec("blue", (Shape("circle", "red", (0.5, 0.5), 0.28),)), ("canny", "mask")),
    "square-and-triangle": (ShapesSpec("white", (Shape("square", "green", (0.28, 0.62), 0.2),
                                                 Shape("triangle", "yellow", (0.72, 0.4), 0.21))),
                            ("canny", "mask", "skeleton")),
}


def main() -> None:
    EXAMPLES.mkdir(exist_ok=True)
    side = configured_size(DEFAULT_BASE)[0]
    for stem, (spec, kinds) in SCENES.items():
        for kind in kinds:
            name = f"{stem}.png" if kind == "canny" else f"{stem}-{kind}.png"
            render_condition(spec, kind, side).save(EXAMPLES / name)
        if stem == "circle":  # the shapes-world SD3 draws at 64 px
            render_condition(spec, "canny", 64).save(EXAMPLES / "circle-64.png")
        print(f"{stem}: {spec.caption()}")


if __name__ == "__main__":
    main()
