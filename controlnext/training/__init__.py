"""Training controls on a frozen base model: `train(TrainConfig(...)) -> output folder`.

The configuration is light to import (the CLI builds its flags from it); the trainer and its heavy
dependencies load on first use.
"""

from .config import TrainConfig

__all__ = ["GENERATED_DATA", "TrainConfig", "train"]


def train(config: TrainConfig, examples=None):
    """Train a control as `config` says and return the output folder (what `load_control` reads)."""
    from .trainer import train as run_training

    return run_training(config, examples)


def __getattr__(name: str):
    if name == "GENERATED_DATA":
        from .data import GENERATED_DATA

        return GENERATED_DATA
    raise AttributeError(name)
