"""Frozen, validated configs of the fleet server, read from the Flower run config.

Keys are dotted kebab-case (`dp.noise-multiplier`), as in `[tool.flwr.app.config]`. Every key
of the run config must belong to one of the known groups; an unknown key is an error, never
silently ignored (a typo in `-c "dp.nosie-multiplier=2"` would otherwise run without the noise
the user asked for).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from zo_core.subspace_stats import STAT_SOURCES

Scalar = bool | int | float | str
C = TypeVar("C")

# Keys read by the client only (the server passes them through untouched). Listed here so that
# an unknown key anywhere in the run config is an error.
CLIENT_KEYS: frozenset[str] = frozenset(
    {
        "model-dir",
        "quant",
        "zo.lr",
        "ti.placeholder",
        "ti.initializer",
        "ti.num-vectors",
        "sim.data-root",
        "sim.state-root",
        "eval.draws",
    }
)


def _pick(cls: type[C], values: Mapping[str, Scalar], prefix: str, keys: set[str]) -> C:
    """Build `cls` from the keys of `values` that start with `prefix` (marking them used)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if not key.startswith(prefix) or (prefix == "" and "." in key):
            continue
        name = key[len(prefix) :].replace("-", "_")
        if name in names:
            kwargs[name] = value
            keys.add(key)
    return cls(**kwargs)


@dataclass(frozen=True)
class DPConfig:
    """Central differential privacy of the aggregate (Gaussian mechanism, RDP accounting).

    Notes
    -----
    The guarantee is client-level (adding or removing one client's whole statistic), it holds
    because every statistic is bounded before it leaves the device (each of its 3 parts has L2
    norm <= 1, so the L2 sensitivity of the sum is sqrt(3)) and the server re-checks the bound
    on every reply it can see. The accountant assumes Poisson sampling at rate q = sampled /
    available per round; the server samples a fixed-size subset, which matches it only at q = 1.
    """

    enabled: bool = False
    noise_multiplier: float = 1.0  # sigma: noise std = sigma * sensitivity
    delta: float = 1e-5
    epsilon_budget: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"dp.enabled must be a bool, got {self.enabled!r}")
        if not self.noise_multiplier > 0:
            raise ValueError(f"dp.noise-multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp.delta must lie in (0, 1), got {self.delta}")
        if not self.epsilon_budget > 0:
            raise ValueError(f"dp.epsilon-budget must be > 0, got {self.epsilon_budget}")


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ (Bell et al. 2020) through Flower's legacy workflow."""

    enabled: bool = False
    num_shares: int = 3
    reconstruction_threshold: int = 2
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"secagg.enabled must be a bool, got {self.enabled!r}")
        if self.num_shares < 2:
            raise ValueError(f"secagg.num-shares must be >= 2, got {self.num_shares}")
        if not 2 <= self.reconstruction_threshold <= self.num_shares:
            raise ValueError(
                "secagg.reconstruction-threshold must be in [2, num-shares], got "
                f"{self.reconstruction_threshold}"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"secagg.timeout-s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class BasisConfig:
    """The global subspace basis broadcast to clients."""

    rank: int = 8
    # Fraction of perturbation energy clients draw inside the basis. 0.2, not 0.5: on the embedded
    # model 0.5 slowed newcomers with both statistics (mean along the curve -0.021 and -0.023 vs
    # solo, n = 6) while 0.2 was neutral (-0.004, -0.006); benchmarks/results/federated-notes.md.
    weight: float = 0.2
    decay: float = 0.5  # M_t = decay * M_{t-1} + mean statistic of round t
    segments: int = 0  # client statistic: 0 = per-step directions, k = k displacement segments
    source: str = "updates"  # client statistic built from "updates" or "gradients" (raw ZO estimates)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"basis.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"basis.weight must lie in [0, 1], got {self.weight}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"basis.decay must lie in [0, 1), got {self.decay}")
        if self.segments < 0:
            raise ValueError(f"basis.segments must be >= 0, got {self.segments}")
        if self.source not in STAT_SOURCES:
            raise ValueError(f"basis.source must be one of {list(STAT_SOURCES)}, got {self.source!r}")


@dataclass(frozen=True)
class PutsConfig:
    """The PUTS window schedule: start window, bucket grid, adaptation."""

    low: int = 500
    high: int = 900
    buckets: int = 10
    adapt: bool = False  # measured to hurt (benchmarks/results/federated.md): opt in with puts.adapt = true
    min_count_share: float = 0.05  # summed count share below this = "no data in that bucket"

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"puts window must satisfy 0 <= low < high, got [{self.low}, {self.high})")
        if self.buckets < 2:
            raise ValueError(f"puts.buckets must be >= 2, got {self.buckets}")
        if not isinstance(self.adapt, bool):
            raise ValueError(f"puts.adapt must be a bool, got {self.adapt!r}")
        if not self.min_count_share >= 0:
            raise ValueError(f"puts.min-count-share must be >= 0, got {self.min_count_share}")


