"""The GPU check script, run on toy components on the CPU so that its code path stays sound without a GPU."""

import json

import pytest

from controlnext.bench.gpu import main, run_checks


@pytest.mark.parametrize("architecture,dtype", [("sd15", "fp32"), ("sdxl", "fp16"), ("sdxl", "bf16")])
def test_generation_checks_pass_on_toy_components(architecture, dtype):
    results = run_checks([architecture], tiny=True, device="cpu", dtype=dtype, steps=2, rounds=1,
                         compile_backend=None, log=lambda _: None)
    entry = results["architectures"][architecture]
    check = entry["generation_check"]
    assert all(check[key] for key in ("base_finite", "controlnext_finite", "controlnet_finite",
                                      "controlnext_scale0_equals_base", "controlnext_blank_condition_finite"))
    assert check["controlnext_changes_output"] > 0 and check["controlnet_changes_output"] > 0
    assert set(entry["generation"]["median"]) == {"base", "controlnext", "diffusers_controlnet"}
    assert set(entry["step"]["overhead"]) >= {"controlnext", "controlnet"}


def test_compiled_unet_with_hooks_gives_the_eager_latents_and_compiles_once(tmp_path):
    output = tmp_path / "gpu.json"
    assert main(["--tiny", "--device", "cpu", "--dtype", "fp32", "--architecture", "sd15", "--steps", "3",
                 "--rounds", "1", "--compile-backend", "eager", "--output", str(output)]) == 0
    compiled = json.loads(output.read_text())["architectures"]["sd15"]["compile"]
    assert compiled["max_abs_difference"] == 0.0
    assert compiled["graphs_compiled_after_first_generation"] == 0


def test_gpu_figures_render_as_a_benchmarks_section():
    from controlnext.bench.report import render_markdown

    assert "Not measured yet" in render_markdown({})
    results = run_checks(["sd15"], tiny=True, device="cpu", dtype="fp32", steps=2, rounds=1, compile_backend=None,
                         log=lambda _: None)
    table = render_markdown({"gpu": results}).split("## On a GPU")[1]
    assert "| sd15 | 64 px | yes / yes / yes / yes | yes |" in table
