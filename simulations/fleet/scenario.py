"""Fleet scenarios: which devices, how many rounds, what the server does, which faults happen.

A scenario is one TOML file with these tables (all keys kebab-case; unknown keys are errors):

- ``[fleet]``     rounds, clients per round, local steps, seeds, round timeout, backend, workers
- ``[devices]``   how many devices of each profile (``mid-range-phone = 40``)
- ``[profiles.NAME]`` optional extra profiles, or overrides of shipped ones (same keys as
  `profiles/devices.toml`)
- ``[planner]``   the configurations the planner may choose from
- ``[dp]``, ``[secagg]``, ``[basis]``, ``[puts]`` the server's own configs (`server.config`):
  differential privacy, secure aggregation, the fleet basis, the PUTS window schedule
- ``[zo]``        the client's ZO settings (`zo_core.config.ZOConfig`); the planner overrides
  ``n`` and ``batched`` per device
- ``[faults]``    per-device, per-round probabilities of each injected fault

`load_scenario` resolves it into a frozen `Scenario` whose parts are validated on construction.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from server.config import BasisConfig, DPConfig, PutsConfig, SecAggConfig
from simulations.fleet.profiles import DeviceProfile, load_profiles, profiles_from_tables
from zo_core.config import config_kwargs as kwargs_for
from zo_core.config import ZOConfig

SCENARIO_DIR = Path(__file__).parent / "scenarios"
DEFAULT_SCENARIO = SCENARIO_DIR / "default.toml"

Backend = Literal["embedded", "fake"]
ALLOWED_BITS = (32, 16, 8, 4)


@dataclass(frozen=True)
class FleetConfig:
    """How the fleet runs.

    Attributes
    ----------
    name
        Scenario name, used in reports.
    rounds
        Federated rounds.
    clients_per_round
        Devices the server samples among the online, eligible ones each round.
    local_steps
        ZO steps each device runs per round.
    seed
        Root seed: device sampling, faults and every device's seeds derive from it.
    round_timeout_s
        Simulated seconds the server waits for replies; later replies are stragglers.
    item_seconds
        Simulated seconds one forward batch item takes on a ``compute-speed = 1`` device at the
        model's native resolution (the simulated clock; wall time on this machine is not used,
        so stragglers are deterministic).
    memory_scale
        Factor applied to every profile's budget before planning and enforcement, or ``"auto"``:
        the ratio of the simulated model's predicted app memory to SD1.5's for the reference
        configuration (int8, batched, n = 2), so that the small embedded model is as tight on a
        device as SD1.5 would be. ``1.0`` applies the real budgets.
    backend
        ``"embedded"`` runs the real federated client on the embedded default model;
        ``"fake"`` a numpy stand-in that allocates memory like a model (tests, scale runs).
    workers
        Worker subprocesses (each holds the model once); bounded by the CPU cores.
    concepts_per_device
        Personal concepts each device learns.
    model_dir
        A diffusers folder to simulate with instead of the embedded default ("" = default).
    fidelity
        Embedded backend: ``"oracle"`` (generate and score with the synthetic world's oracle)
        or ``"eval-loss"`` (minus the client's evaluation loss; any model).
    eval_images, eval_steps
        Images generated per evaluated device and sampler steps (``"oracle"``).
    audit
        Copy each trained device's token into the harness's memory (never onto the wire) so the
        privacy audit study can compare it with what the server could infer. Simulation only.
    """

    name: str = "scenario"
    rounds: int = 5
    clients_per_round: int = 10
    local_steps: int = 10
    seed: int = 0
    round_timeout_s: float = 600.0
    item_seconds: float = 0.5
    memory_scale: float | str = 1.0
    backend: Backend = "embedded"
    workers: int = 2
    concepts_per_device: int = 1
    model_dir: str = ""
    fidelity: Literal["oracle", "eval-loss"] = "oracle"
    eval_images: int = 4
    eval_steps: int = 10
    audit: bool = False

    def __post_init__(self) -> None:
        for key in ("rounds", "clients_per_round", "local_steps", "workers", "concepts_per_device",
                    "eval_images", "eval_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"fleet.{key.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"fleet.seed must be an integer >= 0, got {self.seed!r}")
        if self.round_timeout_s <= 0:
            raise ValueError(f"fleet.round-timeout-s must be > 0, got {self.round_timeout_s}")
        if self.item_seconds <= 0:
            raise ValueError(f"fleet.item-seconds must be > 0, got {self.item_seconds}")
        if isinstance(self.memory_scale, str):
            if self.memory_scale != "auto":
                raise ValueError(
                    f"fleet.memory-scale must be a number > 0 or \"auto\", got {self.memory_scale!r}"
                )
        elif self.memory_scale <= 0:
            raise ValueError(f"fleet.memory-scale must be > 0, got {self.memory_scale}")
        if self.fidelity not in ("oracle", "eval-loss"):
            raise ValueError(f"fleet.fidelity must be \"oracle\" or \"eval-loss\", got {self.fidelity!r}")
        if self.backend not in ("embedded", "fake"):
            raise ValueError(f"fleet.backend must be \"embedded\" or \"fake\", got {self.backend!r}")


@dataclass(frozen=True)
class PlannerConfig:
    """The configurations the planner may choose from, most preferred first within each axis.

    The planner prefers (in this order) more weight bits, batched forwards, larger n and higher
    resolution, and picks the first configuration whose predicted peak fits the device's budget
    with `headroom` to spare.
    """

    bits: tuple[int, ...] = (32, 8, 4)
    n: tuple[int, ...] = (2, 1)
    batched: tuple[bool, ...] = (True, False)
    resolution_scale: tuple[float, ...] = (1.0, 0.5)
    headroom: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(self.bits))
        object.__setattr__(self, "n", tuple(self.n))
        object.__setattr__(self, "batched", tuple(self.batched))
        object.__setattr__(self, "resolution_scale", tuple(float(r) for r in self.resolution_scale))
        if not self.bits or any(b not in ALLOWED_BITS for b in self.bits):
            raise ValueError(f"planner.bits must be a non-empty list of {ALLOWED_BITS}, got {self.bits}")
        if not self.n or any(not isinstance(k, int) or k < 1 for k in self.n):
            raise ValueError(f"planner.n must be a non-empty list of integers >= 1, got {self.n}")
        if not self.batched or any(not isinstance(b, bool) for b in self.batched):
            raise ValueError(f"planner.batched must be a non-empty list of booleans, got {self.batched}")
        if not self.resolution_scale or any(not 0 < r <= 1 for r in self.resolution_scale):
            raise ValueError(
                f"planner.resolution-scale must be a non-empty list in (0, 1], got {self.resolution_scale}"
            )
        if not 0 <= self.headroom < 1:
            raise ValueError(f"planner.headroom must be in [0, 1), got {self.headroom}")


@dataclass(frozen=True)
class FaultConfig:
    """Per-device, per-round probabilities of each injected fault.

    Attributes
    ----------
    dropout
        The device goes offline mid-round: it finishes locally and saves its state, but its
        reply never reaches the server.
    crash
        The client raises in the middle of local training: nothing is saved, an error is recorded.
    restart
        The device's app is restarted before the round: everything held in memory for it is
        dropped and it must resume from its on-device state.
    straggler
        The device runs `straggler_slowdown` times slower this round (thermal throttling, other
        apps), which may push it past the round timeout.
    straggler_slowdown
        The slowdown factor of an injected straggler.
    memory_pressure
        Other apps take `memory_pressure_fraction` of the device's budget during the round; a
        configuration that no longer fits is killed as out-of-memory.
    memory_pressure_fraction
        Share of the budget taken away under memory pressure.
    """

    dropout: float = 0.0
    crash: float = 0.0
    restart: float = 0.0
    straggler: float = 0.0
    straggler_slowdown: float = 10.0
    memory_pressure: float = 0.0
    memory_pressure_fraction: float = 0.5

    def __post_init__(self) -> None:
        for key in ("dropout", "crash", "restart", "straggler", "memory_pressure"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"faults.{key.replace('_', '-')} must be in [0, 1], got {value}")
        if self.straggler_slowdown < 1:
            raise ValueError(f"faults.straggler-slowdown must be >= 1, got {self.straggler_slowdown}")
        if not 0.0 < self.memory_pressure_fraction < 1.0:
            raise ValueError(
                f"faults.memory-pressure-fraction must be in (0, 1), got {self.memory_pressure_fraction}"
            )


@dataclass(frozen=True)
class Scenario:
    """A resolved scenario: configs plus the profiles and device counts it uses."""

    fleet: FleetConfig
    devices: dict[str, int]
    profiles: dict[str, DeviceProfile]
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    basis: BasisConfig = field(default_factory=BasisConfig)
    puts: PutsConfig = field(default_factory=PutsConfig)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.devices:
            raise ValueError("[devices] must list at least one profile with a count")
        for name, count in self.devices.items():
            if name not in self.profiles:
                raise ValueError(f"[devices] names unknown profile {name!r}; known: {sorted(self.profiles)}")
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"[devices] {name} must be an integer >= 0, got {count!r}")
        if self.num_devices < 1:
            raise ValueError("[devices] counts add up to 0 devices")
        if self.fleet.clients_per_round > self.num_devices:
            raise ValueError(
                f"fleet.clients-per-round ({self.fleet.clients_per_round}) exceeds the fleet's "
                f"{self.num_devices} devices"
            )
        if self.secagg.enabled and self.fleet.clients_per_round < 2:
            raise ValueError("secure aggregation needs fleet.clients-per-round >= 2")

    @property
    def num_devices(self) -> int:
        """Total number of devices in the fleet."""
        return sum(self.devices.values())

    def with_fleet(self, **changes: Any) -> Scenario:
        """A copy with some `FleetConfig` fields changed (used by studies and the CLI)."""
        return replace(self, fleet=replace(self.fleet, **changes))


_SECTIONS = ("fleet", "devices", "profiles", "planner", "faults", "zo", "dp", "secagg", "basis", "puts")


def scenario_from_dict(data: dict[str, Any], source: str = "<dict>") -> Scenario:
    """Build a `Scenario` from parsed TOML (see the module docstring for the tables)."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"{source}: unknown table(s) {unknown}; allowed: {list(_SECTIONS)}")
    profiles = load_profiles()
    extra = data.get("profiles", {})
    for name, table in extra.items():
        if name in profiles:
            # An override of a shipped profile: only the keys given change.
            kwargs = kwargs_for(DeviceProfile, table, f"{source} [profiles.{name}]")
            profiles[name] = replace(profiles[name], **kwargs)
        else:
            profiles.update(profiles_from_tables({name: table}, f"{source} [profiles]"))
    return Scenario(
        fleet=FleetConfig(**kwargs_for(FleetConfig, data.get("fleet", {}), f"{source} [fleet]")),
        devices=dict(data.get("devices", {})),
        profiles=profiles,
        planner=PlannerConfig(**kwargs_for(PlannerConfig, data.get("planner", {}), f"{source} [planner]")),
        faults=FaultConfig(**kwargs_for(FaultConfig, data.get("faults", {}), f"{source} [faults]")),
        zo=_zo_config(data.get("zo", {}), source),
        dp=DPConfig(**kwargs_for(DPConfig, data.get("dp", {}), f"{source} [dp]")),
        secagg=SecAggConfig(**kwargs_for(SecAggConfig, data.get("secagg", {}), f"{source} [secagg]")),
        basis=BasisConfig(**kwargs_for(BasisConfig, data.get("basis", {}), f"{source} [basis]")),
        puts=PutsConfig(**kwargs_for(PutsConfig, data.get("puts", {}), f"{source} [puts]")),
        source=source,
    )


def _zo_config(table: dict[str, Any], source: str) -> ZOConfig:
    kwargs = kwargs_for(ZOConfig, table, f"{source} [zo]")
    if "puts" in kwargs:
        raise ValueError(f"{source} [zo]: set the PUTS window in [puts] (low, high), not zo.puts")
    return ZOConfig(**kwargs)


def load_scenario(path: str | Path | None = None) -> Scenario:
    """Read a scenario TOML file (`DEFAULT_SCENARIO` when `path` is None).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        On an unknown table or key, or an out-of-range value.
    """
    path = Path(path) if path is not None else DEFAULT_SCENARIO
    if not path.is_file():
        raise FileNotFoundError(f"scenario file not found: {path}")
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    return scenario_from_dict(data, source=path.name)
