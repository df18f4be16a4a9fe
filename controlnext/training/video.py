"""Training a control on Stable Video Diffusion: clips of videos with their pose videos, the official objective.

The objective of ControlNeXt's SVD-v2 training: the UNet is EDM-preconditioned as SVD was trained
(Karras et al., 2022, Table 1 with sigma_data = 1 and v-prediction: c_in = 1/sqrt(s^2 + 1), c_out =
-s/sqrt(s^2 + 1), c_skip = 1/(s^2 + 1), c_noise = log(s)/4), the loss is the MSE of the denoised latents
weighted by (1 + s^2)/s^2, and noise levels are drawn from the interpolated cosine schedule of simple
diffusion (Hoogeboom et al., 2023, Sec. 4) by stratified sampling. Clips start with a reference frame and
its pose, as the release builds them, and the loss weighs the hands' boxes more (where the poses carry
OpenPose JSON); conditioning dropout zeroes the image embedding, the image latents
or both, as in InstructPix2Pix (Brooks et al., 2023, Sec. 3.2.1), so that guidance works.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ControlNextError
from ..annotators.openpose_format import read_openpose_json
from ..images import cover_and_crop_box, fit_image, pil_to_tensor, to_rgb
from ..videos import VIDEO_SUFFIXES, frame_count, frame_files, read_frames
from .config import TrainConfig
from .data import derive_seed

VIDEO_PIPELINE = "StableVideoDiffusionPipeline"
# The micro-conditioning of the official training: frame rate 6 (SVD sees fps - 1), motion bucket 127, noise
# augmentation 0.02 of the reference image.
FPS_ID, MOTION_BUCKET, NOISE_AUG = 6, 127, 0.02
# simple diffusion's interpolated cosine schedule as the release sets it
SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 700.0, 0.5
IMAGE_D, NOISE_D_LOW, NOISE_D_HIGH = 64, 32, 64


def is_video_base(source: str | Path | None) -> bool:
    """True for a local diffusers folder or a cached model id whose pipeline is a StableVideoDiffusionPipeline."""
    if not source:
        return False
    index = Path(source) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("_class_name") == VIDEO_PIPELINE
    if "/" in str(source) and not Path(source).exists():
        from diffusers import DiffusionPipeline

        try:
            config = DiffusionPipeline.load_config(str(source), local_files_only=True)
        except (OSError, ValueError):
            return False
        return config.get("_class_name") == VIDEO_PIPELINE
    return False


# -- noise levels ------------------------------------------------------------------------------------

def cosine_interpolated_logsnr(u: torch.Tensor) -> torch.Tensor:
    """log SNR at u in [0, 1] (0: the most noise, sigma 700; 1: the least, sigma 0.002), simple diffusion's cosine
    schedule shifted for a 32-pixel and a 64-pixel noise resolution, interpolated between the two by u."""
    most = 2 * math.log(SIGMA_DATA / SIGMA_MAX)  # log SNR at sigma_max
    least = 2 * math.log(SIGMA_DATA / SIGMA_MIN)

    def shifted(noise_d: float) -> torch.Tensor:
        shift = 2 * math.log(noise_d / IMAGE_D)
        start, end = math.atan(math.exp(-0.5 * (most - shift))), math.atan(math.exp(-0.5 * (least - shift)))
        return -2 * torch.log(torch.tan(start + u * (end - start))) + shift

    return torch.lerp(shifted(NOISE_D_LOW), shifted(NOISE_D_HIGH), u)


def sample_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """n noise levels, one per stratum of [0, 1] (stratified sampling), through the interpolated cosine schedule."""
    u = (torch.arange(n) + torch.rand(n, generator=generator)) / n  # (n,)
    return SIGMA_DATA * torch.exp(-cosine_interpolated_logsnr(u) / 2)


def preconditioning(sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
    """SVD's EDM preconditioning (v-prediction, sigma_data 1) and the loss weight, for sigmas shaped to broadcast."""
    root = torch.sqrt(sigmas ** 2 + 1)
    return {"c_in": 1 / root, "c_out": -sigmas / root, "c_skip": 1 / (sigmas ** 2 + 1),
            "c_noise": 0.25 * torch.log(sigmas), "weight": (1 + sigmas ** 2) / sigmas ** 2}


