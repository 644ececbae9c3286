"""The base of every settings model a recipe fills (pass configs, KV cache and linearization settings, calibration):
values as written. pydantic's lax mode read `bits: 4.0` as 4, `sparsity: "0.5"` as 0.5 and `merge: 1` as true; a
recipe is a file people edit by hand, where such a value is more often a slip than an intent, so types are strict
(an integer still fills a float field, as YAML writes 1 for 1.0). Unknown keys are refused. Tuples pass as lists
(the Python API's `targets=("Linear",)`). Numbers are finite (`lr: .inf` was taken)."""
from __future__ import annotations

from typing import Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _whole_number_choices(annotation) -> bool:
    """A Literal of integers (bits: Literal[4, 8]), alone or in a union: pydantic's Literal check compares by value,
    so 4.0 matched 4 even in strict mode."""
    if get_origin(annotation) is Literal:
        return all(isinstance(a, int) and not isinstance(a, bool) for a in get_args(annotation))
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        return any(_whole_number_choices(a) for a in get_args(annotation))
    return False


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _as_written(cls, value, info: ValidationInfo):
        if isinstance(value, tuple):
            return list(value)
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if isinstance(value, float) and field is not None and _whole_number_choices(field.annotation):
            raise ValueError(f"Input should be a whole number, not {value!r}")
        return value
