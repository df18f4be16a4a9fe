"""`controlnext serve`: the HTTP API on a real loopback server, its limits, the model catalog, and the web UI
in a headless Chromium; all on the tiny model."""

from __future__ import annotations

import base64
import asyncio
import contextlib
import io
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from controlnext.errors import ControlNextError
from controlnext.metadata import read_parameters

for module in ("fastapi", "uvicorn", "gradio", "httpx"):
    pytest.importorskip(module, reason="the web extra is not installed: pip install 'controlnext[web]'")

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from controlnext.web import WebConfig, create_app  # noqa: E402
from controlnext.web.catalog import ModelCatalog  # noqa: E402
from controlnext.web.worker import ModelWorker, QueueFull  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def square_condition(size=(70, 90)) -> Image.Image:
    image = Image.new("RGB", size)
    image.paste((255, 255, 255), (20, 30, 50, 60))
    return image


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn on a free loopback port in a thread; yield an httpx client for it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def tiny_lora(tiny_base, tmp_path_factory) -> Path:
    """A random LoRA of the tiny UNet's attention layers, in diffusers' file format."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def server(tiny_base, tiny_control, tiny_lora, tmp_path_factory):
    """The full app (API + web UI) on loopback, offering the tiny base, control and LoRA."""
    torch.set_num_threads(1)
    config = WebConfig(base=[str(tiny_base)], control=[str(tiny_control)], lora=[str(tiny_lora)], hide_embedded=True,
                       output_dir=str(tmp_path_factory.mktemp("web")))
    app = create_app(config)
    with running(app) as client:
        client.app = app
        yield client


@pytest.fixture(scope="module")
def names(server):
    models = server.get("/api/models").json()
    return models["bases"][0]["name"], models["controls"][0]["name"]


def request_body(names, **overrides) -> dict:
    base, control = names
    body = dict(
        prompt="a red circle", negative_prompt="blurry", base=base, steps=2, seed=3, height=80, scheduler="ddim",
        controls=[dict(control=control, image=png_base64(square_condition()), scale=0.5, start=0.0, end=0.8)],
    )
    body.update(overrides)
    return body


def decode(answer: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(answer["image"])))


# -- the API on a real server -------------------------------------------------------------------------

def test_generate_returns_a_png_with_its_parameters_equal_to_the_library(server, names, tiny_base, tiny_control):
    from controlnext.pipelines import ControlledPipeline

    response = server.post("/api/generate", json=request_body(names))
    assert response.status_code == 200, response.text
    answer = response.json()["images"][0]
    image = decode(answer)
    assert image.format == "PNG" and image.size == (64, 80)
    stored = read_parameters(io.BytesIO(base64.b64decode(answer["image"])))
    assert stored == answer["parameters"]
    assert stored["prompt"] == "a red circle" and stored["negative_prompt"] == "blurry" and stored["seed"] == 3
    assert (stored["steps"], stored["scheduler"], stored["width"], stored["height"]) == (2, "ddim", 64, 80)
    assert stored["controls"][0]["control"] == str(tiny_control) and stored["controls"][0]["scale"] == 0.5
    assert stored["controls"][0]["end"] == 0.8 and stored["base"] == str(tiny_base)

    pipe = ControlledPipeline.from_pretrained(tiny_base, [tiny_control], scheduler="ddim")
    expected = pipe(
        "a red circle", negative_prompt="blurry", control_images=[square_condition()], control_scales=[0.5],
        control_ends=[0.8], num_inference_steps=2, height=80, generator=[torch.Generator().manual_seed(3)],
    ).images[0]
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))


def test_pipelines_are_cached_and_each_request_gets_its_own_scheduler(server, names):
    first = decode(server.post("/api/generate", json=request_body(names)).json()["images"][0])
    other = server.post("/api/generate", json=request_body(names, scheduler="euler")).json()["images"][0]
    again = decode(server.post("/api/generate", json=request_body(names)).json()["images"][0])
    assert other["parameters"]["scheduler"] == "euler"
    assert not np.array_equal(np.asarray(first), np.asarray(decode(other)))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert server.get("/api/health").json()["loaded_pipelines"] == 1


def test_lora_weights_apply_together_with_control(server, names, tiny_lora):
    def generate(weight=None):
        loras = [] if weight is None else [{"lora": "pytorch_lora_weights", "weight": weight}]
        return server.post("/api/generate", json=request_body(names, loras=loras)).json()["images"][0]

    plain, off, on = generate(), generate(0.0), generate(1.0)
    assert np.allclose(np.asarray(decode(off)), np.asarray(decode(plain)), atol=1)
    assert not np.allclose(np.asarray(decode(on)), np.asarray(decode(plain)), atol=1)
    assert on["parameters"]["loras"] == [f"{tiny_lora}:1.0"]


def test_several_images_get_consecutive_seeds(server, names):
    images = server.post("/api/generate", json=request_body(names, num_images=2, seed=10)).json()["images"]
    assert [x["seed"] for x in images] == [10, 11] == [x["parameters"]["seed"] for x in images]
    assert not np.array_equal(np.asarray(decode(images[0])), np.asarray(decode(images[1])))


def test_resize_mode_and_unet_weights_reach_the_library_and_the_parameters(server, names):
    body = request_body(names, resize_mode="just_resize")
    body["controls"][0]["unet_weights"] = "absolute"
    response = server.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()["images"][0]
    assert answer["parameters"]["resize_mode"] == "just_resize"
    assert answer["parameters"]["controls"][0]["unet_weights"] == "absolute"
    cropped = server.post("/api/generate", json=request_body(names)).json()["images"][0]
    assert cropped["parameters"]["resize_mode"] == "crop_and_resize"
    assert cropped["parameters"]["controls"][0]["unet_weights"] == "auto"
    assert not np.array_equal(np.asarray(decode(answer)), np.asarray(decode(cropped)))
    for bad, field in ((request_body(names, resize_mode="squash"), "resize_mode"),
                       (with_control(unet_weights="relative")(request_body(names)), "unet_weights")):
        response = server.post("/api/generate", json=bad)
        assert response.status_code == 422 and field in response.json()["error"]


def test_annotate(server):
    from controlnext.web.engine import available_annotators

    image = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    image.paste((255, 255, 255, 255), (5, 5, 20, 20))
    response = server.post("/api/annotate", json={"image": png_base64(image), "annotator": "none"})
    assert response.status_code == 200
    result = decode(response.json())
    assert result.mode == "RGB" and result.size == (40, 30)
    assert result.getpixel((10, 10)) == (255, 255, 255) and result.getpixel((30, 25)) == (0, 0, 0)  # transparent: black
    unknown = server.post("/api/annotate", json={"image": png_base64(image), "annotator": "no-such-annotator"})
    assert unknown.status_code == 400 and "no-such-annotator" in unknown.json()["error"]
    if "canny" in available_annotators():
        from controlnext.annotators import annotate

        photo = square_condition().convert("RGB")
        edges = decode(server.post("/api/annotate", json={"image": png_base64(photo), "annotator": "canny"}).json())
        np.testing.assert_array_equal(np.asarray(edges), np.asarray(annotate("canny", photo).convert("RGB")))


def test_models_and_health(server, tiny_base, tiny_control, tiny_lora):
    models = server.get("/api/models").json()
    assert [m["path"] for m in models["bases"]] == [str(tiny_base)]
    assert [m["path"] for m in models["controls"]] == [str(tiny_control)]
    assert models["annotators"][0] == "none" and "unipc" in models["schedulers"]
    assert [(m["name"], m["path"]) for m in models["loras"]] == [("pytorch_lora_weights", str(tiny_lora))]
    health = server.get("/api/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu" and health["queue"]["capacity"] == 8


def test_openapi_schema_lists_the_routes_and_their_limits(server):
    schema = server.get("/openapi.json").json()
    assert {"/api/generate", "/api/annotate", "/api/models", "/api/health"} <= set(schema["paths"])
    fields = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert (fields["steps"]["minimum"], fields["steps"]["maximum"]) == (1, 150)
    width = next(option for option in fields["width"]["anyOf"] if option.get("type") == "integer")
    assert width["multipleOf"] == 8 and width["maximum"] == 2048
    assert set(fields["scheduler"]["enum"]) == {"auto", "ddim", "unipc", "euler", "euler_a", "dpm++2m", "heun"}
    assert "503" in schema["paths"]["/api/generate"]["post"]["responses"]


def test_the_api_takes_defaults_limits_and_help_from_the_generation_request(server):
    from controlnext.request import GenerationRequest, settings

    fields = server.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
    specs = settings(GenerationRequest)
    shared = {name for name in fields if name not in ("base", "seed", "controls", "loras")}
    assert shared >= {"prompt", "steps", "guidance", "scheduler", "width", "strength", "num_images"}
    for name in shared:
        assert fields[name]["description"] == specs[name].help, name
        if not specs[name].required:
            assert fields[name].get("default") == specs[name].default, name
    guidance = next(option for option in fields["guidance"]["anyOf"] if option.get("type") == "number")
    assert guidance["minimum"] == specs["guidance"].limits["ge"] == 0 and guidance["maximum"] == 30


def test_choosing_a_control_sets_the_guidance_and_scale_it_recommends(tiny_control, tmp_path):
    """The UI's sliders follow what the chosen controls' control.json recommend, as `generate` would choose."""
    from controlnext.request import DEFAULT_GUIDANCE
    from controlnext.web.catalog import ModelCatalog
    from controlnext.web.ui import NONE, guidance_for_controls, recommended_scale

    recommending, broken = tmp_path / "recommending", tmp_path / "broken"
    for folder, extra in ((recommending, '"scale": 0.6, "guidance": 2.5'), (broken, '"guidance": "high"')):
        shutil.copytree(tiny_control, folder)
        recorded = (folder / "control.json").read_text().rstrip().removesuffix("}")
        (folder / "control.json").write_text(recorded + ", " + extra + "}")
    catalog = ModelCatalog.discover(controls=[tiny_control, recommending, broken], include_embedded=False)
    plain, chosen, bad = [entry.name for entry in catalog.controls]
    assert guidance_for_controls(catalog, [plain, chosen]) == 2.5  # the first control that names one
    assert guidance_for_controls(catalog, [NONE, None]) == DEFAULT_GUIDANCE
    assert guidance_for_controls(catalog, [plain, bad]) == DEFAULT_GUIDANCE  # an unreadable one: generating says why
    assert [recommended_scale(catalog, name) for name in (chosen, plain, NONE)] == [0.6, 1.0, 1.0]


def test_the_web_and_the_cli_store_the_same_parameters(server, names, tiny_base, tiny_control, tmp_path):
    from controlnext.cli import main

    answer = server.post("/api/generate", json=request_body(names)).json()["images"][0]
    condition, out = tmp_path / "condition.png", tmp_path / "cli.png"
    square_condition().save(condition)
    assert main(["generate", "-p", "a red circle", "-n", "blurry", "--base", str(tiny_base), "-c", str(tiny_control),
                 "-i", str(condition), "--scale", "0.5", "--end", "0.8", "--steps", "2", "--seed", "3", "--height", "80",
                 "--scheduler", "ddim", "--no-progress", "-o", str(out)]) == 0
    web, cli = answer["parameters"], read_parameters(out)
    assert [key for key in web if web[key] != cli[key]] == ["controls"]
    assert [key for key in web["controls"][0] if web["controls"][0][key] != cli["controls"][0][key]] == ["image"]
    assert web["controls"][0]["image"].startswith("sha256:") and cli["controls"][0]["image"] == str(condition)
    np.testing.assert_array_equal(np.asarray(decode(answer).convert("RGB")), np.asarray(Image.open(out).convert("RGB")))


def test_concurrent_requests_all_complete(server, names):
    seeds = list(range(20, 26))
    with ThreadPoolExecutor(len(seeds)) as pool:
        responses = list(pool.map(lambda s: server.post("/api/generate", json=request_body(names, seed=s)), seeds))
    assert [r.status_code for r in responses] == [200] * len(seeds)
    assert [r.json()["images"][0]["seed"] for r in responses] == seeds
    pixels = {decode(r.json()["images"][0]).tobytes() for r in responses}
    assert len(pixels) == len(seeds)
    assert server.get("/api/health").json()["queue"]["pending"] == 0


def test_a_full_queue_answers_503_with_retry_after(tiny_base, tiny_control):
    app = create_app(WebConfig(base=[str(tiny_base)], control=[str(tiny_control)], hide_embedded=True, queue_size=1,
                               api_only=True))
    release = threading.Event()
    with running(app) as client:
        busy = app.state.worker.submit(release.wait, 30)
        body = {"prompt": "x", "steps": 1}
        refused = client.post("/api/generate", json=body)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "busy" in refused.json()["error"]
        assert client.get("/api/health").json()["queue"] == {"pending": 1, "capacity": 1}
        release.set()
        busy.result(10)
        assert client.post("/api/generate", json=body).status_code == 200


def with_control(**fields):
    return lambda body: {**body, "controls": [{**body["controls"][0], **fields}]}


def huge_image_body(body):
    return with_control(image=png_base64(Image.new("L", (5000, 4000))))(body)


MALFORMED = [
    ("bad json", lambda body: b'{"prompt": "x",', 422, "not valid JSON"),
    ("bad base64", with_control(image="not base64 at all!"), 422, "base64"),
    ("base64 of no image", with_control(image=base64.b64encode(b"hello").decode()), 422, "not a readable"),
    ("image too large", huge_image_body, 422, "too large"),
    ("steps of the wrong type", lambda body: {**body, "steps": "many"}, 422, "steps"),
    ("controls of the wrong type", lambda body: {**body, "controls": "canny"}, 422, "controls"),
    ("prompt missing", lambda body: {k: v for k, v in body.items() if k != "prompt"}, 422, "prompt"),
    ("unknown field", lambda body: {**body, "stpes": 3}, 422, "stpes"),
    ("width 60", lambda body: {**body, "width": 60}, 422, "multiple of 8"),
    ("width too large", lambda body: {**body, "width": 4096}, 422, "width"),
    ("0 steps", lambda body: {**body, "steps": 0}, 422, "steps"),
    ("unknown scheduler", lambda body: {**body, "scheduler": "magic"}, 422, "scheduler"),
    ("negative guidance", lambda body: {**body, "guidance": -1}, 422, "guidance"),
    ("scale out of range", with_control(scale=9), 422, "scale"),
    ("start after end", with_control(start=0.9, end=0.2), 422, "start"),
    ("too many controls", lambda body: {**body, "controls": body["controls"] * 5}, 422, "controls"),
    ("img2img without init image", lambda body: {**body, "task": "img2img"}, 422, "init_image"),
    ("unknown control", with_control(control="no-such-control"), 400, "no-such-control"),
    ("unknown base", lambda body: {**body, "base": "/etc"}, 400, "unknown base"),
    ("body over 20 MB", lambda body: b"x" * 21_000_000, 413, "too large"),
]


@pytest.mark.parametrize("make_body,status,message", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, names, make_body, status, message):
    body = make_body(request_body(names))
    if isinstance(body, bytes):
        response = server.post("/api/generate", content=body, headers={"content-type": "application/json"})
    else:
        response = server.post("/api/generate", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert len(response.content) < 10_000  # errors never echo the payload back
    assert server.get("/api/health").json()["status"] == "ok"


def test_an_internal_failure_answers_500_in_one_line_and_the_server_keeps_serving(server, names, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory\nlong details")

    monkeypatch.setattr(server.app.state.engine, "generate", fail)
    response = server.post("/api/generate", json=request_body(names))
    assert response.status_code == 500
    assert response.json() == {"error": "internal error: RuntimeError: out of memory"}
    monkeypatch.undo()
    assert server.post("/api/generate", json=request_body(names)).status_code == 200


def test_the_web_ui_page_is_served(server):
    page = server.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert server.get("/docs").status_code == 200


# -- parts without a server -----------------------------------------------------------------------------

def test_engine_reports_progress_per_step(server, names):
    from controlnext.web.schemas import GenerateRequest

    steps = []
    request = GenerateRequest(**request_body(names, steps=3))
    server.app.state.worker.submit(server.app.state.engine.generate, request, lambda *s: steps.append(s)).result(60)
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_worker_runs_one_job_at_a_time_and_refuses_beyond_capacity():
    worker = ModelWorker(capacity=2)
    gate, running_now, peak = threading.Event(), [], []

    def job():
        running_now.append(1)
        peak.append(len(running_now))
        gate.wait(10)
        running_now.pop()

    futures = [worker.submit(job), worker.submit(job)]
    with pytest.raises(QueueFull) as refused:
        worker.submit(job)
    assert refused.value.retry_after >= 1 and worker.pending == 2
    gate.set()
    [f.result(10) for f in futures]
    assert max(peak) == 1 and worker.pending == 0
    worker.shutdown()


def fake_lora(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, str(path))
    return path


def test_catalog_finds_models_and_names_them_uniquely(tmp_path, tiny_base, tiny_control):
    for group in ("a", "b"):
        shutil.copytree(tiny_control, tmp_path / group / "canny")
    shutil.copytree(tiny_base, tmp_path / "a" / "shapes-base")
    fake_lora(tmp_path / "style.safetensors")
    (tmp_path / "notes.txt").write_text("not a model")
    catalog = ModelCatalog.discover([tmp_path], bases=[tiny_base], include_embedded=False)
    assert [e.name for e in catalog.bases] == ["shapes-base", tiny_base.name]
    assert [e.name for e in catalog.controls] == ["a/canny", "b/canny"]
    assert [(e.name, e.kind) for e in catalog.loras] == [("style", "lora")]
    assert catalog.find("base", None).name == "shapes-base"
    assert catalog.find("control", str(tmp_path / "b" / "canny")).name == "b/canny"
    with pytest.raises(ControlNextError, match="a/canny, b/canny"):
        catalog.find("control", "depth")
    with pytest.raises(ControlNextError, match="not found"):
        ModelCatalog.discover(controls=[tmp_path / "missing"])
    with pytest.raises(ControlNextError, match="no lora models"):
        ModelCatalog().find("lora", "x")


def test_catalog_lists_diffusers_controlnet_folders_and_files_that_load_control_loads(tmp_path):
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from controlnext.control.loading import load_control
    from controlnext.testing import tiny_controlnet, tiny_unet

    unet = tiny_unet()
    controlnet = tiny_controlnet(unet)
    plain = ControlNetModel.from_config(controlnet.config)
    plain.load_state_dict(controlnet.state_dict())
    plain.save_pretrained(tmp_path / "models" / "controlnet-canny")  # diffusers' own folder: no control.json
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "models" / "single.safetensors"))
    catalog = ModelCatalog.discover([tmp_path / "models"], include_embedded=False)
    assert [(e.name, e.kind) for e in catalog.controls] == [("controlnet-canny", "control"), ("single", "control")]
    assert load_control(catalog.find("control", "controlnet-canny").path, unet).method == "controlnet"


def test_tiny_demo_offers_a_working_model_without_any_set_up(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    app = create_app(WebConfig(tiny_demo=True, hide_embedded=True, api_only=True))
    with running(app) as client:
        models = client.get("/api/models").json()
        assert [(m["name"], m["source"]) for m in models["controls"]] == [("tiny-random-control", "demo")]
        control = {"control": "tiny-random-control", "image": png_base64(square_condition())}
        body = {"prompt": "x", "base": "tiny-random-base", "steps": 1, "controls": [control]}
        answer = client.post("/api/generate", json=body)
    assert answer.status_code == 200 and decode(answer.json()["images"][0]).size == (64, 64)


def test_serve_flags_come_from_the_config(monkeypatch):
    import controlnext.web as web
    from controlnext.cli import main

    seen = []
    monkeypatch.setattr(web, "serve", seen.append)
    assert main(["serve", "--models-dir", "a", "--models-dir", "b", "--port", "9999", "--tiny-demo", "--dtype", "bf16"]) == 0
    config = seen[0]
    assert (config.models_dir, config.port, config.tiny_demo, config.dtype) == (["a", "b"], 9999, True, "bf16")
    assert (config.host, config.queue_size, config.max_body_mb) == ("127.0.0.1", 8, 20.0)


def test_serve_without_the_web_extra_says_what_to_install(monkeypatch, capsys):
    import sys

    from controlnext.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main(["serve"]) == 2
    assert "pip install 'controlnext[web]'" in capsys.readouterr().err


# -- the web UI in a real browser -------------------------------------------------------------------------

REPOSITORY = Path(__file__).resolve().parents[1]
SCREENSHOTS = "CONTROLNEXT_SCREENSHOTS"  # set to 1 to write the UI screenshots of docs/web.md to docs/images


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory):
    """The full app with the models shipped in the package, as `controlnext serve` starts it."""
    torch.set_num_threads(1)
    app = create_app(WebConfig(output_dir=str(tmp_path_factory.mktemp("web-embedded"))))

    async def slow_uploads(scope, receive, send):  # as on a slow network: an upload lands a second after it starts
        if scope["type"] == "http" and scope["path"].endswith("/upload"):
            await asyncio.sleep(1.0)
        await app(scope, receive, send)

    with running(slow_uploads) as client:
        yield client


def fetch_image(page, selector: str) -> Image.Image:
    source = page.wait_for_selector(selector).get_attribute("src")
    return Image.open(io.BytesIO(page.request.get(source).body()))


@pytest.mark.browser
def test_browser_generates_what_the_cli_does_right_after_an_upload(embedded_server, tmp_path):
    """Generate clicked at once after an upload waits for it; the preview is the control's exact input; the image
    equals the CLI's for the same inputs; the page warns about words the model never saw; screenshots."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from controlnext.cli import main

    condition, prompt = REPOSITORY / "examples" / "circle.png", "a red circle on a blue background"
    shots = REPOSITORY / "docs" / "images" if os.environ.get(SCREENSHOTS) else tmp_path
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(str(embedded_server.base_url))
            page.wait_for_selector("#generate")
            page.fill("#prompt textarea", "a cat")
            page.wait_for_selector("#prompt-notes :text(\"never saw 'cat'\")")
            page.fill("#prompt textarea", prompt)
            for selector, value in (("#steps input[type=number]", "12"), ("#seed input", "5")):
                page.fill(selector, value)
                page.press(selector, "Enter")
            page.locator("#control-image-0 input[type=file]").set_input_files(str(condition))
            page.click("#generate")  # at once, before the upload has landed
            gallery = fetch_image(page, "#gallery img")
            preview = fetch_image(page, "#preview-0 img")
            page.screenshot(path=str(shots / "web-ui-desktop.png"), full_page=True)
            phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=1)
            phone.goto(str(embedded_server.base_url))
            phone.wait_for_selector("#generate")
            phone.locator("#examples tbody tr").first.click()  # an example fills the prompt and the condition
            phone.wait_for_selector("#preview-0 img", state="attached").scroll_into_view_if_needed()
            phone.wait_for_function("document.querySelector('#preview-0 img').complete")
            phone.evaluate("window.scrollTo(0, 0)")
            phone.screenshot(path=str(shots / "web-ui-phone.png"), full_page=True)
        finally:
            browser.close()
    out = tmp_path / "cli.png"
    assert main(["generate", "-p", prompt, "--control", "canny", "--image", str(condition), "--steps", "12", "--seed",
                 "5", "--no-progress", "-o", str(out)]) == 0
    np.testing.assert_array_equal(np.asarray(gallery.convert("RGB")), np.asarray(Image.open(out).convert("RGB")))
    np.testing.assert_array_equal(np.asarray(preview.convert("RGB")), np.asarray(Image.open(condition).convert("RGB")))
    assert read_parameters(out)["prompt"] == prompt


