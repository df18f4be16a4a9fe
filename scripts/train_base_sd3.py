"""Train the shapes-world SD3 base model (MMDiT, two small CLIP encoders, no T5) and save it in diffusers format."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlnext.models.tiny_sd3 import SD3_BASE_MODEL_DIR, TinySD3Config  # noqa: E402
from controlnext.training.base_model_sd3 import SD3BaseTrainingConfig, train_sd3_base_model  # noqa: E402
from train_base import main as train_main  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    train_main(argv, default_output=SD3_BASE_MODEL_DIR, training=SD3BaseTrainingConfig, sizes=TinySD3Config,
               train=train_sd3_base_model)


if __name__ == "__main__":
    main()
