"""Building blocks of the typed params: the strict base section and knobs that models share.

Kept apart from imgpipe/params.py so that a model module (imgpipe/models/<name>.py) can define its
own params section without importing the whole config, which is assembled from the registry.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Learning-rate schedules that every trainer implements (Keras' and the NumPy net's own)
SCHEDULES = ("exponential", "cosine")


class Section(BaseModel):
    """A params.yaml section: strict ("5" is not 5), frozen (a loaded config cannot drift) and
    closed (a misspelt key is an error that names the valid ones)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ScheduledTraining(Section):
    """Mini-batch training with a learning-rate schedule, shared by the Keras and NumPy nets."""

    learning_rate: float = Field(gt=0)
    # exponential: lr * decay_rate ** (step / decay_steps); cosine: from lr down to 0 over the
    # whole run (epochs x batches per epoch), and decay_steps / decay_rate are not used
    schedule: Literal[SCHEDULES]  # type: ignore[valid-type]
    decay_steps: int = Field(ge=1)
    decay_rate: float = Field(gt=0, le=1)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)


def check_positive(values: list[int], name: str) -> None:
    """Raise ValueError unless every entry is at least 1 (layer sizes, filter counts)."""
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"{name} must all be >= 1, got {values}")
