"""The base of every config model, policies' included."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    """Unknown keys are errors; values are frozen after load."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
