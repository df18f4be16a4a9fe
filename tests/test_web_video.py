"""The web app's Video tab: served beside the images when a video base is configured, and its engine calls."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("gradio")
pytest.importorskip("av")

from controlnext.web import WebConfig, create_app  # noqa: E402


@pytest.fixture(scope="module")
def video_models(tmp_path_factory):
    from controlnext.web.app import tiny_demo_video_models

    return tiny_demo_video_models(tmp_path_factory.mktemp("video-demo"))


@pytest.fixture(scope="module")
def app(video_models, tmp_path_factory):
    torch.set_num_threads(1)
    base, control = video_models
    config = WebConfig(video_base=str(base), video_control=[str(control)], hide_embedded=True,
                       output_dir=str(tmp_path_factory.mktemp("web-video")))
    return create_app(config)


def pose_images(folder, count: int):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "reference.png")
    for k in range(count):
        image = Image.new("RGB", (64, 64))
        ImageDraw.Draw(image).rectangle((8, 6 * k, 40, 6 * k + 12), fill=(0, 255, 0))
        image.save(folder / f"frame_{k:05d}.png")
    return [str(p) for p in sorted(folder.iterdir())]


def test_the_page_has_an_images_and_a_video_tab(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        config = client.get("/config").json()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    assert {"video-reference", "video-driving", "video-poses", "video-generate", "video-result"} <= ids
    assert {"generate", "gallery"} <= ids and {"Images", "Video"} <= labels


def test_the_engine_previews_poses_and_generates_a_video(app, video_models, tmp_path):
    from controlnext.web.video_ui import animation, pose_folder

    base, control = video_models
    engine, worker = app.state.engine, app.state.worker
    folder = pose_folder(pose_images(tmp_path / "upload", 4))
    request = engine.video_request(base=str(base), reference="(uploaded)", control=str(control), poses=folder, steps=1,
                                   width=64, height=64)
    reference = Image.new("RGB", (96, 80), (30, 60, 90))
    prepared = worker.submit(engine.video_conditions, request, reference).result()
    assert len(prepared.frames) == 5 and prepared.reference.size == (64, 64)
    assert prepared.frames[0].getpixel((0, 0)) == (255, 0, 0)  # the uploaded reference pose leads
    assert Image.open(animation(prepared.frames, tmp_path)).n_frames == 5
    result = worker.submit(engine.generate_video, request, prepared).result()
    assert len(result.frames) == 5 and result.parameters["windows"] == 2  # 5 frames, windows of the base's 4
    assert result.parameters["device"] == "cpu" and result.parameters["control"] == str(control)
    again = worker.submit(engine.generate_video, request, prepared).result()  # the video pipeline stays loaded
    assert engine._video is not None and [f.tobytes() for f in again.frames] == [f.tobytes() for f in result.frames]
