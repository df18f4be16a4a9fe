"""Stable Video Diffusion with control: diffusers' StableVideoDiffusionPipeline, called as diffusers users call it.

`ControlledVideoPipeline(pipe, controls)(image, control_frames=[...], ...)` animates a reference image
so that frame k follows condition k (for a pose control: `[reference pose] + driving poses`). Control
attaches through `attach_control`, frames flattened into the batch as the UNet sees them, on the
conditional half of classifier-free guidance only (the unconditional half keeps the zero image
embeddings and latents the diffusers pipeline gives it), as ControlNeXt's SVD release does.

Videos longer than one window of the base are denoised in sliding windows (as in ControlNeXt's SVD
release): at every step each window of `frames_per_window` frames, `overlap` of them shared with the
previous window, is one UNet call whose condition frame 0 is the reference's; windows after the first
drop their position-0 output (that frame is not the reference frame there) and frames predicted by
several windows are averaged. The official code steps the scheduler once per window (resetting its
step index) and averages the stepped latents; here the predictions are averaged and the scheduler
steps once, which is the same for the Euler scheduler of SVD (its step is affine in the prediction)
and keeps multistep schedulers' state right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from ..control import ControlUnit, attach_control
from ..control.loading import LoadedControl, load_control
from ..errors import ControlNextError
from ..images import check_size, load_image, prepare_condition
from .controlled import _per_control

VIDEO_FAMILY = "StableVideoDiffusionPipeline"


@dataclass(frozen=True)
class Window:
    """One UNet call of a sliding-window step: the video frames it denoises and the ones whose output it keeps."""

    frames: tuple[int, ...]  # video frame indices, in order
    keep_from: int  # 0 for the first window; 1 after: position 0 carries the reference's condition

    @property
    def control_frames(self) -> tuple[int, ...]:
        """Indices into the condition sequence: position 0 always takes the reference's condition (frame 0)."""
        return (0, *self.frames[1:])


def plan_windows(num_frames: int, frames_per_window: int | None = None, overlap: int = 0) -> list[Window]:
    """Windows over `num_frames` frames: starts 0, w - o, 2(w - o), ..., the last moved back to end the video."""
    window = frames_per_window or num_frames
    if window < 2:
        raise ControlNextError(f"a window needs at least 2 frames, not {window}")
    if num_frames < window:
        raise ControlNextError(f"the video has {num_frames} frames, fewer than one window of {window}; give a "
                               f"longer driving video (or a smaller stride), or a window of at most {num_frames}")
    if num_frames == window:
        return [Window(tuple(range(num_frames)), 0)]
    if not 1 <= overlap < window - 1:
        raise ControlNextError(f"windows of {window} frames over {num_frames} must overlap by 1 to {window - 2} "
                               f"frames (each later window drops its first frame), not {overlap}")
    starts = []
    for start in range(0, num_frames - overlap, window - overlap):
        start = min(start, num_frames - window)
        if start not in starts:
            starts.append(start)
    return [Window(tuple(range(start, start + window)), 0 if start == 0 else 1) for start in starts]


class WindowedUNet(nn.Module):
    """Stands in for the video UNet in one pipeline call: one real UNet call per window, overlaps averaged.

    Before each call the controls' conditions are set to the window's frames, so the attachment on the real
    UNet sees one window at a time. Attributes the pipeline reads (config, dtype, add_embedding, ...) are
    the UNet's.
    """

    def __init__(self, unet: nn.Module, windows: list[Window], units: list[ControlUnit],
                 conditions: list[torch.Tensor], progress=None):
        super().__init__()
        self.unet = unet
        self.windows, self.units, self.conditions, self.progress = windows, units, conditions, progress

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args,
                return_dict: bool = True, **kwargs):
        """sample (b, frames, c, h, w) -> prediction (b, frames, c_out, h, w), window by window."""
        total, counts = None, torch.zeros(sample.shape[1], device=sample.device, dtype=sample.dtype)
        for window in self.windows:
            frames = list(window.frames)
            for unit, condition in zip(self.units, self.conditions):
                unit.condition = condition[list(window.control_frames)]  # (window, c, H, W)
            out = self.unet(sample[:, frames], timestep, encoder_hidden_states, *args, return_dict=False,
                            **kwargs)[0]  # (b, window, c_out, h, w)
            if total is None:
                total = out.new_zeros((sample.shape[0], sample.shape[1], *out.shape[2:]))
            kept = frames[window.keep_from:]
            total[:, kept] += out[:, window.keep_from:]
            counts[kept] += 1
            if self.progress is not None:
                self.progress.update(1)
        prediction = total / counts.view(1, -1, 1, 1, 1)
        if not return_dict:
            return (prediction,)
        from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput

        return UNetSpatioTemporalConditionOutput(sample=prediction)


