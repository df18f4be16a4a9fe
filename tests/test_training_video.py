"""Training on Stable Video Diffusion: the release's objective in parts, and `controlnext train` on tiny videos."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image, ImageDraw

from controlnext.cli import main
from controlnext.errors import ControlNextError
from controlnext.training.config import TrainConfig
from controlnext.training.video import (VideoClips, cosine_interpolated_logsnr, dropout_masks, preconditioning,
                                        sample_sigmas)
from controlnext.videos import write_mp4

pytest.importorskip("av")


def simple_diffusion_logsnr(u: float) -> float:
    """The interpolated cosine schedule written out for one u, from the simple diffusion formulas."""
    def cosine(u, logsnr_start, logsnr_end):  # start: the noisiest end
        t0, t1 = math.atan(math.exp(-0.5 * logsnr_start)), math.atan(math.exp(-0.5 * logsnr_end))
        return -2 * math.log(math.tan(t0 + u * (t1 - t0)))

    start, end = -2 * math.log(700 / 0.5), -2 * math.log(0.002 / 0.5)
    low = cosine(u, start - 2 * math.log(32 / 64), end - 2 * math.log(32 / 64)) + 2 * math.log(32 / 64)
    high = cosine(u, start, end)
    return low + u * (high - low)


def test_noise_levels_follow_the_interpolated_cosine_schedule():
    u = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    expected = torch.tensor([simple_diffusion_logsnr(float(x)) for x in u], dtype=torch.float64)
    torch.testing.assert_close(cosine_interpolated_logsnr(u), expected)
    sigmas = 0.5 * torch.exp(-cosine_interpolated_logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64)) / 2)
    torch.testing.assert_close(sigmas, torch.tensor([700.0, 0.002], dtype=torch.float64))
    drawn = sample_sigmas(8, torch.Generator().manual_seed(0))  # one per eighth of [0, 1]: falling noise levels
    assert (drawn[:-1] > drawn[1:]).all() and drawn.max() <= 700 and drawn.min() >= 0.002


def test_preconditioning_is_svds_edm_with_v_prediction():
    s = torch.tensor([0.01, 1.0, 30.0], dtype=torch.float64)
    c = preconditioning(s)
    torch.testing.assert_close(c["c_in"], (s ** 2 + 1) ** -0.5)
    torch.testing.assert_close(c["c_noise"], 0.25 * s.log())
    torch.testing.assert_close(c["weight"], (1 + s ** 2) * s ** -2.0)
    x0, noise = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    alpha, sigma = (s ** 2 + 1) ** -0.5, s * (s ** 2 + 1) ** -0.5  # the same noise level in variance-preserving terms
    velocity = alpha * noise - sigma * x0  # what a perfect v-prediction model returns
    torch.testing.assert_close(c["c_out"] * velocity + c["c_skip"] * (x0 + s * noise), x0)  # denoises exactly


def test_conditioning_dropout_follows_the_release():
    p = torch.tensor([0.05, 0.15, 0.25, 0.35, 0.95])
    keep_embedding, keep_latents = dropout_masks(p, 0.1)
    assert keep_embedding.tolist() == [False, False, True, True, True]  # p < 0.2
    assert keep_latents.tolist() == [True, False, False, True, True]  # 0.1 <= p < 0.3


# -- end to end -------------------------------------------------------------------------------------------

def moving_bar(count: int, color, pose: bool = False) -> list[Image.Image]:
    frames = []
    for k in range(count):
        image = Image.new("RGB", (64, 64), (0, 0, 0) if pose else (40, 60, 90))
        ImageDraw.Draw(image).rectangle((8 + 4 * k, 10, 20 + 4 * k, 50), fill=color)
        frames.append(image)
    return frames


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
    """Two videos of a moving bar with pose videos of the same name, and one too short for a clip."""
    root = tmp_path_factory.mktemp("videos")
    for name, count in (("a", 7), ("b", 6), ("short", 2)):
        write_mp4(moving_bar(count, (220, 180, 40)), root / "videos" / f"{name}.mp4", fps=8)
        write_mp4(moving_bar(count, (0, 255, 0), pose=True), root / "poses" / f"{name}.mp4", fps=8)
    return root


@pytest.fixture(scope="module")
def svd_base(tmp_path_factory):
    from controlnext.testing import save_tiny_svd_pipeline

    return save_tiny_svd_pipeline(tmp_path_factory.mktemp("tiny-svd"), num_frames=3)


def test_clips_start_with_a_reference_frame_and_its_pose(video_data, capsys):
    config = TrainConfig(data=str(video_data), output_dir="x", resolution=32, num_frames=3, frame_stride=2, seed=1)
    clips = VideoClips(config)
    assert "1 video(s) shorter than a clip (5 frames) are left out: short.mp4" in capsys.readouterr().out
    assert [(c.video.name, c.start) for c in clips.clips] == [("a.mp4", 0), ("b.mp4", 0)]
    item = clips[0]
    assert item["pixel_values"].shape == (3, 3, 32, 32) and item["conditioning"].shape == (3, 3, 32, 32)
    assert torch.equal(item["reference"], item["pixel_values"][0])
    assert item["conditioning"].min() >= 0 and item["pixel_values"].min() >= -1
    assert torch.equal(clips[0]["pixel_values"], item["pixel_values"])  # the reference frame is seeded


def test_train_on_videos_then_generate(tmp_path, video_data, svd_base):
    out = tmp_path / "run"
    argv = ["train", "--base", str(svd_base), "--data", str(video_data), "--output-dir", str(out),
            "--resolution", "64", "--num-frames", "3", "--frame-stride", "1", "--batch-size", "1", "--max-steps", "2",
            "--trainable", "all", "--validation-every", "2", "--validation-sampling-steps", "1", "--checkpoint-every",
            "0", "--no-progress-bar", "--no-tensorboard", "--module-config",
            '{"stem_channels": [8], "block_out_channels": [8, 16], "block_groups": [2, 4], "time_proj_dim": 16, '
            '"time_embed_dim": 32}']
    assert main(argv) == 0
    assert (out / "validation" / "step-000002.mp4").is_file() and (out / "validation" / "step-000000.png").is_file()
    log = (out / "log.csv").read_text().splitlines()
    assert len(log) >= 3 and all("nan" not in line for line in log)

    from controlnext.control.loading import load_control
    from controlnext.pipelines.video import ControlledVideoPipeline
    from controlnext.testing import tiny_svd_pipeline

    pipe = tiny_svd_pipeline(num_frames=3)
    loaded = load_control(out, pipe.unet)
    assert loaded.model.config.injection == "down_blocks.0" and not loaded.model.config.pool_before_norm
    assert loaded.model.config.output_scale == 0.2 and loaded.model.config.cross_norm_eps == 1e-5
    assert set(loaded.unet_weights) == {name for name, _ in pipe.unet.named_parameters()}  # the whole UNet trained
    frames = ControlledVideoPipeline(pipe, [loaded])(
        Image.new("RGB", (64, 64)), control_frames=moving_bar(3, (0, 255, 0), pose=True), width=64, height=64,
        num_inference_steps=1, output_type="pt").frames
    assert frames.shape == (1, 3, 3, 64, 64) and torch.isfinite(frames).all()


@pytest.mark.parametrize("layout, message", [
    ("nothing", "expected videos/ and poses/ folders"),
    ("no poses", "no poses for a.mp4"),
    ("too short", "no video in"),
])  # fmt: skip
def test_bad_video_data_gives_one_line(tmp_path, layout, message):
    if layout != "nothing":
        write_mp4(moving_bar(2, (200, 0, 0)), tmp_path / "videos" / "a.mp4", fps=8)
    if layout == "too short":
        write_mp4(moving_bar(2, (0, 255, 0), pose=True), tmp_path / "poses" / "a.mp4", fps=8)
    with pytest.raises(ControlNextError, match=message):
        VideoClips(TrainConfig(data=str(tmp_path), output_dir="x", resolution=32, num_frames=3))


def test_hands_weigh_more_where_the_poses_carry_json(tmp_path):
    import json

    import numpy as np

    from controlnext.annotators.openpose_format import PersonKeypoints, openpose_json_data

    write_mp4(moving_bar(4, (200, 0, 0)), tmp_path / "videos" / "a.mp4", fps=8)
    poses = tmp_path / "poses" / "a"
    poses.mkdir(parents=True)
    for k in range(4):
        body = np.zeros((18, 3))
        hand = np.zeros((21, 3))
        hand[:, 0], hand[:, 1], hand[:, 2] = 100 + np.arange(21), 40 + np.arange(21), 1.0  # a 128 x 128 canvas
        people = [PersonKeypoints(body, right_hand=hand)]
        Image.new("RGB", (128, 128)).save(poses / f"frame_{k:05d}.png")
        (poses / f"frame_{k:05d}.json").write_text(json.dumps(openpose_json_data(people, (128, 128))))
    clips = VideoClips(TrainConfig(data=str(tmp_path), output_dir="x", resolution=64, num_frames=3, frame_stride=1))
    weights = clips[0]["loss_weight"]  # (3, 1, 64, 64): the canvas is halved
    assert weights.shape == (3, 1, 64, 64) and (weights[0] == 1).all()  # the reference frame weighs 1
    for frame in weights[1:, 0]:
        assert frame[30, 55].item() == pytest.approx(4.2) and frame[5, 5].item() == 1  # in the box at x 50-60, y 20-30
        assert frame[10:40, 45:64].eq(4.2).sum() > 0 and frame.eq(4.2).sum() < 20 * 20
    off = VideoClips(TrainConfig(data=str(tmp_path), output_dir="x", resolution=64, num_frames=3, frame_stride=1,
                                 hand_loss_weight=1))
    assert (off[0]["loss_weight"] == 1).all()
