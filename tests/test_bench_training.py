"""Training benchmarks: the convergence summary, the training-cost measure, their report, the CLI."""

import argparse
import csv
import json
from dataclasses import replace

import pytest
from PIL import Image

from controlnext.bench.convergence import (ConvergenceSetup, ConvergenceStudy, aggregate_recipe, delete_large_files,
                                          finished_result, plan_runs, plot_curves, plot_study, read_curve, study_figure,
                                          run_convergence, run_study, run_summary, spread, summarize)
from controlnext.bench.report import render_markdown, spread_text, update_results
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
    "never rises": ([(0, 0.5), (100, 0.4), (200, 0.3), (300, 0.3), (400, 0.3)], None, None, None, False),
    "flat (its mean rounds above the start)": ([(step, 0.1) for step in range(0, 700, 100)], None, None, None, False),
    "a rise within validation noise": ([(0, 0.20), (100, 0.21), (200, 0.19), (300, 0.22), (400, 0.21),
                                        (500, 0.22)], None, None, None, False),
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
    with pytest.raises(ControlNextError, match="unknown condition kind 'depth'"):
        bench.run(parser.parse_args(["bench", "--convergence", "--kind", "depth"]))
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


# -- the convergence study -------------------------------------------------------------------------------------------

# per-seed values -> (median, least, greatest, not reached)
SPREADS = {
    "three reached": ([300, 100, 200], 200, 100, 300, 0),
    "one of three not reached": ([100, None, 300], 300, 100, None, 1),
    "two of three not reached": ([None, 100, None], None, 100, None, 2),
    "none reached": ([None, None, None], None, None, None, 3),
    "even count": ([100, 200], 150, 100, 200, 0),
    "half of an even count not reached": ([100, None], None, 100, None, 1),
    "fidelities": ([0.4, 0.7, 0.5, 0.6], 0.55, 0.4, 0.7, 0),
}


@pytest.mark.parametrize("name", SPREADS)
def test_spread_over_seeds(name):
    values, median, least, greatest, missing = SPREADS[name]
    result = spread(values)
    assert result["median"] == (pytest.approx(median) if median is not None else None)
    assert (result["min"], result["max"], result["not_reached"], result["count"]) == (
        least, greatest, missing, len(values))


def test_spread_text_names_what_is_not_reached():
    assert spread_text(spread([100, 300, 200]), 600) == "200 (100-300)"
    assert spread_text(spread([100, None, 300]), 600) == "300 (100 to not within 600 steps)"
    assert spread_text(spread([None, 100, None]), 600) == "not reached (100 to not within 600 steps)"
    assert spread_text(spread([None, None]), 600) == "not within 600 steps (all 2)"
    assert spread_text(spread([0.4, 0.6, 0.5])) == "0.500 (0.400-0.600)"


def jump(at: int | None, low: float = 0.1, high: float = 0.6, last: int = 600) -> list[tuple[int, float]]:
    """A curve validated every 100 steps: `low` before step `at`, `high` from it on (None: never)."""
    return [(step, high if at is not None and step >= at else low) for step in range(0, last + 1, 100)]


def hand_runs(jumps: list[int | None]) -> list[dict]:
    return [{"seed": seed, "curve": jump(at), "summary": run_summary(jump(at)), "trainable": 10,
             "steps_per_second": 2.0, "minutes": 1.0} for seed, at in enumerate(jumps)]


@pytest.mark.parametrize("rise, rose", [(0.0, False), (0.015, False), (0.025, True), (0.3, True)])
def test_a_run_rises_only_beyond_the_noise(rise, rose):
    summary = run_summary(jump(300, low=0.3, high=0.3 + rise))
    assert (summary["onset"] is not None, summary["steps_to_90"] is not None, summary["sudden"]) == (rose, rose, rose)


