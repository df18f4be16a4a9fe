"""Training logs: one CSV row per optimizer step, TensorBoard when installed, a progress bar."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

BASE_COLUMNS = ["step", "epoch", "loss", "lr", "module_lr", "grad_norm", "steps_per_second"]


class TrainingLog:
    """log.csv in the output folder; a resumed run keeps the rows up to its checkpoint and continues after them."""

    def __init__(self, folder: Path, metric: str | None, resume_step: int | None, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.columns = BASE_COLUMNS + ([f"fidelity_{metric}"] if metric else [])
        self.path = Path(folder) / "log.csv"
        self.writer = None
        if not enabled:
            return
        kept = self._rows_up_to(resume_step) if resume_step is not None else []
        self.file = open(self.path, "w", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
        self.csv.writeheader()
        self.csv.writerows(kept)
        self.file.flush()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            self.writer = SummaryWriter(str(Path(folder) / "tensorboard")) if SummaryWriter else None

    def _rows_up_to(self, step: int) -> list[dict]:
        """Rows of an earlier run with step <= `step`; a row cut short by a crash is dropped."""
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as file:
            rows = list(csv.DictReader(file))
        return [row for row in rows if (row.get("step") or "").isdigit() and int(row["step"]) <= step
                and None not in row.values()]

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.csv.writerow({"step": step, **{k: _format(v) for k, v in values.items()}})
        self.file.flush()
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and name != "epoch":
                    self.writer.add_scalar(f"train/{name}", value, step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        if self.enabled and self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _format(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
