"""Turn TOML tables with dotted kebab-case keys into keyword arguments, rejecting unknown keys.

The project's configs are frozen dataclasses; TOML files use kebab-case keys (`memory-budget-mib`).
A misspelt key must fail loudly rather than silently fall back to a default (a lesson from
Flower issue #4317), so every table is checked against the dataclass's field names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def kwargs_for(cls: type, table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Map `table`'s kebab-case keys onto `cls`'s snake_case fields.

    Parameters
    ----------
    cls
        A dataclass type.
    table
        The TOML table (already parsed).
    where
        Where the table came from, for the error message (e.g. ``"devices.toml [low-end-phone]"``).

    Raises
    ------
    ValueError
        If a key is not a field of `cls`.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in names:
            allowed = ", ".join(sorted(n.replace("_", "-") for n in names))
            raise ValueError(f"{where}: unknown key {key!r}; allowed keys: {allowed}")
        out[name] = value
    return out