class ControlledVideoPipeline:
    """Wraps a diffusers StableVideoDiffusionPipeline and its controls; `self.pipe` stays unmodified.

    `pipe(image, control_frames=frames, frames_per_window=..., overlap=..., **svd_kwargs)` takes every
    argument of `StableVideoDiffusionPipeline.__call__` (height, width, num_inference_steps,
    min_guidance_scale, max_guidance_scale, fps, motion_bucket_id, noise_aug_strength, decode_chunk_size,
    generator, output_type, ...) and returns its output. Trained UNet tensors of a control (the SVD
    release ships a whole UNet) are written into the base UNet once, as in the official code, unless
    `fuse_unet_weights=False` (then they are swapped in while the control acts, at twice the memory).
    """

    def __init__(self, pipe, controls: Sequence[LoadedControl] = (), fuse_unet_weights: bool = True):
        if type(pipe).__name__ != VIDEO_FAMILY:
            raise ControlNextError(f"{type(pipe).__name__} is not a Stable Video Diffusion pipeline")
        self.pipe = pipe
        self.controls = list(controls)
        device = pipe._execution_device
        for control in self.controls:
            if control.model.dtype != pipe.unet.dtype:
                control.model.to(pipe.unet.dtype)
            control.model.to(device)
            if fuse_unet_weights and control.unet_weights:
                fuse_weights(pipe.unet, control.unet_weights)
                control.unet_weights = None

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        controls: Sequence[str | Path | LoadedControl] = (),
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        cpu_offload: bool = False,
        allow_pickle: bool = False,
        allow_download: bool = False,
        cache_dir: str | None = None,
        fuse_unet_weights: bool = True,
        **control_options,
    ) -> "ControlledVideoPipeline":
        """Load a Stable Video Diffusion base (local folder or cached model id) and controls onto `device`."""
        pipe = load_video_base(base, device=device, dtype=dtype, cpu_offload=cpu_offload,
                               allow_download=allow_download, cache_dir=cache_dir)
        loaded = [c if isinstance(c, LoadedControl) else
                  load_control(c, pipe.unet, allow_pickle=allow_pickle, **control_options) for c in controls]
        return cls(pipe, loaded, fuse_unet_weights=fuse_unet_weights)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["pipe"], name)

    def __call__(
        self,
        image: Image.Image | str | Path,
        *,
        control_frames: Sequence | torch.Tensor | None = None,
        control_scales: Sequence[float] | float | None = None,
        control_starts: Sequence[float] | float = 0.0,
        control_ends: Sequence[float] | float = 1.0,
        apply_to: str = "cond",
        frames_per_window: int | None = None,
        overlap: int = 0,
        progress: bool = False,
        **kwargs,
    ):
        from tqdm.auto import tqdm

        pipe, n = self.pipe, len(self.controls)
        sequences = _sequences(control_frames, n)
        scales = _per_control(control_scales, [c.scale for c in self.controls], n, "scale")
        starts = _per_control(control_starts, None, n, "start")
        ends = _per_control(control_ends, None, n, "end")
        image = load_image(image) if isinstance(image, (str, Path)) else image
        width = kwargs.setdefault("width", 1024)
        height = kwargs.setdefault("height", 576)
        check_size(width, height, pipe.vae_scale_factor, "video")
        num_frames = kwargs.get("num_frames")
        lengths = {len(sequence) for sequence in sequences}
        if len(lengths) > 1:
            raise ControlNextError(f"the controls' condition sequences differ in length ({sorted(lengths)}); "
                                   "give each control one condition per frame")
        if lengths:
            count = lengths.pop()
            if num_frames is not None and num_frames != count:
                raise ControlNextError(f"{count} condition frames for a video of {num_frames} frames; give one "
                                       "condition per frame (the reference's first)")
            num_frames = count
        num_frames = num_frames or pipe.unet.config.num_frames
        kwargs["num_frames"] = num_frames
        windows = plan_windows(num_frames, frames_per_window, overlap)

        units = [
            ControlUnit(control.model, None, scale, start, end, name=Path(control.source).name,
                        unet_weights=control.unet_weights)
            for control, scale, start, end in zip(self.controls, scales, starts, ends)
        ]
        conditions = [_condition_tensor(sequence, width, height, control.model)
                      for sequence, control in zip(sequences, self.controls)]  # (frames, 3, H, W) each
        steps = len(kwargs["sigmas"]) if kwargs.get("sigmas") is not None else kwargs.get("num_inference_steps", 25)
        bar = tqdm(total=steps * len(windows), desc=f"denoising ({len(windows)} window{'s' * (len(windows) > 1)})",
                   disable=not progress)
        windowed = WindowedUNet(pipe.unet, windows, units, conditions, bar)
        view = type(pipe)(**{**pipe.components, "unet": windowed})  # the same models, this call's UNet stand-in
        view.set_progress_bar_config(disable=True)
        cfg = max(kwargs.get("max_guidance_scale", 3.0), kwargs.get("min_guidance_scale", 1.0)) > 1
        try:
            with attach_control(pipe.unet, units, scheduler=pipe.scheduler, apply_to=apply_to, cfg=cfg):
                return view(image, **kwargs)
        finally:
            bar.close()
            pipe.maybe_free_model_hooks()