# ControlNeXt's and ControlNet's jump steps per seed -> (verdict, the figures the sentence gives for the common bar)
VERDICTS = {
    "6x sooner, both reach the bar": ([100, 100, 200], [500, 600, None], "holds",
                                      "ControlNeXt 100, ControlNet 600 (6.0x)"),
    "ControlNet's median misses the bar, bound above 5x": ([100, 100, 100], [None, None, 600], "holds",
                                                          "ControlNeXt 100, ControlNet not within 600 steps (more than "
                                                          "6.0x)"),
    "ControlNet's median misses the bar, bound below 5x": ([200, 200, 200], [None, None, None], "cannot be told",
                                                          "ControlNeXt 200, ControlNet not within 600 steps (more than "
                                                          "3.0x)"),
    "only 1.5x sooner": ([100, 200, 300], [200, 300, 400], "does not hold", "ControlNeXt 200, ControlNet 300 (1.5x)"),
    "ControlNeXt never rises": ([None, None, None], [100, 100, 200], "does not hold",
                                "ControlNeXt not within 600 steps, ControlNet 100 (no ratio)"),
    "neither rises above the floor": ([None, None, None], [None, None, None], "cannot be told",
                                      "ControlNeXt 0, ControlNet 0 (0.0x)"),
}


@pytest.mark.parametrize("name", VERDICTS)
def test_study_aggregation_and_the_5x_sentence(name):
    fast, slow, verdict, figures = VERDICTS[name]
    result = aggregate_recipe("canny", "paper", {"controlnext": hand_runs(fast), "controlnet": hand_runs(slow)}, 600,
                              floor=0.1)
    sentence = result["sentence"]
    assert sentence.startswith("canny, paper recipe: \"ControlNeXt converges at least 5x sooner\" " + verdict + ".")
    assert f"Median steps to the common bar ({result['common_bar']:.3f}" in sentence and f"): {figures};" in sentence
    assert ("not above the uncontrolled floor" in sentence) == (result["common_bar"] <= 0.1)


def test_study_aggregation_figures():
    result = aggregate_recipe("mask", "common", {"controlnext": hand_runs([100, 100, 200]),
                                                 "controlnet": hand_runs([500, 600, None])}, 600, floor=0.1)
    cnx, cn = result["methods"]["controlnext"], result["methods"]["controlnet"]
    assert cnx["final"]["median"] == pytest.approx(0.6) and cn["final"]["median"] == pytest.approx(0.8 / 3)
    assert (cn["final"]["min"], cn["final"]["max"]) == (pytest.approx(0.1), pytest.approx(1.3 / 3))
    assert result["common_bar"] == pytest.approx(0.54)
    assert (cnx["onset"]["median"], cn["onset"]["median"], cn["onset"]["not_reached"]) == (100, 600, 1)
    # a flat run did not rise: it has no 90% step (it would sit at 90% of its own low final from step 0)
    assert (cn["steps_to_90"]["min"], cn["steps_to_90"]["median"], cn["steps_to_90"]["not_reached"]) == (500, 600, 1)
    assert cn["steps_to_common_bar"]["median"] == 600 and cnx["steps_to_common_bar"]["median"] == 100
    assert (cnx["sudden"], cn["sudden"]) == (1, 2)
    assert result["ratio_steps_to_90"] == {"value": 6.0, "lower_bound": False}
    assert result["ratio_onset"] == {"value": 6.0, "lower_bound": False}
    assert [run["seed"] for run in cn["runs"]] == [0, 1, 2] and cn["trainable"] == 10
    one = aggregate_recipe("mask", "common", {"controlnet": hand_runs([500])}, 600, floor=0.1)
    assert one["sentence"] == "mask, common recipe: one method only, no comparison."


@pytest.mark.parametrize("change, message", [
    (dict(steps=0), "--steps must be positive"), (dict(jobs=0), "--jobs must be positive"),
    (dict(recipes=("paper", "fast")), "unknown recipe 'fast'; pick from paper, common"),
    (dict(kinds=("depth",)), "unknown kind 'depth'"), (dict(kinds=("skeleton",)), "unknown kind 'skeleton'"),
    (dict(seeds=(0, 0)), "each named once"), (dict(seeds=()), "at least one"),
])
def test_study_refuses_bad_values(change, message):
    with pytest.raises(ControlNextError, match=message):
        ConvergenceStudy(**change).check()


