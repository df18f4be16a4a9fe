"""Settings of the web app; `controlnext serve` makes one flag per field from the help text here."""

from __future__ import annotations

from dataclasses import dataclass, field


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class WebConfig:
    host: str = _help("address to listen on (127.0.0.1: this machine only)", default="127.0.0.1")
    port: int = _help("port to listen on", default=7860)
    models_dir: list[str] = _help("folder of diffusers model folders, control folders and LoRA files (repeatable)",
                                  default_factory=list)
    base: list[str] = _help("a base model to offer: diffusers folder, .safetensors file or cached model id (repeatable)",
                            default_factory=list)
    control: list[str] = _help("a control folder to offer (repeatable)", default_factory=list)
    lora: list[str] = _help("a LoRA .safetensors file to offer (repeatable)", default_factory=list)
    video_base: str | None = _help("a Stable Video Diffusion base for the Video tab: diffusers folder or cached "
                                   "model id", default=None)
    video_control: list[str] = _help("a ControlNeXt video (pose) control for the Video tab (repeatable)",
                                     default_factory=list)
    hide_embedded: bool = _help("do not offer the models shipped in the package (default base, its controls)",
                                default=False)
    tiny_demo: bool = _help("also offer a tiny random model (and a tiny random video model) written to a temporary "
                            "folder (shows the app working without any weights; its images are noise)", default=False)
    device: str = _help("cpu, cuda, cuda:1, mps or auto", default="auto")
    dtype: str | None = _help("fp32, fp16 or bf16 (default: fp32 on CPU, fp16 on GPU)", default=None)
    queue_size: int = _help("jobs that may wait or run at once; more are refused with 503 and Retry-After", default=8)
    cache_size: int = _help("pipelines kept loaded (one per base, controls, task and LoRAs)", default=2)
    max_body_mb: float = _help("largest request body in MB; larger ones get 413", default=20.0)
    ui_units: int = _help("control units shown in the web UI", default=2)
    output_dir: str | None = _help("folder for the web UI's images (default: a temporary folder)", default=None)
    api_only: bool = _help("serve the HTTP API without the web UI", default=False)
    threads: int | None = _help("CPU threads for torch (default: torch's choice)", default=None)

    def check(self) -> None:
        """Raise a one-line error for a setting no server can run with (before anything heavy loads)."""
        from ..errors import ControlNextError

        if not 0 <= self.port <= 65535:
            raise ControlNextError(f"--port {self.port} is not a port number; use 0..65535 (e.g. 7860)")
        for name in ("queue_size", "cache_size", "ui_units"):
            if getattr(self, name) < 1:
                raise ControlNextError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if not self.max_body_mb > 0:
            raise ControlNextError(f"--max-body-mb must be positive, not {self.max_body_mb}")
        if self.threads is not None and self.threads < 1:
            raise ControlNextError(f"--threads must be at least 1, not {self.threads}")
        if self.dtype not in (None, "fp32", "fp16", "bf16"):
            raise ControlNextError(f"--dtype {self.dtype!r}: use fp32, fp16 or bf16")