@dataclass(frozen=True)
class ZOBroadcastConfig:
    """RGE settings the server broadcasts (the learning rate stays a client setting)."""

    n: int = 2
    mu: float = 1e-3

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"zo.n must be >= 1, got {self.n}")
        if not self.mu > 0:
            raise ValueError(f"zo.mu must be > 0, got {self.mu}")


@dataclass(frozen=True)
class FleetConfig:
    """The server loop: rounds, sampling, timeouts, where the run is recorded."""

    num_rounds: int = 3
    clients_per_round: int = 2
    min_nodes: int = 2
    min_replies: int = 2
    wait_nodes_timeout_s: float = 120.0
    round_timeout_s: float = 600.0
    local_steps: int = 20
    probe_steps: int = 4
    seed: int = 0
    run_dir: str = "runs/fleet"
    resume: bool = False
    model_fingerprint: str = ""  # "" = adopt the fingerprint most nodes report
    eval_every: int = 0  # 0 = no federated evaluation rounds

    def __post_init__(self) -> None:
        for name in ("num_rounds", "clients_per_round", "min_nodes", "min_replies", "local_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.probe_steps < 0 or self.eval_every < 0:
            raise ValueError("probe-steps and eval-every must be >= 0")
        if self.min_replies > self.clients_per_round:
            raise ValueError(
                f"min-replies ({self.min_replies}) must be <= clients-per-round "
                f"({self.clients_per_round})"
            )
        if self.clients_per_round > self.min_nodes:
            raise ValueError(
                f"clients-per-round ({self.clients_per_round}) must be <= min-nodes "
                f"({self.min_nodes}): the server waits for min-nodes before sampling"
            )
        for name in ("wait_nodes_timeout_s", "round_timeout_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name.replace('_', '-')} must be a positive number, got {v}")
        if not self.run_dir:
            raise ValueError("run-dir must not be empty")
        if not isinstance(self.resume, bool):
            raise ValueError(f"resume must be a bool, got {self.resume!r}")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server reads from the run config."""

    fleet: FleetConfig
    zo: ZOBroadcastConfig
    puts: PutsConfig
    basis: BasisConfig
    dp: DPConfig
    secagg: SecAggConfig

    def __post_init__(self) -> None:
        if self.secagg.enabled and self.fleet.clients_per_round < 2:
            raise ValueError("secure aggregation needs clients-per-round >= 2")
        if self.secagg.enabled and self.secagg.num_shares > self.fleet.clients_per_round:
            raise ValueError(
                f"secagg.num-shares ({self.secagg.num_shares}) must be <= clients-per-round "
                f"({self.fleet.clients_per_round})"
            )

    @classmethod
    def from_run_config(cls, values: Mapping[str, Scalar]) -> ServerConfig:
        """Parse the run config; unknown keys raise ValueError."""
        used: set[str] = set()
        cfg = cls(
            fleet=_pick(FleetConfig, values, "", used),
            zo=_pick(ZOBroadcastConfig, values, "zo.", used),
            puts=_pick(PutsConfig, values, "puts.", used),
            basis=_pick(BasisConfig, values, "basis.", used),
            dp=_pick(DPConfig, values, "dp.", used),
            secagg=_pick(SecAggConfig, values, "secagg.", used),
        )
        unknown = sorted(set(values) - used - CLIENT_KEYS)
        if unknown:
            raise ValueError(f"unknown run-config keys: {unknown}")
        return cfg