def test_convergence_study_on_a_tiny_base(tiny_base, tmp_path):
    study = ConvergenceStudy(base=str(tiny_base), kinds=("mask",), seeds=(0, 1), steps=2, validate_every=1,
                             batch_size=2, validation_count=2, sampling_steps=2, module_config=TINY_MODULE)
    lines = []
    result = run_study(study, tmp_path, log=lines.append)
    assert result["setup"]["resolution"] == 64  # the tiny base's own size
    entry = result["kinds"]["mask"]
    assert entry["metric"] == "mask_iou" and set(entry["recipes"]) == {"paper", "common"}
    for recipe in entry["recipes"].values():
        assert recipe["sentence"].startswith("mask, ")
        for method, aggregate in recipe["methods"].items():
            assert [run["seed"] for run in aggregate["runs"]] == [0, 1] and aggregate["trainable"] > 0
            assert all([step for step, _ in run["curve"]] == [0, 1, 2] for run in aggregate["runs"])
        # zero convolutions: ControlNet starts as the base, and every seed is validated alike
        for run in recipe["methods"]["controlnet"]["runs"]:
            assert run["curve"][0][1] == pytest.approx(entry["uncontrolled"])
    results = sorted(tmp_path.glob("mask/*/*-seed*/result.json"))
    assert len(results) == 8 and (tmp_path / "mask" / f"paper-{study.steps}" / "controlnet-seed1" / "log.csv").is_file()
    stored = json.loads(results[0].read_text())
    assert {"curve", "steps_per_second", "minutes", "trainable", "summary", "key"} <= set(stored)
    assert "onset" in stored["summary"] and "plateau_steps" not in stored["summary"]

    # a rerun keeps every finished run; a changed setting makes a run stale
    written = {path: path.stat().st_mtime_ns for path in results}
    lines.clear()
    again = run_study(study, tmp_path, log=lines.append)
    assert sum("skipped" in line for line in lines) == 8 and not any("training" in line for line in lines)
    assert {path: path.stat().st_mtime_ns for path in results} == written
    assert again["kinds"] == result["kinds"]
    images = sorted(str(path) for path in (tmp_path / "mask" / "validation_conditions").glob("*.png"))
    plan = [stored["key"]["base_digest"], images, stored["key"]["validation_prompts"], tmp_path / "mask"]
    shared = study.sharing(tmp_path)
    assert all(finished_result(run) is not None for run in plan_runs(shared, "mask", 64, *plan))
    changed = replace(shared, guidance_scale=3.0)
    assert all(finished_result(run) is None for run in plan_runs(changed, "mask", 64, *plan))
    longer = {run.output for run in plan_runs(replace(shared, steps=3), "mask", 64, *plan)}
    assert not longer & {run.output for run in plan_runs(shared, "mask", 64, *plan)}  # a longer study keeps these
    # the summary is made again from the stored curve, by today's rules
    first = plan_runs(shared, "mask", 64, *plan)[0]
    stale = json.loads((tmp_path / first.output / "result.json").read_text()) | {"summary": {"onset": -1}}
    (tmp_path / first.output / "result.json").write_text(json.dumps(stale))
    assert finished_result(first)["summary"] == run_summary([tuple(point) for point in stale["curve"]])
    assert len(list((tmp_path / "latent-cache").rglob("*.safetensors"))) <= study.examples  # each scene once
    assert stored["deleted"] == []  # small weights stay

    # in two processes: the runs without a result file are trained again
    for name in ("controlnext-seed0", "controlnet-seed1"):
        (tmp_path / "mask" / f"common-{study.steps}" / name / "result.json").unlink()
    lines.clear()
    parallel = run_study(replace(study, jobs=2), tmp_path, log=lines.append)
    assert sum("skipped" in line for line in lines) == 6 and any("training 2 runs, 2 at once" in line for line in lines)
    assert len(list(tmp_path.glob("mask/*/*-seed*/result.json"))) == 8
    assert parallel["kinds"]["mask"]["recipes"]["common"]["methods"]["controlnet"]["runs"][1]["curve"][0][1] == (
        pytest.approx(entry["uncontrolled"]))

    plot = plot_study(result, "mask", tmp_path / "study.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert Image.open(plot).size[0] > 900  # two panels
    one_panel = json.loads(json.dumps(result))
    one_panel["kinds"]["mask"]["recipes"].pop("common")
    from matplotlib import pyplot

    for shown in (result, one_panel):  # every title and label inside the figure, with one panel or two
        figure = study_figure(shown, "mask")
        figure.canvas.draw()
        renderer, box = figure.canvas.get_renderer(), figure.bbox
        texts = [figure._suptitle] + [text for axes in figure.axes for text in
                                      (axes.title, axes.xaxis.label, axes.yaxis.label)]
        for text in texts:
            extent = text.get_window_extent(renderer)
            assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1 and extent.y1 <= box.y1 + 1, text.get_text()
        pyplot.close(figure)

    # studies of other recipes or steps are kept side by side; a file with the former single study is read
    label = f"paper-common-{study.steps}"
    longer = json.loads(json.dumps(result))
    longer["setup"]["steps"], longer["recipes"] = 9, {"paper": result["recipes"]["paper"]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"convergence": {"canny": {}, "mask-lr0.001-0.001": {}, "sd3-canny": {}},
                                "convergence_study": longer}))
    results = update_results(path, convergence_study=result)
    assert set(results["convergence"]) == {"sd3-canny"}
    assert list(json.loads(path.read_text())["convergence_studies"]) == ["paper-9", label]
    text = render_markdown({"convergence_studies": results["convergence_studies"]})
    assert text.count("## Convergence study on the shapes world") == 2 and "paper recipes, 9 steps" in text
    assert f"## Convergence study on the shapes world: paper and common recipes, {study.steps} steps" in text
    assert f"benchmarks/convergence-study-{label}-mask.png" in text and "convergence-study-paper-9-mask.png" in text
    assert "### mask (mask_iou; no control" in text and "- `paper`: each paper's own" in text
    assert "| common | ControlNet |" in text and recipe["sentence"] in text


