"""Train the shapes-world SD3 base model (MMDiT, two small CLIP encoders, no T5) and save it in diffusers format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlnext.models.tiny_sd3 import SD3_BASE_MODEL_DIR, TinySD3Config  # noqa: E402
from controlnext.training.base_model_sd3 import SD3BaseTrainingConfig, train_sd3_base_model  # noqa: E402
from train_base import add_flags  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=SD3_BASE_MODEL_DIR, help="folder to write (replaced)")
    parser.add_argument("--log", type=Path, help="also append the log to this file")
    training_names = add_flags(parser.add_argument_group("training"), SD3BaseTrainingConfig())
    model_names = add_flags(parser.add_argument_group("model sizes"), TinySD3Config())
    args = parser.parse_args(argv)
    model = TinySD3Config(**{name: getattr(args, name) for name in model_names})
    config = SD3BaseTrainingConfig(**{name: getattr(args, name) for name in training_names}, model=model)

    def log(line: str) -> None:
        print(line, flush=True)
        if args.log:
            with args.log.open("a") as file:
                file.write(line + "\n")

    log(f"config: {config}")
    train_sd3_base_model(args.output, config, log)


if __name__ == "__main__":
    main()
