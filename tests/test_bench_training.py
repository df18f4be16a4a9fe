"""Training benchmarks: the convergence summary, the training-cost measure, their report, the CLI."""

import argparse
import csv
import json

import pytest
from PIL import Image

from controlnext.bench.convergence import ConvergenceSetup, plot_curves, read_curve, run_convergence, summarize
from controlnext.bench.report import render_markdown, update_results
from controlnext.bench.training_cost import measure_training_cost
from controlnext.errors import ControlNextError
from training_helpers import TINY_MODULE

# curve -> (steps to 90% of the final fidelity, plateau steps, rise steps, sudden)
SUMMARIES = {
    "flat then a jump (ControlNet-like)": ([(0, 0.1), (100, 0.1), (200, 0.11), (300, 0.1), (400, 0.6), (500, 0.6),
                                            (600, 0.6)], 400, 400, 0, True),
    "fast, then saturating (ControlNeXt-like)": ([(0, 0.1), (100, 0.55), (200, 0.58), (300, 0.6), (400, 0.6),
                                                  (500, 0.6)], 100, 100, 0, False),
    "steady climb": ([(0, 0.0), (100, 0.2), (200, 0.4), (300, 0.6), (400, 0.8), (500, 1.0), (600, 1.0),
                      (700, 1.0)], 500, 100, 400, False),
    "never rises": ([(0, 0.5), (100, 0.4), (200, 0.3), (300, 0.3), (400, 0.3)], 0, None, None, False),
    "flat (its mean rounds above the start)": ([(step, 0.1) for step in range(0, 700, 100)], 0, None, None, False),
}


@pytest.mark.parametrize("name", SUMMARIES)
def test_convergence_summary(name):
    curve, to_90, plateau, rise, sudden = SUMMARIES[name]
    summary = summarize(curve)
    assert summary["final"] == pytest.approx(sum(v for _, v in curve[-3:]) / 3)
    assert (summary["steps_to_90"], summary["plateau_steps"], summary["rise_steps"], summary["sudden"]) == (
        to_90, plateau, rise, sudden)


def test_summary_of_no_validations_is_an_error():
    with pytest.raises(ControlNextError, match="no validation points"):
        summarize([])


def test_read_curve_takes_validation_rows_and_the_median_speed(tmp_path):
    path = tmp_path / "log.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, ["step", "loss", "steps_per_second", "fidelity_mask_iou"])
        writer.writeheader()
        writer.writerows([{"step": 0, "fidelity_mask_iou": 0.1}, {"step": 1, "loss": 1, "steps_per_second": 3.0},
                          {"step": 2, "loss": 1, "steps_per_second": 1.0, "fidelity_mask_iou": 0.4},
                          {"step": 3, "loss": 1, "steps_per_second": 2.0}])
    assert read_curve(path, "mask_iou") == ([(0, 0.1), (2, 0.4)], 2.0)


TINY_ARCHITECTURE = {
    "name": "tiny", "controlnext_variant": None, "module_config": TINY_MODULE,
    "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                 norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}


def test_training_cost_runs_each_method_in_its_own_process():
    result = measure_training_cost(TINY_ARCHITECTURE, resolution=64, steps=2, warmup=1, device="cpu",
                                   log=lambda *_: None)
    cnx, cn = result["methods"]["controlnext"], result["methods"]["controlnet"]
    assert result["architecture"] == "tiny" and result["device"] == "cpu"
    for run in (cnx, cn):
        assert len(run["step_seconds"]) == 2 and min(run["step_seconds"]) > 0
        assert run["peak_bytes"] >= run["built_bytes"] > 0
    assert 0 < cnx["trainable"] < cn["trainable"]
    assert result["time_ratio"] == pytest.approx(cnx["median"] / cn["median"])


def test_convergence_run_on_a_tiny_base(tiny_base, tmp_path):
    setup = ConvergenceSetup(base=str(tiny_base), kind="mask", steps=2, validate_every=1, batch_size=2,
                             module_config=TINY_MODULE, validation_count=2, sampling_steps=2, learning_rate=1e-3)
    assert setup.label == "mask-lr0.001-0.001" and ConvergenceSetup(kind="mask").label == "mask"
    result = run_convergence(setup, tmp_path, log=lambda *_: None)
    assert result["setup"]["metric"] == "mask_iou" and 0 <= result["uncontrolled"] <= 1
    for method in ("controlnext", "controlnet"):
        run = result["methods"][method]
        assert [step for step, _ in run["curve"]] == [0, 1, 2] and run["trainable"] > 0
        assert (tmp_path / f"{setup.label}-{method}" / "control.json").is_file()
    assert result["methods"]["controlnet"]["curve"][0][1] == pytest.approx(result["uncontrolled"])  # zero convs
    assert len(list((tmp_path / "validation_conditions").glob("mask-*.png"))) == 2
    plot = plot_curves(result, tmp_path / "plot.png")
    assert Image.open(plot).size[0] > 300

    machine = {"cpu": "test cpu", "cpu_count": 2, "load_average": [1.0], "python": "3", "versions": {"torch": "x"},
               "date": "today"}
    cost = measure_training_cost(TINY_ARCHITECTURE, resolution=64, steps=1, warmup=0, device="cpu",
                                 log=lambda *_: None)
    path = tmp_path / "results.json"
    update_results(path, training_cost={**cost, "machine": machine})
    results = update_results(path, convergence=result)
    assert set(json.loads(path.read_text())["convergence"]) == {setup.label}
    text = render_markdown(results)
    assert "## Training cost" in text and "| tiny | 64 px, batch 1 | cpu" in text
    assert "## Convergence on the shapes world" in text and f"benchmarks/convergence-{setup.label}.png" in text
    assert f"| {setup.label} | mask_iou |" in text and "| 2 |" in text


def test_cli_convergence_flags_and_bad_values():
    from controlnext.cli import bench

    parent = argparse.ArgumentParser(add_help=False)
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"), parent)
    args = parser.parse_args(["bench", "--convergence", "--kind", "canny", "mask", "--steps", "300"])
    assert args.convergence and args.kind == ["canny", "mask"] and args.steps == 300 and args.batch_size is None
    with pytest.raises(ControlNextError, match="--steps must be positive"):
        bench.run(parser.parse_args(["bench", "--convergence", "--steps", "0"]))
    with pytest.raises(ControlNextError, match="unknown condition kind 'skeleton'"):
        ConvergenceSetup(kind="skeleton").metric  # scored against the scene's mask, not against itself


def test_common_bar_counts_a_run_that_never_reaches_it():
    from controlnext.bench.convergence import compare

    fast = [(0, 0.1), (100, 0.5), (200, 0.6), (300, 0.6), (400, 0.6)]
    slow = [(0, 0.1), (100, 0.1), (200, 0.1), (300, 0.2), (400, 0.3)]
    result = compare({"methods": {"controlnext": {"curve": fast, **summarize(fast)},
                                  "controlnet": {"curve": slow, **summarize(slow)}}})
    assert result["common_bar"] == pytest.approx(0.54)
    assert result["methods"]["controlnext"]["steps_to_common_bar"] == 200
    assert result["methods"]["controlnet"]["steps_to_common_bar"] is None
    assert result["speedup_to_90"] == pytest.approx(300 / 200)  # its own low final flatters the slow run
