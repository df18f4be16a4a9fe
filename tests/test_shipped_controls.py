"""The controls shipped with the embedded default model: they must really place and shape the objects.

Floors sit well below the fidelity measured by scripts/quality.py (figures in the README) and far above
what the same model scores without control, on a few held-out scenes so that the check stays quick.
"""

import pytest
import torch

from controlnext.control.loading import load_control
from controlnext.evaluation import evaluate_control
from controlnext.metrics import IN_PLACE_SCORES
from controlnext.pipelines import ControlledPipeline
from controlnext.pipelines.base import BUNDLED_CONTROLS, DEFAULT_BASE

# kind -> (floor with control, ceiling of the uncontrolled score): measured values in the README
FLOORS = {"canny": (0.5, 0.2), "mask": (0.7, 0.4), "skeleton": (0.7, 0.45)}


def shipped(kind: str) -> bool:
    return (DEFAULT_BASE / "model_index.json").is_file() and (BUNDLED_CONTROLS / kind / "control.json").is_file()


@pytest.fixture(scope="module")
def base_pipe():
    pipe = ControlledPipeline.from_pretrained(None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", FLOORS)
def test_shipped_control_follows_its_condition(base_pipe, kind):
    if not shipped(kind):
        pytest.skip(f"the {kind} control is not shipped in this checkout")
    pipe = ControlledPipeline(base_pipe.pipe, [load_control(BUNDLED_CONTROLS / kind, base_pipe.pipe.unet)])
    scores = evaluate_control(pipe, kind, count=8, steps=10, batch=8)
    floor, uncontrolled_ceiling = FLOORS[kind]
    assert scores["controlled"] >= floor, scores
    assert scores["uncontrolled"] <= uncontrolled_ceiling, scores
    assert scores["controlled"] >= scores["uncontrolled"] + 0.25
    groups = scores["controlled_in_place_by_count"]  # the per-count breakdown adds up to the whole
    assert sum(group["scenes"] for group in groups.values()) == 8
    for key in IN_PLACE_SCORES:
        assert sum(group[key] * group["scenes"] for group in groups.values()) / 8 == pytest.approx(
            scores[f"controlled_{key}"])


@pytest.mark.parametrize("kind", FLOORS)
def test_shipped_control_draws_flat_shapes_at_the_default_guidance(base_pipe, kind):
    """Over-trained controls speckle the inside of shapes as guidance grows; at the guidance `generate` uses when
    neither the user nor a control names one (higher than the shipped controls recommend) a shipped control keeps
    them about as flat as the model draws them without control."""
    from controlnext.request import DEFAULT_GUIDANCE as guidance

    if not shipped(kind):
        pytest.skip(f"the {kind} control is not shipped in this checkout")
    pipe = ControlledPipeline(base_pipe.pipe, [load_control(BUNDLED_CONTROLS / kind, base_pipe.pipe.unet)])
    scores = evaluate_control(pipe, kind, count=8, steps=10, batch=8, guidance=guidance)
    assert scores["controlled_interior_noise"] < 1.8 * scores["uncontrolled_interior_noise"], scores


def test_shipped_canny_follows_edges_closer_at_the_guidance_it_recommends(base_pipe):
    """The canny control records the guidance that follows edges best (scripts/README.md's sweep), which
    `generate` uses when given none: well above the edge F1 of the default guidance."""
    from controlnext.request import DEFAULT_GUIDANCE

    if not shipped("canny"):
        pytest.skip("the canny control is not shipped in this checkout")
    control = load_control(BUNDLED_CONTROLS / "canny", base_pipe.pipe.unet)
    assert control.guidance is not None and 1 < control.guidance < DEFAULT_GUIDANCE
    pipe = ControlledPipeline(base_pipe.pipe, [control])
    recommended, default = (evaluate_control(pipe, "canny", count=8, steps=10, batch=8, guidance=guidance)["controlled"]
                            for guidance in (control.guidance, DEFAULT_GUIDANCE))
    assert recommended >= default + 0.1, (recommended, default)


def test_images_started_from_the_scenes_keep_most_of_their_edges():
    """`strength` starts from the real scenes, barely noised here: with or without control the images keep the
    scenes' edges, unlike images drawn from noise without control (edge F1 below 0.2)."""
    if not shipped("canny"):
        pytest.skip("the canny control is not shipped in this checkout")
    pipe = ControlledPipeline.from_pretrained(None, [BUNDLED_CONTROLS / "canny"], task="img2img")
    pipe.set_progress_bar_config(disable=True)
    scores = evaluate_control(pipe, "canny", count=4, steps=20, batch=4, strength=0.1, guidance=1.5)
    assert scores["controlled"] > 0.85 and scores["uncontrolled"] > 0.85, scores


@pytest.mark.parametrize("kind", FLOORS)
def test_shipped_control_is_small_safetensors_for_this_base(kind):
    if not shipped(kind):
        pytest.skip(f"the {kind} control is not shipped in this checkout")
    files = list((BUNDLED_CONTROLS / kind).iterdir())
    assert all(path.suffix in (".json", ".safetensors") for path in files), files
    assert sum(path.stat().st_size for path in files) < 4 * 2**20  # the module and the trained base tensors
    control = load_control(BUNDLED_CONTROLS / kind, ControlledPipeline.from_pretrained(None).pipe.unet)
    assert control.method == "controlnext" and next(control.model.parameters()).dtype == torch.float32


def test_readme_command_draws_the_example(tmp_path):
    """`controlnext generate` without --base: the embedded default with the bundled canny control."""
    from pathlib import Path

    from PIL import Image

    from controlnext.cli import main
    from controlnext.metrics import detect_shapes, edge_f1

    if not shipped("canny"):
        pytest.skip("the canny control is not shipped in this checkout")
    example = Path(__file__).resolve().parents[1] / "examples" / "circle.png"
    output = tmp_path / "circle.png"
    assert main(["generate", "--control", "canny", "--image", str(example), "--prompt",
                 "a red circle on a blue background", "--output", str(output), "--no-progress"]) == 0
    image = Image.open(output)
    shapes = detect_shapes(image)
    side = Image.open(example).size[0]  # written at the model's own size
    assert image.size == (side, side) and [(s.kind, s.colour) for s in shapes] == [("circle", "red")]
    assert abs(shapes[0].centre[0] - side / 2) < side / 10 and abs(shapes[0].centre[1] - side / 2) < side / 10
    assert edge_f1(Image.open(example), image) > 0.4


def run_quality(monkeypatch, *arguments) -> None:
    """Run scripts/quality.py with these arguments in this process."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "quality.py"
    monkeypatch.setattr(sys, "argv", [str(script), *arguments])
    threads = torch.get_num_threads()  # the script sets its own
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)


def test_a_shared_floor_scores_as_one_made_for_the_control(base_pipe):
    """quality.py generates the uncontrolled images once for every control: the scores must not change."""
    from controlnext.evaluation import uncontrolled_images

    if not shipped("canny"):
        pytest.skip("the canny control is not shipped in this checkout")
    pipe = ControlledPipeline(base_pipe.pipe, [load_control(BUNDLED_CONTROLS / "canny", base_pipe.pipe.unet)])
    sampling = dict(count=4, steps=4, batch=2, seed=3)
    floor = uncontrolled_images(base_pipe, **sampling)
    assert evaluate_control(pipe, "canny", uncontrolled=floor, **sampling) == evaluate_control(pipe, "canny", **sampling)
    with pytest.raises(ValueError, match="3 uncontrolled images for 4 held-out scenes"):
        evaluate_control(pipe, "canny", uncontrolled=floor[:3], **sampling)


def test_quality_script_at_scale_zero_scores_the_uncontrolled_images(tmp_path, monkeypatch):
    """`quality.py --scale 0` switches every control off: its 'with control' figures are the base model's."""
    import json

    if not shipped("canny"):
        pytest.skip("the canny control is not shipped in this checkout")
    report = tmp_path / "quality.json"
    run_quality(monkeypatch, "--count", "2", "--steps", "2", "--no-base", "--scale", "0", "--controls", "canny",
                "--json", str(report))  # the shipped one
    figures = json.loads(report.read_text())
    canny = figures["controls"]["canny"]
    assert figures["scale"] == 0
    for key in ("kind_in_place", "colour_in_place", "kind", "colour", "interior_noise"):
        assert canny[f"controlled_{key}"] == canny[f"uncontrolled_{key}"], key
    assert canny["controlled"] == canny["uncontrolled"]


@pytest.mark.parametrize("controls", [["bogus"], ["canny", "edges=runs/x"]])
def test_quality_script_refuses_an_unknown_control_kind_in_one_line(controls, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        run_quality(monkeypatch, "--count", "1", "--controls", *controls)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "unknown kind" in message and "\n" not in message and controls[-1].split("=")[0] in message


def test_quality_script_samples_with_the_scheduler_it_is_given(tmp_path, monkeypatch):
    """`--scheduler` picks the sampler as `generate` names it; without it, the base's own (DDIM here)."""
    import json

    if not shipped("canny"):
        pytest.skip("the canny control is not shipped in this checkout")
    reports = {}
    for name in (None, "euler"):
        report = tmp_path / f"{name}.json"
        run_quality(monkeypatch, "--count", "2", "--steps", "3", "--no-base", "--controls", "canny",
                    "--json", str(report), *(["--scheduler", name] if name else []))
        reports[name] = json.loads(report.read_text())
    assert reports[None]["scheduler"] == "DDIMScheduler" and reports["euler"]["scheduler"] == "EulerDiscreteScheduler"
    assert reports[None]["controls"]["canny"]["controlled"] != reports["euler"]["controls"]["canny"]["controlled"]


def test_quality_script_refuses_a_scheduler_the_base_cannot_sample_with_in_one_line(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        run_quality(monkeypatch, "--count", "1", "--no-base", "--scheduler", "heun")  # flow matching: SD3 only
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bars
    assert message.startswith("quality.py: error: --scheduler heun: unknown scheduler")