def test_only_large_weight_files_of_a_finished_run_are_deleted(tmp_path):
    for name, size in (("diffusion_pytorch_model.safetensors", 100), ("unet.safetensors", 10),
                       ("checkpoint-2/optimizer.pt", 100), ("log.csv", 100), ("control.json", 100)):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    deleted = delete_large_files(tmp_path, limit=50)
    assert deleted == ["checkpoint-2/optimizer.pt", "diffusion_pytorch_model.safetensors"]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["control.json", "log.csv", "unet.safetensors"]


def study_arguments(argv):
    from controlnext.cli import bench

    parent = argparse.ArgumentParser(add_help=False)
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"), parent)
    return bench, parser.parse_args(["bench", "--convergence-study", *argv])


def test_cli_convergence_study_flags():
    bench, args = study_arguments([])
    assert bench.study_from_args(args) == ConvergenceStudy()
    bench, args = study_arguments(["--kind", "canny", "--recipes", "common", "--seeds", "3", "4", "--steps", "50",
                                   "--batch-size", "4", "--validate-every", "10", "--validation-count", "2",
                                   "--sampling-steps", "5", "--jobs", "2", "--threads", "3", "--base", "b",
                                   "--work-dir", "w"])
    study = bench.study_from_args(args)
    assert (study.kinds, study.recipes, study.seeds, study.steps, study.batch_size, study.validate_every) == (
        ("canny",), ("common",), (3, 4), 50, 4, 10)
    assert (study.validation_count, study.sampling_steps, study.jobs, study.threads, study.base) == (2, 5, 2, 3, "b")
    assert args.work_dir == "w"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be positive, not 0"),
    (["--recipes", "paper", "fast"], "unknown recipe 'fast'"),
    (["--kind", "depth"], "unknown kind 'depth'"),
    (["--jobs", "0"], "--jobs must be positive, not 0"),
    (["--learning-rate", "1e-4"], "--learning-rate applies to --convergence"),
])
def test_cli_convergence_study_bad_values_are_one_line(capsys, argv, message):
    from controlnext.cli import main

    assert main(["bench", "--convergence-study", *argv]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("controlnext bench: error:") and message in error[0]
