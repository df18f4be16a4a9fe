"""The GPU check script, run on toy components on the CPU so that its code path stays sound without a GPU."""

import json

import pytest

from controlnext.bench.gpu import main, run_checks


# (architecture, dtype, the measures it gets beyond the generation checks)
CASES = [("sd15", "fp32", {"step"}), ("sdxl", "fp16", {"step"}), ("sdxl", "bf16", {"step"}), ("sd3", "bf16", set()),
         ("svd", "fp32", set())]


@pytest.mark.parametrize("architecture,dtype,extra", CASES)
def test_generation_checks_pass_on_toy_components(architecture, dtype, extra):
    results = run_checks([architecture], tiny=True, device="cpu", dtype=dtype, steps=2, rounds=1,
                         compile_backend=None, log=lambda _: None)
    entry = results["architectures"][architecture]
    check = entry["generation_check"]
    methods = ("controlnext",) if architecture == "svd" else ("controlnext", "controlnet")  # SVD has no ControlNet
    assert all(check[f"{method}_finite"] and check[f"{method}_changes_output"] > 0 for method in methods)
    assert check["base_finite"] and check["controlnext_scale0_equals_base"] and check["controlnext_blank_condition_finite"]
    own = set() if architecture == "svd" else {"diffusers_controlnet"}
    assert set(entry["generation"]["median"]) == {"base", "controlnext", *own}
    assert {"step", "training", "compile"} & set(entry) == extra


def test_compiled_denoiser_with_hooks_gives_the_eager_latents_and_compiles_once(tmp_path):
    output = tmp_path / "gpu.json"
    assert main(["--tiny", "--device", "cpu", "--dtype", "fp32", "--architecture", "sd15", "sd3", "--steps", "3",
                 "--rounds", "1", "--compile-backend", "eager", "--output", str(output)]) == 0
    for architecture in ("sd15", "sd3"):
        compiled = json.loads(output.read_text())["architectures"][architecture]["compile"]
        assert compiled["max_abs_difference"] == 0.0
        assert compiled["graphs_compiled_after_first_generation"] == 0


def test_gpu_figures_render_as_a_benchmarks_section():
    from controlnext.bench.report import render_markdown

    assert "Not measured yet" in render_markdown({})
    results = run_checks(["sd15", "svd"], tiny=True, device="cpu", dtype="fp32", steps=2, rounds=1,
                         compile_backend=None, log=lambda _: None)
    table = render_markdown({"gpu": results}).split("## On a GPU")[1]
    assert "| sd15 | 64x64 px | yes / yes / yes / yes | yes |" in table
    assert "| svd | 64x64 px, 6 frames | yes / yes / - / yes | yes | - |" in table
