"""Device profiles: the memory budget, speed, availability and uplink of one kind of device.

Profiles live in TOML (one table per profile, kebab-case keys); the realistic ones the project
ships are in `profiles/devices.toml`. A scenario may add its own profiles or override fields.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from zo_core.config import config_kwargs as kwargs_for

SHIPPED_PROFILES = Path(__file__).parent / "profiles" / "devices.toml"


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of device.

    Attributes
    ----------
    name
        Profile name (the TOML table name), e.g. ``"mid-range-phone"``.
    memory_budget_mib
        Resident memory (MiB) the OS lets the app keep before killing it.
    compute_speed
        Forward throughput relative to a mid-range phone (1.0).
    availability
        Probability (0, 1] that the device is online in a given round.
    upload_kbps
        Sustained uplink in kilobits per second.
    upload_limit_kib
        Most the app may upload in one round, KiB; 0 means no limit.
    description
        Free text for reports.
    """

    name: str
    memory_budget_mib: float
    compute_speed: float
    availability: float
    upload_kbps: float
    upload_limit_kib: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("profile name must not be empty")
        if self.memory_budget_mib <= 0:
            raise ValueError(
                f"profile {self.name}: memory-budget-mib must be > 0, got {self.memory_budget_mib}"
            )
        if self.compute_speed <= 0:
            raise ValueError(
                f"profile {self.name}: compute-speed must be > 0, got {self.compute_speed}"
            )
        if not 0.0 < self.availability <= 1.0:
            raise ValueError(
                f"profile {self.name}: availability must be in (0, 1], got {self.availability}"
            )
        if self.upload_kbps <= 0:
            raise ValueError(f"profile {self.name}: upload-kbps must be > 0, got {self.upload_kbps}")
        if self.upload_limit_kib < 0:
            raise ValueError(
                f"profile {self.name}: upload-limit-kib must be >= 0, got {self.upload_limit_kib}"
            )


def profiles_from_tables(tables: dict[str, dict[str, object]], where: str) -> dict[str, DeviceProfile]:
    """Build profiles from parsed TOML tables (``{name: {key: value}}``)."""
    out: dict[str, DeviceProfile] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"{where}: [{name}] must be a table, got {type(table).__name__}")
        out[name] = DeviceProfile(name=name, **kwargs_for(DeviceProfile, table, f"{where} [{name}]"))
    return out


def load_profiles(path: str | Path = SHIPPED_PROFILES) -> dict[str, DeviceProfile]:
    """Read a profiles TOML file; every top-level table is one profile.

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    ValueError
        On an unknown key or an out-of-range value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"device profiles file not found: {path}")
    with path.open("rb") as fh:
        tables = tomllib.load(fh)
    if not tables:
        raise ValueError(f"{path}: no profile tables")
    return profiles_from_tables(tables, str(path.name))
