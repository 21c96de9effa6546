"""Checks every config dataclass shares: a value among a literal's choices, known keys, float fields,
counts of at least one."""

from __future__ import annotations

import dataclasses
from typing import Any, get_args

from dfq_deploy.errors import BadInputError


def check_choice(value: Any, literal: Any, field: str) -> None:
    """Refuse ``value`` unless it is one of the ``Literal`` type's choices."""
    choices = get_args(literal)
    if value not in choices:
        raise BadInputError(f"{field} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_at_least_one(config: Any, names: tuple[str, ...], *, what: str = "") -> None:
    """Refuse a field of ``config`` among ``names`` that is set (not ``None``) and below 1; ``what``
    names the config in the message ("reconstruction's")."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise BadInputError(f"{what}{name} must be at least 1, got {value}")


def check_keys(values: dict[str, Any], cls: type, *, where: str) -> None:
    """Refuse a key of ``values`` that is not a field of ``cls``, naming the valid ones."""
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in values if key not in fields]
    if unknown:
        raise BadInputError(f"unknown key {unknown[0]!r} in {where}", hint=f"valid keys: {', '.join(fields)}")


def coerce_floats(config: Any) -> None:
    """Store the ints given to ``float`` fields of a frozen dataclass as floats.

    A config file's ``warmup_ms: 0`` and the flag ``--warmup-ms 0`` are the same setting; as an int
    and a float they would be written differently into the manifest and hash to different build keys.
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, int) and not isinstance(value, bool) and "float" in str(field.type):
            object.__setattr__(config, field.name, float(value))
