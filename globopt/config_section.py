"""The base of every config section: unknown keys are errors, and a yes/no is never read as a number.

YAML reads ``true``/``false`` (and ``yes``/``no``/``on``/``off``) as booleans, and pydantic's lax mode
would turn them into 1/0 or 1.0/0.0 for a numeric key: ``evaluations: true`` becomes a budget of one
relaxation without a word. Shared by globopt/config.py and globopt/htvs/settings.py.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _admits_bool(annotation: Any) -> bool:
    """Whether a field of this type may hold a boolean (bool itself, Any, or a union containing one)."""
    if annotation is bool or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(_admits_bool(arg) for arg in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _admits_bool(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return any(isinstance(arg, bool) for arg in typing.get_args(annotation))
    return False


def _value_type(annotation: Any) -> Any:
    """The value type of a ``dict[K, V]`` field (possibly optional), or None for anything else."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        for arg in typing.get_args(annotation):
            found = _value_type(arg)
            if found is not None:
                return found
        return None
    if origin is dict:
        return typing.get_args(annotation)[1]
    return None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        if isinstance(value, bool) and not _admits_bool(field.annotation):
            raise ValueError(
                f"expected {_type_name(field.annotation)}, got {str(value).lower()} (YAML reads true/false "
                f"and yes/no as booleans)"
            )
        inner = _value_type(field.annotation)
        if isinstance(value, dict) and inner is not None and not _admits_bool(inner):
            flags = sorted(str(k) for k, v in value.items() if isinstance(v, bool))
            if flags:
                raise ValueError(
                    f"expected numbers, got yes/no values for {', '.join(flags)} (write e.g. 0.5, not true)"
                )
        return value


def _type_name(annotation: Any) -> str:
    """'an integer', 'a number', ... for the message (the first member of a union that is not None)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _type_name(members[0]) if members else "a value"
    names = {
        int: "an integer",
        float: "a number",
        str: "a text",
        list: "a list",
        tuple: "a list",
        dict: "a mapping",
    }
    return names.get(origin or annotation, "a value of another type")
