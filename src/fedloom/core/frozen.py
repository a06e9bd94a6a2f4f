"""The one base of the plan's and the site policy's sections: a pydantic model that is
immutable and refuses a key it does not know (a misspelt setting is an error, never
silently ignored)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
