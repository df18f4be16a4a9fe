"""Resumable checkpoints, written atomically: a crash mid-write never leaves what looks like a checkpoint.

A checkpoint is written into `.partial-checkpoint-NNNNNN`, every file and folder is fsynced, then the
folder is renamed to `checkpoint-NNNNNN` (a rename is atomic on POSIX file systems). It holds the
trainable weights, optimizer, LR scheduler and loss-scaler states, each process's RNG states, the
position in the data stream and the configuration it was made with; `control/` beside them is the
export that `generate` loads.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import ControlNextError

STATE_FILE = "trainer_state.json"
FLAG_OF = {"module_lr": "module_learning_rate"}  # recorded values that are not fields: the flag that sets them
PARTIAL_PREFIX = ".partial-"
_NAME = re.compile(r"checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root/checkpoints, oldest first."""
    folder = Path(root) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """--resume latest|PATH -> the checkpoint folder (None: start fresh); refuse to overwrite an earlier run."""
    existing = list_checkpoints(output_dir)
    if resume is None:
        if existing:
            raise ControlNextError(f"--output-dir {output_dir} already holds checkpoints; pass --resume latest to "
                                   "continue that run or choose another folder")
        return None
    if resume == "latest":
        return existing[-1] if existing else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ControlNextError(f"--resume {path} is not a complete checkpoint (no {STATE_FILE}); give a "
                               f"checkpoint-NNNNNN folder or 'latest'")
    return path


def check_resumable(state: dict, config_fields: dict, base_fingerprint: str, trainable: list[str],
                    num_examples: int, path: Path) -> None:
    """Raise one line when a checkpoint was made with another configuration, base model, trainable set or data."""
    if state.get("base_fingerprint") != base_fingerprint:
        raise ControlNextError(f"checkpoint {path} was trained on another base model (its UNet differs from "
                               f"--base); resume with the base it was made for")
    if state.get("num_examples") != num_examples:
        raise ControlNextError(f"checkpoint {path} was made on a data set of {state.get('num_examples')} examples, "
                               f"--data has {num_examples}; resume on the same data")
    saved = state.get("config", {})
    for name, value in config_fields.items():
        if name in saved and _normalise(saved[name]) != _normalise(value):
            flag = FLAG_OF.get(name, name).replace("_", "-")
            raise ControlNextError(
                f"checkpoint {path} was made with --{flag} {saved[name]!r}, this run has "
                f"{value!r}; resume with the same configuration or start a new --output-dir"
            )
    if state.get("trainable_names") != trainable:
        raise ControlNextError(f"checkpoint {path} trains other base weights than this run selects; resume with "
                               "the same --trainable")


def _normalise(value):
    return list(value) if isinstance(value, tuple) else value


# -- writing -------------------------------------------------------------------------------------------

def write_atomically(accelerator, root: Path, step: int, write_main: Callable[[Path], None],
                     write_each: Callable[[Path], None]) -> Path:
    """Every process writes its part into a partial folder; the main one fsyncs it and renames it complete."""
    folder = Path(root) / "checkpoints"
    final = folder / checkpoint_name(step)
    partial = folder / f"{PARTIAL_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_each(partial)
    if accelerator.is_main_process:
        write_main(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(partial)
        if final.exists():  # the same step saved again after resuming from an earlier checkpoint
            shutil.rmtree(final)
        os.replace(partial, final)
        fsync_path(folder)
    accelerator.wait_for_everyone()
    return final


def remove_partial(root: Path) -> None:
    """Delete what an interrupted write left behind."""
    folder = Path(root) / "checkpoints"
    if folder.is_dir():
        for path in folder.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0: all)."""
    if keep > 0:
        for path in list_checkpoints(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every folder bottom-up, so the data is on disk before the rename."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


# -- RNG states (each process its own file; readable with weights_only=True) --------------------------

def save_rng_states(folder: Path, rank: int) -> None:
    version, state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "python": (version, torch.tensor(state, dtype=torch.int64), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(states, folder / f"random_states_{rank}.pt")


def load_rng_states(folder: Path, rank: int) -> bool:
    path = folder / f"random_states_{rank}.pt"
    if not path.is_file():
        return False
    states = torch.load(path, weights_only=True)
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state.tolist()), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    return True


# -- training state (whole on every process: one device, DDP) --------------------------------------------

def save_training_state(folder: Path, trainable: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler,
                        state: dict) -> None:
    """Trainable weights (fp32 safetensors), optimizer, LR scheduler and loss-scaler states, trainer state."""
    from safetensors.torch import save_file

    save_file({name: value.detach().contiguous().cpu() for name, value in trainable.items()},
              str(folder / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), folder / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), folder / "scaler.pt")
    write_json(folder / STATE_FILE, state)


def read_trainer_state(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ControlNextError(f"cannot read checkpoint {folder}: {error}") from None


def load_training_state(folder: Path, model: torch.nn.Module, optimizer, lr_scheduler) -> None:
    """Put a checkpoint's trainable weights, optimizer and scheduler states back (before accelerator.prepare)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "trainable.safetensors"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != trainable:
        raise ControlNextError(f"checkpoint {folder} holds other trainable weights than this run builds; resume with "
                               "the same configuration")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ControlNextError(f"checkpoint {folder}: {name} is {tuple(value.shape)}, this run builds "
                                       f"{tuple(params[name].shape)}; resume with the same configuration")
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))


def load_scaler_state(folder: Path, scaler) -> None:
    if scaler is not None and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
