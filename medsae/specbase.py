"""The base of every spec section: unknown keys are errors, values are validated on assignment."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A spec section. Fields marked with :func:`execution_only` do not enter stage keys."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def execution_only(default: Any, description: str, **kwargs: Any) -> Any:
    """A field that changes how a stage runs but not what it computes (batch size, workers...)."""
    return Field(default, description=description, json_schema_extra={"execution_only": True}, **kwargs)


def key_params(section: BaseModel) -> dict[str, Any]:
    """The section as plain data, without execution-only fields (what a stage key hashes)."""
    data = section.model_dump(mode="json")
    for name, info in type(section).model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("execution_only"):
            data.pop(name, None)
    return data
