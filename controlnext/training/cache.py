"""Each training example encoded once: its VAE latent distribution and condition kept on disk, read back after.

Encoding the target image is often as costly as the denoiser's own step (a small model, a CPU); the
latent distribution (mean, std) of an example does not change while the VAE is frozen, so it is stored
the first time the example is drawn and every later draw samples from it, as encoding would
(latents = mean + std * noise, scaled). One file per example, written whole or not at all, so runs in
parallel processes can share a folder. Entries live under a key made of the data, the resolution, the
annotator and the VAE's weights: a changed VAE or data set starts a new key, never a stale read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ControlNextError
from .config import TrainConfig


def vae_digest(vae: torch.nn.Module) -> str:
    """A hash of the VAE's configuration and weights."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")},
                                       sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def data_identity(config: TrainConfig) -> dict:
    """What the examples depend on: the data (with its metadata file's size and time when it is a folder), the
    columns, the annotator and the resolution."""
    identity = {"data": config.data, "resolution": config.resolution, "annotator": config.annotator,
                "columns": [config.image_column, config.conditioning_image_column, config.caption_column]}
    metadata = Path(config.data) / "metadata.jsonl"
    if metadata.is_file():
        stat = metadata.stat()
        identity["metadata"] = [stat.st_size, stat.st_mtime_ns]
    return identity


class LatentCache(torch.utils.data.Dataset):
    """A ControlDataset whose items carry the image's latent distribution ("latent_mean", "latent_std", each
    (c, h, w) float32) in place of its pixels, encoded by `vae` the first time and read from `folder` after.

    With `workers` > 0 the examples are encoded in data-loading processes, which are forked and so cannot use a
    GPU (where the trainer moves `vae` later): they encode with a CPU copy of it, made here, before they start."""

    def __init__(self, dataset, folder: str | Path, vae: torch.nn.Module, identity: dict, workers: int = 0):
        self.dataset, self.vae = dataset, vae
        self.worker_vae = copy.deepcopy(vae).to("cpu", torch.float32) if workers else vae
        identity = {**identity, "vae": vae_digest(vae)}
        self.folder = Path(folder) / hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "key.json").write_text(json.dumps(identity, indent=1))
        except OSError as error:
            raise ControlNextError(f"cannot write the latent cache in {folder} ({error.strerror}); "
                                   "give a writable --latent-cache folder") from None

    def __len__(self) -> int:
        return len(self.dataset)

    def path(self, index: int) -> Path:
        return self.folder / f"{index // 1000:04d}" / f"{index:07d}.safetensors"

    def __getitem__(self, index: int) -> dict:
        path = self.path(index)
        if path.is_file():
            with safe_open(str(path), framework="pt") as file:  # the caption is the file's metadata
                tensors, caption = {key: file.get_tensor(key) for key in file.keys()}, file.metadata()["caption"]
        else:
            tensors, caption = self._encode(index, path)
        return {"latent_mean": tensors["latent_mean"], "latent_std": tensors["latent_std"],
                "conditioning": tensors["conditioning"].float() / 255, "caption": caption,
                "original_size": tensors["original_size"], "crop_top_left": tensors["crop_top_left"]}

    @torch.no_grad()
    def _encode(self, index: int, path: Path) -> tuple[dict, str]:
        item = self.dataset[index]
        vae = self.vae if torch.utils.data.get_worker_info() is None else self.worker_vae
        parameter = next(vae.parameters())
        pixels = item["pixel_values"][None].to(parameter.device, parameter.dtype)  # (1, 3, H, W)
        posterior = vae.encode(pixels).latent_dist
        tensors = {"latent_mean": posterior.mean[0].float().cpu().contiguous(),
                   "latent_std": posterior.std[0].float().cpu().contiguous(),
                   "conditioning": (item["conditioning"] * 255).round().to(torch.uint8).contiguous(),
                   "original_size": item["original_size"], "crop_top_left": item["crop_top_left"]}
        path.parent.mkdir(exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        save_file(tensors, str(partial), metadata={"caption": item["caption"]})
        os.replace(partial, path)  # whole or not at all, whichever process writes last
        return tensors, item["caption"]


def sample_latents(vae, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Scaled latents drawn from stored distributions (b, c, h, w), as `BaseModel.encode_images` draws them."""
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)  # the posterior's own draw
    latents = mean + std * noise.to(mean.device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor
