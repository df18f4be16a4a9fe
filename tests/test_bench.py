"""Efficiency benchmarks: exact parameter counts of both methods, FLOP and timing structure on tiny models."""

import argparse
import json

import pytest

from controlnext.bench import count_flops, count_parameters, make_setup, measure_overhead, render_markdown, update_results
from controlnext.bench.suite import record, run_benchmarks
from controlnext.errors import ControlNextError
from controlnext.testing import tiny_controlnet, tiny_controlnext, tiny_unet

# base UNet, ControlNeXt module, its trained UNet subset, ControlNet (all from the public configs)
COUNTS = {
    "sd15": (859_520_964, 3_526_400, 24_805_760, 361_279_120),
    "sdxl": (2_567_463_684, 3_526_400, 102_483_200, 1_251_014_160),
}


@pytest.mark.parametrize("architecture", COUNTS)
def test_parameter_counts_match_the_known_figures(architecture):
    base, module, trained_unet, controlnet = COUNTS[architecture]
    counts = count_parameters(architecture)
    assert counts["base_unet"] == base
    assert counts["controlnext"]["module"] == module and counts["controlnext"]["trained_unet"] == trained_unet
    assert counts["controlnext"]["trainable"] == module + trained_unet
    assert counts["controlnet"]["trainable"] == controlnet and counts["controlnet"]["total"] == base + controlnet
    assert counts["controlnext"]["trainable"] < counts["controlnet"]["trainable"] / 10


def tiny_setup():
    unet = tiny_unet()
    return make_setup(unet, tiny_controlnext(), tiny_controlnet(unet), resolution=64, tokens=5)


def test_flops_rank_the_methods_and_the_stem_is_what_the_first_step_adds():
    result = count_flops(tiny_setup())
    flops = result["flops"]
    assert flops["base"] < flops["controlnext"] < flops["controlnext_first_step"] < flops["controlnet"]
    assert flops["controlnext_first_step"] - flops["controlnext"] == flops["controlnext_precompute"] > 0
    assert result["overhead"]["controlnext"] == pytest.approx(flops["controlnext"] / flops["base"] - 1)


def test_timing_returns_every_configuration_with_medians_and_spread():
    result = measure_overhead(64, repeats=2, warmup=1, setup=tiny_setup())
    assert set(result["timing"]) == {"wall", "cpu"}
    for timing in result["timing"].values():
        overheads = {"controlnext", "controlnext_first_step", "controlnet", "controlnext_module", "controlnet_module"}
        assert set(timing["seconds"]) == {"base"} | overheads
        assert all(len(values) == 2 and min(values) > 0 for values in timing["seconds"].values())
        assert set(timing["overhead"]) == set(timing["overhead_iqr"]) == set(timing["fastest_overhead"]) == overheads
        assert timing["precompute"] > 0 and all(v >= 0 for v in timing["iqr"].values())
        base = timing["seconds"]["base"]
        assert timing["fastest_overhead"]["controlnet"] == pytest.approx(min(timing["seconds"]["controlnet"]) / min(base) - 1)
        shares = [m / b for m, b in zip(timing["seconds"]["controlnet_module"], base)]
        assert timing["overhead"]["controlnet_module"] == pytest.approx(sum(shares) / 2)  # a share, not an excess
    assert result["resolution"] == 64 and result["batch"] == 2 and result["repeats"] == 2


def test_results_merge_per_resolution_and_render_as_tables(tmp_path):
    run = measure_overhead(64, repeats=1, warmup=0, setup=tiny_setup())
    machine = {"cpu": "test cpu", "cpu_count": 2, "load_average": [1.0], "python": "3", "versions": {"torch": "x"},
               "date": "today", "load_average_after": [1.5]}
    path = tmp_path / "results.json"
    update_results(path, parameters=[count_parameters("sd15")])
    update_results(path, overhead={**run, "machine": machine})
    update_results(path, overhead={**run, "resolution": 128, "machine": machine})
    results = update_results(path, overhead={**run, "resolution": 128, "threads": 7, "machine": machine})
    assert sorted(json.loads(path.read_text())["overhead"]) == ["128", "64"] and results["overhead"]["128"]["threads"] == 7
    text = render_markdown(results)
    assert "| sd15 | ControlNet | 361.28M |" in text
    assert "| 64 px (latent 8) |" in text and "| 128 px | cpu | 7 |" in text and "test cpu" in text


def test_record_merges_into_the_results_and_rewrites_the_report(tmp_path):
    results, report = tmp_path / "results.json", tmp_path / "report.md"
    record(results, report, parameters=[count_parameters("sd15")])
    merged = record(results, report, parameters=[count_parameters("sdxl")])
    assert sorted(merged["parameters"]) == sorted(json.loads(results.read_text())["parameters"]) == ["sd15", "sdxl"]
    text = report.read_text()
    assert text == render_markdown(merged) and "| sd15 | ControlNet |" in text and "| sdxl | ControlNet |" in text


def test_cli_parser_and_bad_resolution():
    from controlnext.cli import bench

    parent = argparse.ArgumentParser(add_help=False)
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"), parent)
    args = parser.parse_args(["bench", "--resolution", "256", "512", "--rounds", "2"])
    assert args.resolution == [256, 512] and args.rounds == 2 and args.run is bench.run
    with pytest.raises(ControlNextError, match="multiple of 64"):
        run_benchmarks([100], log=lambda *_: None)


def test_video_flops_count_the_control_once_per_window():
    """The SVD benchmark's counting on tiny parts: the control adds its module once, less on later steps."""
    import torch

    from controlnext.bench.report import render_markdown
    from controlnext.bench.video import VideoStep, count_video_flops
    from controlnext.testing import tiny_svd_components, tiny_svd_controlnext

    unet = tiny_svd_components(num_frames=3)["unet"]
    module = tiny_svd_controlnext()
    g = torch.Generator().manual_seed(0)
    step = VideoStep(unet, module, torch.randn(2, 3, 8, 8, 8, generator=g), torch.tensor(1.0),
                     torch.randn(2, 1, 16, generator=g), torch.tensor([[6.0, 127.0, 0.02]] * 2),
                     torch.rand(3, 3, 64, 64, generator=g), (64, 64))
    flops = count_video_flops(step)
    assert flops["controlled_first_step"] > flops["controlled"] > flops["base"] > 0
    assert flops["controlled"] - flops["base"] == flops["module"] - flops["module_stem"]  # the stem is reused
    assert flops["module_both_halves"] == 2 * flops["module"]
    timing = {"median": {"base": 1.0, "module": 0.03, "controlled": 1.03}, "module_share": 0.03, "step_overhead": 0.03,
              "repeats": 2, "warmup": 1, "threads": 1}
    machine = {"cpu": "cpu", "cpu_count": 2, "load_average": [1.0], "versions": {"torch": "2"}}
    text = render_markdown({"video": {"frames": 3, "size": [64, 64], "flops": flops, "time_size": [64, 64],
                                      "time_frames": 3, "time_flops": flops, "timing": timing, "machine": machine}})
    assert "## Pose control on a video denoising step" in text and "| 3.00% | +3.00% |" in text
