"""The shapes-world SD3 and its canny control, when shipped: small, loadable by diffusers, and following the edges.

The floor sits well below the edge F1 measured by scripts/quality.py (figures in the README) and far above
what the same model scores without control, on a few held-out scenes so that the check stays quick.
"""

import pytest

from controlnext.control.loading import load_control
from controlnext.evaluation import evaluate_control
from controlnext.models.tiny_sd3 import SD3_BASE_MODEL_DIR
from controlnext.pipelines import ControlledPipeline

CONTROL = SD3_BASE_MODEL_DIR.with_name("sd3-controls") / "canny"
FLOOR, UNCONTROLLED_CEILING = 0.3, 0.25

pytestmark = pytest.mark.skipif(not (CONTROL / "control.json").is_file(),
                                reason="the shapes-world SD3 is not shipped in this checkout")


def test_shipped_sd3_is_small_and_a_diffusers_folder():
    from controlnext.models.tiny_sd3 import load_sd3_base_pipeline

    files = [p for folder in (SD3_BASE_MODEL_DIR, CONTROL) for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 6 * 2**20
    assert type(load_sd3_base_pipeline()).__name__ == "StableDiffusion3Pipeline"


def test_shipped_sd3_canny_control_follows_its_condition():
    pipe = ControlledPipeline.from_pretrained(SD3_BASE_MODEL_DIR)
    pipe = ControlledPipeline(pipe.pipe, [load_control(CONTROL, pipe.denoiser)])
    scores = evaluate_control(pipe, "canny", count=8, steps=10, batch=8)
    assert scores["controlled"] >= FLOOR, scores
    assert scores["uncontrolled"] <= UNCONTROLLED_CEILING, scores
    assert scores["controlled"] >= scores["uncontrolled"] + 0.15


def test_readme_command_draws_the_example_with_the_sd3(tmp_path):
    """The README's `controlnext generate` on the shapes-world SD3 with its canny control."""
    from pathlib import Path

    from PIL import Image

    from controlnext.cli import main
    from controlnext.metrics import detect_shapes, edge_f1

    example = Path(__file__).resolve().parents[1] / "examples" / "circle-64.png"
    output = tmp_path / "sd3.png"
    assert main(["generate", "--base", str(SD3_BASE_MODEL_DIR), "--control", str(CONTROL), "--image", str(example),
                 "--prompt", "a red circle on a blue background", "--guidance", "5", "--output", str(output),
                 "--no-progress"]) == 0
    image = Image.open(output)
    assert image.size == (64, 64) and [(s.kind, s.colour) for s in detect_shapes(image)] == [("circle", "red")]
    assert edge_f1(Image.open(example), image) > 0.5
