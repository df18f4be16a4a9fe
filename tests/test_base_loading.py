"""Base models: local folders, the offline Hugging Face cache, and clear errors for everything else."""

import shutil

import pytest

from controlnext.errors import ControlNextError
from controlnext.pipelines import load_base


def test_model_id_from_the_local_cache_loads_offline(tmp_path, tiny_base):
    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_base, snapshot)
    (tmp_path / "hub" / "models--someone--tiny-sd" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-sd" / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    pipe = load_base("someone/tiny-sd", cache_dir=str(tmp_path / "hub"))
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.unet.config.block_out_channels == [8, 16]


@pytest.mark.parametrize("task,name", [("img2img", "StableDiffusionImg2ImgPipeline"),
                                       ("inpaint", "StableDiffusionInpaintPipeline")])
def test_tasks_share_the_loaded_components(tiny_base, task, name):
    assert type(load_base(tiny_base, task=task)).__name__ == name


def bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.ckpt").write_bytes(b"x")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    return [
        (str(tmp_path / "empty"), "model_index.json"),
        (str(tmp_path / "model.ckpt"), ".safetensors"),
        (str(tmp_path / "broken.safetensors"), "corrupt"),
        ("nobody/not-cached-model", "not in the local Hugging Face cache"),
        ("no-such-thing", "not found"),
    ]


def test_bad_base_sources_give_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source, message in bad_sources(tmp_path):
        with pytest.raises(ControlNextError, match=message) as info:
            load_base(source)
        assert "\n" not in str(info.value), source


def test_unknown_task_is_refused(tiny_base):
    with pytest.raises(ControlNextError, match="unknown task"):
        load_base(tiny_base, task="video")