def test_the_api_docs_page_loads_nothing_from_other_hosts(server):
    page = server.get("/docs")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    assert "https://" not in page.text and "http://" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert server.get(f"/docs-assets/{asset}").status_code == 200


def test_annotate_refuses_a_resolution_beyond_the_pixel_limit(server):
    body = {"image": png_base64(square_condition()), "annotator": "blur", "options": {"resolution": 100000}}
    response = server.post("/api/annotate", json=body)
    assert response.status_code == 400 and "too large" in response.json()["error"]
    assert server.get("/api/health").status_code == 200


def test_generate_annotates_at_the_generation_size(server, names, monkeypatch):
    from controlnext import generation

    sizes = []
    original = generation.annotate_condition

    def recording(name, image, options=None, size=None, resize_mode="crop_and_resize"):
        sizes.append(size)
        return original(name, image, options, size, resize_mode)

    monkeypatch.setattr(generation, "annotate_condition", recording)
    body = request_body(names, width=64, height=80)
    body["controls"][0]["annotator"] = "canny"
    assert server.post("/api/generate", json=body).status_code == 200
    assert sizes == [(64, 80)]


def test_control_mode_and_offload_reach_the_library_and_the_parameters(server, names):
    body = request_body(names, offload="model")
    body["controls"][0]["control_mode"] = "control"
    answer = server.post("/api/generate", json=body).json()
    parameters = answer["images"][0]["parameters"]
    assert parameters["controls"][0]["control_mode"] == "control" and parameters["offload"] == "model"
    assert answer["notes"] == []
    body["controls"][0]["control_mode"] = "louder"
    assert server.post("/api/generate", json=body).status_code == 422
