"""The base of every spec section: unknown keys are errors, a validated section is immutable.

Every number in a spec is finite (``allow_inf_nan=False``) and has a lower and an upper bound
declared on its field (``ge``/``gt``/``le``/``lt``), so ``medsae exp schema`` shows each range and
nothing validates that would then overflow or exhaust the machine. The bounded types below are
shared by the sections.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_serializer

#: Largest seed: stages mix seeds into 32-bit generator states.
MAX_SEED = 2**32 - 1
#: Longest path accepted in a spec (PATH_MAX on Linux).
MAX_PATH_CHARS = 4096


class Section(BaseModel):
    """A spec section. Fields marked with :func:`execution_only` do not enter stage keys; fields
    made with :func:`added_field` are left out of the dump while they hold their default."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_serializer(mode="wrap")
    def _omit_added_defaults(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name, info in type(self).model_fields.items():
                extra = info.json_schema_extra
                added = isinstance(extra, dict) and extra.get("added")
                if added and name in data and getattr(self, name) == info.get_default(call_default_factory=True):
                    del data[name]
        return data


def added_field(default: Any = ..., description: str = "", **kwargs: Any) -> Any:
    """A field added after specs were first keyed: at its default it is left out of the dump.

    The spec hash (the experiment id) and the stage keys are hashes of that dump, so a spec written
    before the field existed keeps its experiment and its finished stages; setting the field to
    another value changes them, as any edit does. ``default_factory=`` may replace ``default``.
    """
    extra = {"added": True}
    if "default_factory" in kwargs:
        return Field(description=description, json_schema_extra=extra, **kwargs)
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def execution_only(default: Any, description: str, *, added: bool = False, **kwargs: Any) -> Any:
    """A field that changes how a stage runs but not what it computes (batch size, workers...).

    ``added``: also an :func:`added_field` (left out of the dump at its default).
    """
    extra = {"execution_only": True, "added": added}
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def seed_field(default: int, description: str) -> Any:
    """A seed: an integer in [0, 2^32 - 1]."""
    return Field(default, ge=0, le=MAX_SEED, description=description)


def _check_path(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    bad = next((c for c in value if not c.isprintable()), None)
    if bad is not None:
        raise ValueError(f"contains the control character {bad!r}")
    return value


#: A file or folder path: not empty, printable, at most PATH_MAX characters.
PathStr = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS), AfterValidator(_check_path)]


def key_params(section: BaseModel) -> dict[str, Any]:
    """The section as plain data, without execution-only fields (what a stage key hashes)."""
    data = section.model_dump(mode="json")
    for name, info in type(section).model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("execution_only"):
            data.pop(name, None)
    return data
