"""Trainers by name (`trainer.name`): the base trainer runs the loop, subclasses define the loss."""

from __future__ import annotations

from trainers.base_trainer import BaseTrainer
from trainers.lm_trainer import LMTrainer
from torchprime.errors import ConfigError

TRAINERS: dict[str, type[BaseTrainer]] = {"lm": LMTrainer}


def get_trainer_class(name: str) -> type[BaseTrainer]:
    if name not in TRAINERS:
        raise ConfigError(f"trainer.name={name!r}: known trainers are {', '.join(TRAINERS)}.")
    return TRAINERS[name]