def fuse_weights(unet: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Write trained tensors into the base UNet's parameters for good."""
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def load_video_base(source: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                    cpu_offload: bool = False, allow_download: bool = False, cache_dir: str | None = None):
    """A StableVideoDiffusionPipeline from a local diffusers folder or a model id in the offline HF cache."""
    import json

    from diffusers import StableVideoDiffusionPipeline

    path = Path(source)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ControlNextError(f"{path} is not a diffusers model folder (no model_index.json)")
        class_name = json.loads(index.read_text()).get("_class_name", "")
        if class_name != VIDEO_FAMILY:
            raise ControlNextError(f"{path} holds a {class_name}; video needs a Stable Video Diffusion model "
                                   "(StableVideoDiffusionPipeline, e.g. stable-video-diffusion-img2vid-xt-1-1)")
        local_only = True
    elif "/" in str(source) and not str(source).startswith((".", "/")):
        local_only = not allow_download
    else:
        raise ControlNextError(f"base model not found: {source} (give a diffusers folder or a model id)")
    try:
        pipe = StableVideoDiffusionPipeline.from_pretrained(str(source), dtype=dtype, local_files_only=local_only,
                                                            cache_dir=cache_dir)
    except (OSError, ValueError) as error:
        if local_only and not path.exists():
            raise ControlNextError(f"{source} is not in the local Hugging Face cache; download it first "
                                   f"(`huggingface-cli download {source}`) or pass --allow-download") from None
        raise ControlNextError(f"cannot load {source}: {str(error).splitlines()[0][:200]}") from None
    pipe.set_progress_bar_config(disable=True)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def _sequences(control_frames, n: int) -> list[list]:
    """One sequence of condition frames per control (a single sequence may be given bare for one control)."""
    if control_frames is None:
        sequences = []
    elif isinstance(control_frames, torch.Tensor) or (len(control_frames) and _is_frame(control_frames[0])):
        sequences = [control_frames]
    else:
        sequences = list(control_frames)
    if len(sequences) != n:
        raise ControlNextError(f"{n} control(s) loaded but {len(sequences)} condition sequence(s) given; "
                               "give one sequence of frames per control")
    for sequence in sequences:
        if len(sequence) == 0:
            raise ControlNextError("a condition sequence is empty; give one condition frame per video frame")
    return sequences


def _is_frame(item) -> bool:
    return isinstance(item, (Image.Image, str, Path)) or (isinstance(item, torch.Tensor) and item.ndim == 3)


def _condition_tensor(sequence, width: int, height: int, model: nn.Module) -> torch.Tensor:
    """Condition frames (images or paths of any size, or a (frames, 3, height, width) tensor in [0, 1]) ->
    (frames, 3, height, width): images are covered and centre-cropped to the video size, as every condition is."""
    if isinstance(sequence, torch.Tensor):
        frames = sequence
    else:
        items = [load_image(item) if isinstance(item, (str, Path)) else item for item in sequence]
        sizes = {item.size for item in items if isinstance(item, Image.Image)}
        if len(sizes) > 1:
            raise ControlNextError(f"the condition frames differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))})"
                                   "; give frames of one size")
        frames = torch.stack([item if isinstance(item, torch.Tensor) else
                              prepare_condition(item, width, height) for item in items])
    if frames.ndim != 4 or frames.shape[1] != 3 or tuple(frames.shape[-2:]) != (height, width):
        raise ControlNextError(f"condition frames given as a tensor must be (frames, 3, {height}, {width}), the "
                               f"video's size, not {tuple(frames.shape)}; images of any size are covered and cropped")
    return frames.to(device=model.device, dtype=model.dtype)


__all__ = ["ControlledVideoPipeline", "Window", "WindowedUNet", "load_video_base", "plan_windows"]
