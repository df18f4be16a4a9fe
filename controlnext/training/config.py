"""The training configuration: one typed dataclass whose fields carry their help text; the CLI is built from it.

Fields marked `resume=True` shape the training trajectory (what is trained, on what, how fast), so a
checkpoint only resumes under the same values; the others (how long, how often to save or validate,
where to log) may change between runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ControlNextError
from ..request import DTYPES

SELECTION_PRESETS = ("auto", "sd15", "sdxl", "sd3", "spaced", "all", "none")


def option(default, help: str, *, resume: bool = False, choices: tuple | None = None, required: bool = False):
    """A dataclass field with CLI help; `resume` marks fields a checkpoint must agree with."""
    metadata = {"help": help, "resume": resume, "choices": choices, "required": required}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything `train` needs; saved as train_config.json beside the outputs."""

    # -- base model and control -------------------------------------------------------------------
    base: str = option("", "base model: a local diffusers folder (StableDiffusionPipeline, StableDiffusionXLPipeline "
                       "or StableDiffusion3Pipeline layout; or a StableVideoDiffusionPipeline, which trains on videos), a model id in the offline Hugging Face cache or a single "
                       ".safetensors file (default: the embedded default model)")
    method: str = option("controlnext", "control method to train: a method registered in controlnext.methods "
                         "(built in: controlnext, controlnet)", resume=True)
    module_variant: str | None = option(None, "build the control module as a named official layout (sdxl, sd15, "
                                        "sd15-v1, svd, svd-training) instead of --module-config", resume=True)
    module_config: str | None = option(None, "control module sizes: a JSON object or a .json file of ControlNeXtModel "
                                       "arguments (default: the v2 sizes); the injection point and out_channels "
                                       "follow the base model unless given", resume=True)
    init_control: str | None = option(None, "start from saved control weights (our folder or an official release) "
                                      "instead of a freshly initialised module", resume=True)
    trainable: list[str] = option(["auto"], "base denoiser weights to train besides the module: presets (auto: sdxl "
                                  "for an SDXL base, sd3 for an SD3 base, else sd15; sd15: names containing to_out; "
                                  "sdxl: .*attn2.*to_out.*; sd3: the joint blocks' attention outputs attn.to_out.0 "
                                  "and attn.to_add_out; spaced: the attention outputs of every k-th transformer "
                                  "block; all: the whole UNet, as the official SVD recipe; none: module only) and/or "
                                  "regular expressions searched in parameter names", resume=True)
    spaced_every: int = option(2, "with --trainable spaced: train the attention outputs of every k-th transformer "
                               "block, counted from the first", resume=True)
    controlnet_layers: int | None = option(None, "with --method controlnet on an SD3 base: joint blocks the ControlNet "
                                           "copies (default: half of the base's)", resume=True)
    control_scale: float = option(1.0, "strength of the control while training (saved as the recommended scale)",
                                  resume=True)

    # -- data -----------------------------------------------------------------------------------------
    data: str = option("", "training data: a folder with metadata.jsonl; a Hugging Face dataset folder "
                       "(save_to_disk) or parquet file(s) or a folder of them (fill50k layout); or the name of a "
                       "generated data set (controlnext.training.data.GENERATED_DATA). For a video base: a folder "
                       "with videos/ and poses/ (one pose video or frame folder per video, same name), or with "
                       "metadata.jsonl rows {\"video\": ..., \"conditioning_video\": ...}", required=True)
    image_column: str = option("image", "column with the target image (a path relative to the data folder, or an "
                               "image in a Hugging Face dataset)", resume=True)
    conditioning_image_column: str = option("conditioning_image", "column with the condition image", resume=True)
    caption_column: str = option("text", "column with the caption", resume=True)
    annotator: str | None = option(None, "make each condition from its image on the fly with this annotator "
                                   "(controlnext.annotators) instead of reading the condition column", resume=True)
    resolution: int = option(512, "training size in pixels (square); images and conditions of another size are "
                             "resized so that the short side equals it, then centre-cropped", resume=True)
    generated_examples: int = option(50_000, "number of examples of a generated data set", resume=True)
    latent_cache: str = option("", "folder in which each example's VAE latent distribution and condition are kept the "
                               "first time it is drawn and read back after (runs on the same data, size and VAE "
                               "share it; draws are sampled as encoding would); empty: encode every step")
    timestep_density: str = option("logit_normal", "SD3 bases (flow matching): how training draws the noise level, "
                                   "as SD3's own training scripts (logit_normal, mode or uniform), on the "
                                   "scheduler's shifted schedule", resume=True,
                                   choices=("logit_normal", "mode", "uniform"))
    logit_mean: float = option(0.0, "SD3 bases: mean of the logit-normal density", resume=True)
    logit_std: float = option(1.0, "SD3 bases: standard deviation of the logit-normal density", resume=True)
    mode_scale: float = option(1.29, "SD3 bases: scale of the mode density", resume=True)
    loss_weighting: str = option("none", "SD3 bases: loss weighting over noise levels (none, sigma_sqrt, cosmap)",
                                 resume=True, choices=("none", "sigma_sqrt", "cosmap"))
    pixel_loss_weight: float = option(0.0, "image bases with a noise, velocity or sample prediction: weight of a loss "
                                      "on the decoded one-step estimate of the clean image against the training "
                                      "image, its pixels and their differences (edges), for examples below "
                                      "--pixel-loss-max-timestep; 0: the latent objective alone", resume=True)
    pixel_loss_max_timestep: int = option(400, "the pixel loss counts examples drawn below this timestep (of the "
                                          "scheduler's 1,000), where the one-step estimate is sharp", resume=True)
    empty_prompt_ratio: float = option(0.1, "share of captions replaced by the empty prompt, so that classifier-free "
                                       "guidance works with the control", resume=True)
    num_workers: int = option(0, "data loading worker processes")
    num_frames: int = option(14, "video bases: frames per training clip, the reference frame first (the official "
                             "recipe: 14 to 21)", resume=True)
    frame_stride: int = option(2, "video bases: take every k-th frame of a video into a clip", resume=True)
    hand_loss_weight: float = option(4.2, "video bases: loss weight inside the hands' boxes where the poses come with "
                                     "OpenPose JSON (as `controlnext annotate openpose` writes them; the release: "
                                     "1 + 4 x 0.8); 1 weighs every pixel alike", resume=True)
    conditioning_dropout: float = option(0.1, "video bases: with probability p the image embedding alone, p both, p "
                                         "the image latents alone are dropped (zeroed), so that classifier-free "
                                         "guidance works", resume=True)

    # -- optimisation ---------------------------------------------------------------------------------
    max_steps: int = option(1000, "optimizer steps to train for (a resumed run continues up to this step)")
    batch_size: int = option(4, "examples per process and micro-batch", resume=True)
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", resume=True)
    learning_rate: float = option(1e-5, "learning rate of the selected base UNet weights", resume=True)
    module_learning_rate: float | None = option(None, "learning rate of the control module (default: --learning-rate "
                                                "times the method's factor: 10 for controlnext, as its maintainers "
                                                "recommend; 1 for controlnet, whose copy is all it trains)",
                                                resume=True)
    weight_decay: float = option(1e-2, "AdamW weight decay", resume=True)
    lr_scheduler: str = option("constant", "learning-rate schedule after the warm-up", resume=True,
                               choices=("constant", "linear", "cosine", "cosine_with_restarts", "polynomial"))
    lr_warmup_steps: int = option(0, "optimizer steps of linear learning-rate warm-up", resume=True)
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)", resume=True)
    use_8bit_adam: bool = option(False, "use bitsandbytes' 8-bit AdamW (needs bitsandbytes)", resume=True)
    mixed_precision: str = option("no", "compute precision; trainable weights and optimizer state stay fp32",
                                  resume=True, choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = option(False, "recompute UNet activations in the backward pass to save memory")
    seed: int = option(0, "seed of the data order, noise, timesteps and empty prompts", resume=True)
    cpu: bool = option(False, "train on the CPU even when a GPU is present")

    # -- checkpoints and output ------------------------------------------------------------------------
    output_dir: str = option("", "folder for the trained control (loadable by generate), checkpoints, logs and "
                             "validation images", required=True)
    checkpoint_every: int = option(500, "save a resumable checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = option(3, "keep the last K checkpoints (0: keep all)")
    resume: str | None = option(None, "continue from 'latest' (the newest checkpoint in --output-dir, if any) or "
                                "from a checkpoint folder")
    save_increments: bool = option(False, "store the trained base weights as increments over the original base "
                                   "weights instead of absolute values")
    save_precision: str = option("fp32", "precision of the saved control's weights (fp16 or bf16 halve the files; "
                                 "training and its checkpoints' state stay fp32)", choices=DTYPES)

    # -- watching it learn -----------------------------------------------------------------------------
    validation_every: int = option(500, "generate validation images every N optimizer steps (0: never)")
    validation_images: list[str] = option([], "condition image files for validation (default: the conditions of "
                                          "the first --validation-examples examples of the data)")
    validation_prompts: list[str] = option([], "prompts for the validation conditions (one for all, or one each; "
                                           "default: the examples' captions)")
    validation_examples: int = option(4, "how many data examples to validate on when no --validation-images")
    validation_sampling_steps: int = option(20, "sampling steps for validation images (DDIM; Euler for SD3)")
    validation_seed: int | None = option(None, "seed of the validation images' initial noise (default: --seed), so "
                                         "that runs of different seeds can be validated alike")
    guidance_scale: float = option(7.5, "classifier-free guidance scale for validation images; control.json records "
                                   "it as the control's guidance, which generation uses when given none")
    validation_metric: str = option("auto", "control-fidelity metric logged at validation (auto: edge_f1 when "
                                    "controlnext.metrics is installed)",
                                    choices=("auto", "edge_f1", "mask_iou", "none"))
    tensorboard: bool = option(True, "also log to TensorBoard when tensorboard is installed")
    progress_bar: bool = option(True, "show a progress bar")

    # -- helpers ---------------------------------------------------------------------------------------

    def validate(self, needs_data: bool = True) -> TrainConfig:
        """Raise a one-line ControlNextError for values that cannot work (`needs_data`: no examples given in Python)."""
        for item in dataclasses.fields(self):
            if item.metadata.get("required") and not getattr(self, item.name) and (needs_data or item.name != "data"):
                what = item.metadata["help"].split(":")[0]
                raise ControlNextError(f"--{flag_name(item.name)} is required ({what}); see `controlnext train --help`")
            choices = item.metadata.get("choices")
            if choices and getattr(self, item.name) not in choices:
                raise ControlNextError(f"--{flag_name(item.name)} must be one of {', '.join(choices)}, "
                                       f"not {getattr(self, item.name)!r}")
        positive = ("resolution", "batch_size", "gradient_accumulation_steps", "max_steps", "spaced_every",
                    "validation_sampling_steps", "generated_examples")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ControlNextError(f"--{flag_name(name)} must be positive, not {getattr(self, name)}")
        if self.resolution % 8:
            raise ControlNextError(f"--resolution {self.resolution} is not a multiple of 8; pass e.g. "
                                   f"{max(8, round(self.resolution / 8) * 8)}")
        if not 0 <= self.conditioning_dropout <= 1 / 3:
            raise ControlNextError(f"--conditioning-dropout must lie in [0, 1/3], not {self.conditioning_dropout}")
        if self.hand_loss_weight < 0:
            raise ControlNextError(f"--hand-loss-weight must not be negative, not {self.hand_loss_weight}")
        if self.num_frames < 2 or self.frame_stride < 1:
            raise ControlNextError("--num-frames must be at least 2 and --frame-stride at least 1")
        if self.pixel_loss_weight < 0 or self.pixel_loss_max_timestep <= 0:
            raise ControlNextError("--pixel-loss-weight must not be negative and --pixel-loss-max-timestep must be "
                                   f"positive, not {self.pixel_loss_weight} and {self.pixel_loss_max_timestep}")
        if not 0 <= self.empty_prompt_ratio <= 1:
            raise ControlNextError(f"--empty-prompt-ratio must lie in [0, 1], not {self.empty_prompt_ratio}")
        if self.module_variant and self.module_config:
            raise ControlNextError("give either --module-variant or --module-config, not both")
        if self.init_control and (self.module_variant or self.module_config):
            raise ControlNextError("--init-control brings its own module; drop --module-variant/--module-config")
        return self

    @property
    def module_lr(self) -> float:
        """The control model's learning rate: --module-learning-rate, else the method's multiple of --learning-rate."""
        if self.module_learning_rate is not None:
            return self.module_learning_rate
        from ..methods import METHODS

        method = METHODS.get(self.method)  # an unknown method is refused where training starts
        return (method.module_lr_factor if method else 1.0) * self.learning_rate

    @property
    def sampling_seed(self) -> int:
        """The seed of the validation images' initial noise."""
        return self.seed if self.validation_seed is None else self.validation_seed

    def resume_fields(self) -> dict:
        """The values a checkpoint records and a resumed run must repeat; with them the module's learning rate
        as used (`module_lr`), which a method's default sets when --module-learning-rate is not given."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("resume")}
        return {**fields, "module_lr": self.module_lr}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ControlNextError(f"unknown training option(s) {', '.join(unknown)}; see `controlnext train --help`")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ControlNextError(f"cannot read training configuration {path}: {error}") from None
        return cls.from_dict(values)


# -- command-line flags from the dataclass --------------------------------------------------------------

def flag_name(name: str) -> str:
    return name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per field, typed from its annotation; values left out stay absent (argparse.SUPPRESS)."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        kind = hints[item.name]
        help_text = item.metadata["help"]
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        if default not in (None, "", [], False):
            help_text += f" (default: {default})"
        kwargs: dict = dict(help=help_text, default=argparse.SUPPRESS, dest=item.name)
        if item.metadata.get("choices"):
            kwargs["choices"] = item.metadata["choices"]
        base_kind = _strip_optional(kind)
        if base_kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base_kind) is list:
            kwargs.update(nargs="*", type=typing.get_args(base_kind)[0], metavar=_metavar(item.name).removesuffix("S"))
        else:
            kwargs.update(type=base_kind)
            if not item.metadata.get("choices"):
                kwargs["metavar"] = {int: "N", float: "X"}.get(base_kind, _metavar(item.name))
        parser.add_argument(f"--{flag_name(item.name)}", **kwargs)


def config_from_args(args: argparse.Namespace, cls=TrainConfig) -> TrainConfig:
    """Fields given on the command line over those of --config FILE over the defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    config_file = getattr(args, "config", None)
    values = dataclasses.asdict(cls.from_json(config_file)) if config_file else {}
    return cls.from_dict({**values, **given})


def _metavar(name: str) -> str:
    return name.split("_")[-1].upper()


def _strip_optional(kind):
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return args[0]
    return kind