def dropout_masks(p: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep the image embedding, keep the image latents) per sample from uniform draws p: the embedding is
    dropped for p < 2 rate, the latents for rate <= p < 3 rate; both for rate <= p < 2 rate."""
    keep_embedding = p >= 2 * rate
    keep_latents = (p < rate) | (p >= 3 * rate)
    return keep_embedding, keep_latents


# -- data --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    video: Path
    poses: Path | None  # None: poses made by the annotator
    start: int  # first frame of the clip (the frames follow at the stride)


class VideoClips(torch.utils.data.Dataset):
    """Clips of `num_frames` frames at `frame_stride` from each video, with the matching pose frames.

    Every video gives as many non-overlapping clips as it holds; frame 0 of a clip is replaced by a
    reference frame drawn from the whole video (seeded by the clip), and its pose by the reference's pose,
    as the release's training does: the model learns to animate a frame it was given.
    """

    def __init__(self, config: TrainConfig):
        self.size, self.frames, self.stride = config.resolution, config.num_frames, config.frame_stride
        self.seed, self.annotator, self.hand_weight = config.seed, config.annotator, config.hand_loss_weight
        pairs = video_pairs(Path(config.data), needs_poses=not config.annotator)
        span = (self.frames - 1) * self.stride + 1
        self.clips: list[Clip] = []
        self.lengths: dict[Path, int] = {}
        short = []
        for video, poses in pairs:
            count = frame_count(video)
            if poses is not None:
                count = min(count, frame_count(poses))
            self.lengths[video] = count
            if count < span:
                short.append(video.name)
            self.clips += [Clip(video, poses, start) for start in range(0, count - span + 1, span)]
        if not self.clips:
            raise ControlNextError(f"no video in {config.data} holds a clip of {self.frames} frames at stride "
                                   f"{self.stride} ({span} frames); use shorter --num-frames or --frame-stride")
        if short:
            print(f"note: {len(short)} video(s) shorter than a clip ({span} frames) are left out: "
                  f"{', '.join(short[:3])}")
        if config.annotator:
            from .data import annotation_function

            annotation_function()

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        rng = np.random.default_rng(derive_seed(self.seed, index))
        reference = int(rng.integers(self.lengths[clip.video]))
        indices = [reference] + [clip.start + k * self.stride for k in range(1, self.frames)]
        frames = [self._fit(frame) for frame in read_frames(clip.video, indices)]
        if clip.poses is not None:
            poses = [self._fit(frame) for frame in read_frames(clip.poses, indices)]
        else:
            from .data import annotation_function

            annotate = annotation_function()
            poses = [to_rgb(annotate(self.annotator, frame)) for frame in frames]
        pixels = torch.stack([pil_to_tensor(frame) for frame in frames]) * 2 - 1  # (f, 3, R, R) in [-1, 1]
        return {
            "pixel_values": pixels,
            "reference": pixels[0],  # (3, R, R): the frame to animate
            "conditioning": torch.stack([pil_to_tensor(pose) for pose in poses]),  # (f, 3, R, R) in [0, 1]
            "loss_weight": self._hand_weights(clip, indices),  # (f, 1, R, R)
        }

    def _hand_weights(self, clip: Clip, indices: list[int]) -> torch.Tensor:
        """hand_loss_weight inside each hand's box (keypoints' bounds and a margin) of the clip's pose JSON files,
        1 elsewhere and on the reference frame, as the release weighs its loss."""
        weights = torch.ones(len(indices), 1, self.size, self.size)
        files = frame_files(clip.poses, (".json",)) if clip.poses is not None and clip.poses.is_dir() else []
        files = [f for f in files if f.stem != "reference"]
        if self.hand_weight == 1 or not files:
            return weights
        for position, index in enumerate(indices[1:], start=1):
            if index >= len(files):
                continue
            people, canvas, normalized = read_openpose_json(files[index])
            canvas = (1, 1) if normalized else canvas
            if canvas is None:
                continue
            (width, height), (top, left) = cover_and_crop_box(canvas[0], canvas[1], self.size, self.size)
            scale = width / canvas[0]
            margin = 0.02 * min(width, height)
            for person in people:
                for hand in (person.left_hand, person.right_hand):
                    if hand is None or not (hand[:, 2] > 0).any():
                        continue
                    seen = hand[hand[:, 2] > 0, :2] * scale - (left, top)  # pixels of the training crop
                    x0, y0 = (seen.min(axis=0) - margin).clip(0, self.size).astype(int)
                    x1, y1 = np.ceil(seen.max(axis=0) + margin).clip(0, self.size).astype(int)
                    weights[position, :, y0:y1, x0:x1] = self.hand_weight
        return weights

    def _fit(self, frame: Image.Image) -> Image.Image:
        return fit_image(to_rgb(frame), self.size, self.size)


def video_pairs(folder: Path, needs_poses: bool = True) -> list[tuple[Path, Path | None]]:
    """(video, pose video) pairs: metadata.jsonl rows, or videos/NAME.* beside poses/NAME.* (or poses/NAME/)."""
    if not folder.is_dir():
        raise ControlNextError(f"--data {folder}: no such folder; a video base trains on a folder with videos/ and "
                               "poses/, or with metadata.jsonl")
    if (folder / "metadata.jsonl").is_file():
        from .data import read_metadata

        rows, columns = read_metadata(folder)
        wanted = ["video"] + (["conditioning_video"] if needs_poses else [])
        for column in wanted:
            if column not in columns:
                raise ControlNextError(f"{folder / 'metadata.jsonl'} has no {column!r} field (fields: "
                                       f"{', '.join(columns)}); video rows need video and conditioning_video")
        pairs = [(folder / row["video"], folder / row["conditioning_video"] if needs_poses else None) for row in rows]
    else:
        videos = folder / "videos"
        if not videos.is_dir():
            raise ControlNextError(f"--data {folder}: expected videos/ and poses/ folders (or metadata.jsonl)")
        pairs = []
        for video in sorted(p for p in videos.iterdir() if p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES):
            poses = _pose_source(folder / "poses", video.stem if video.is_file() else video.name)
            if poses is None and needs_poses:
                raise ControlNextError(f"no poses for {video.name} in {folder / 'poses'} (a video or frame folder of "
                                       f"the same name); make them with `controlnext annotate openpose {video} -o "
                                       f"{folder / 'poses' / video.stem}` or pass --annotator openpose")
            pairs.append((video, poses))
    for video, poses in pairs:
        for path in (video, poses):
            if path is not None and not path.exists():
                raise ControlNextError(f"video not found: {path}")
    if not pairs:
        raise ControlNextError(f"--data {folder} holds no videos")
    return pairs


def _pose_source(folder: Path, name: str) -> Path | None:
    if (folder / name).is_dir():
        return folder / name
    return next((p for p in sorted(folder.glob(f"{name}.*")) if p.suffix.lower() in VIDEO_SUFFIXES), None)


# -- the objective -------------------------------------------------------------------------------------

@torch.no_grad()
def encode_reference(base, reference: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference frames (b, 3, H, W) in [-1, 1] -> (CLIP image embeddings (b, 1, d), image latents (b, 4, h, w)).

    As the SVD pipeline: CLIP sees the frame resized to 224 with antialiasing; the VAE sees it with noise
    augmentation, its latents unscaled."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    pipe, device = base.pipe, reference.device
    small = (_resize_with_antialiasing(reference.float(), (224, 224)) + 1) / 2  # (b, 3, 224, 224) in [0, 1]
    pixels = pipe.feature_extractor(images=small.cpu(), do_normalize=True, do_center_crop=False, do_resize=False,
                                    do_rescale=False, return_tensors="pt").pixel_values
    encoder = pipe.image_encoder
    embeddings = encoder(pixels.to(device, encoder.dtype)).image_embeds[:, None]  # (b, 1, d)
    noisy = reference + NOISE_AUG * torch.randn(reference.shape, generator=generator).to(device)
    latents = base.vae.encode(noisy.to(base.vae.dtype)).latent_dist.sample(generator=generator)  # (b, 4, h, w)
    return embeddings, latents


def video_loss(model, base, batch: dict, config: TrainConfig, generator: torch.Generator, device) -> torch.Tensor:
    """The release's objective: weighted MSE of the EDM-denoised latents at noise levels of the interpolated cosine
    schedule, with the pose condition of every frame attached through the control."""
    pixels = batch["pixel_values"].to(device)  # (b, f, 3, H, W)
    b, f = pixels.shape[:2]
    latents = base.encode_images(pixels.flatten(0, 1), generator)  # (b*f, 4, h, w), scaled
    latents = latents.view(b, f, *latents.shape[1:])  # (b, f, 4, h, w)
    embeddings, image_latents = encode_reference(base, batch["reference"].to(device), generator)
    keep_embedding, keep_latents = dropout_masks(torch.rand(b, generator=generator), config.conditioning_dropout)
    embeddings = embeddings * keep_embedding.to(device, embeddings.dtype).view(b, 1, 1)
    image_latents = image_latents.float() * keep_latents.to(device).view(b, 1, 1, 1)
    sigmas = sample_sigmas(b, generator).to(device)  # (b,)
    c = preconditioning(sigmas.view(b, 1, 1, 1, 1))
    noise = torch.randn(latents.shape, generator=generator).to(device)
    noisy = latents + noise * sigmas.view(b, 1, 1, 1, 1)  # (b, f, 4, h, w)
    model_input = torch.cat([noisy * c["c_in"], image_latents[:, None].expand(b, f, *image_latents.shape[1:])], dim=2)
    time_ids = torch.tensor([[FPS_ID, MOTION_BUCKET, NOISE_AUG]], device=device).expand(b, 3)
    condition = batch["conditioning"].to(device).flatten(0, 1)  # (b*f, 3, H, W): one pose per frame
    prediction = model(model_input, c["c_noise"].flatten(), embeddings, condition, added_time_ids=time_ids)
    denoised = prediction.float() * c["c_out"] + noisy * c["c_skip"]  # (b, f, 4, h, w)
    hands = F.adaptive_avg_pool2d(batch["loss_weight"].to(device).flatten(0, 1), latents.shape[-2:])  # (b*f, 1, h, w)
    return (c["weight"] * hands.view(b, f, 1, *latents.shape[-2:]) * (denoised - latents) ** 2).mean()


# -- watching it learn --------------------------------------------------------------------------------

def validation_clip(dataset: VideoClips) -> dict:
    """The first clip: its reference frame and poses, to animate at each validation."""
    return dataset[0]


@torch.no_grad()
def validate_video(base, control, clip: dict, folder: Path, step: int, *, steps: int, seed: int, scale: float) -> Path:
    """Animate the clip's reference with its poses through the video pipeline and save MP4 and a strip of frames."""
    from ..control.loading import LoadedControl
    from ..pipelines.video import ControlledVideoPipeline
    from ..videos import write_mp4

    module = copy.deepcopy(control)  # the pipeline moves its controls to the base's dtype; training keeps fp32
    pipe = ControlledVideoPipeline(base.pipe, [LoadedControl(module, scale=scale, source="training")],
                                   fuse_unet_weights=False)
    reference = Image.fromarray(((clip["reference"].permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5)
                                .clip(0, 255).astype("uint8"))
    size = reference.size
    frames = pipe(reference, control_frames=clip["conditioning"], width=size[0], height=size[1],
                  num_inference_steps=steps, min_guidance_scale=3.0, max_guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(seed)).frames[0]
    folder.mkdir(parents=True, exist_ok=True)
    strip = Image.new("RGB", (size[0] * len(frames), size[1] * 2))
    for k, (frame, pose) in enumerate(zip(frames, clip["conditioning"])):
        strip.paste(Image.fromarray((pose.permute(1, 2, 0).float().cpu().numpy() * 255).astype("uint8")), (k * size[0], 0))
        strip.paste(frame, (k * size[0], size[1]))
    strip.save(folder / f"step-{step:06d}.png")
    return write_mp4(frames, folder / f"step-{step:06d}.mp4", fps=7)
