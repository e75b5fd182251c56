"""The server's knowledge of the fleet's search: running second moment, basis, PUTS window.

Flower-free, so that both server paths (plain validated sum, SecAgg+ sum) feed the same code
and the math can be tested without a simulation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.config import BasisConfig, DPConfig, PutsConfig
from server.privacy import PrivacyLedger, add_gaussian_noise
from zo_core.subspace_stats import (
    COUNT_SHARE,
    PART_NORM_BOUND,
    SECOND_MOMENT,
    SIGNAL_SHARE,
    STAT_FIELDS,
    WireSchema,
    basis_from_second_moment,
    choose_window,
    clip_l2,
    flatten_statistic,
    unflatten_statistic,
    validate_statistic,
)


def sum_statistics(stats: list[dict[str, np.ndarray]], schema: WireSchema) -> np.ndarray:
    """Validate, clip and sum individual statistics into one flat float64 vector.

    Validation (`validate_statistic`) rejects anything off-schema; clipping each part to its
    bound is then a no-op for an honest client and limits any accepted one to a change of at
    most `schema.sensitivity` (L2) in the sum - the bound DP relies on.
    """
    total = np.zeros(schema.flat_size, dtype=np.float64)
    for s in stats:
        validate_statistic(s, schema)
        total += flatten_statistic({k: clip_l2(s[k], PART_NORM_BOUND) for k in STAT_FIELDS})
    return total


@dataclass(frozen=True)
class RoundUpdate:
    """What one absorbed round changed (goes into the round record)."""

    contributors: int
    basis_version: int
    window: tuple[int, int]
    density: list[float | None]
    top_eigenvalues: list[float]
    epsilon: float | None
    noise_std: float | None


class FleetState:
    """Running statistics -> global basis and PUTS window.

    Parameters
    ----------
    schema
        wire schema (D, B, T).
    basis, puts, dp
        configs; `dp.enabled` adds Gaussian noise to every absorbed sum and accounts it.
    noise_rng
        source of the DP noise; production passes `privacy.secure_noise_generator()`.
    """

    def __init__(
        self,
        schema: WireSchema,
        *,
        basis: BasisConfig,
        puts: PutsConfig,
        dp: DPConfig,
        noise_rng: np.random.Generator | None,
    ) -> None:
        if basis.rank >= schema.dim:
            raise ValueError(f"basis.rank ({basis.rank}) must be < token dim D ({schema.dim})")
        edges = schema.bucket_edges()
        if puts.low not in edges or puts.high not in edges or puts.high > schema.num_train_timesteps:
            raise ValueError(
                f"PUTS window [{puts.low}, {puts.high}) must lie on bucket edges {edges.tolist()}"
            )
        if dp.enabled and noise_rng is None:
            raise ValueError("DP is enabled but no noise generator was given")
        self.schema = schema
        self.basis_cfg = basis
        self.puts_cfg = puts
        self.dp_cfg = dp
        self.noise_rng = noise_rng
        self.width_buckets = int(np.searchsorted(edges, puts.high) - np.searchsorted(edges, puts.low))
        self.moment = np.zeros((schema.dim, schema.dim), dtype=np.float64)
        self.signal_share = np.zeros(schema.num_buckets, dtype=np.float64)
        self.count_share = np.zeros(schema.num_buckets, dtype=np.float64)
        self.basis: np.ndarray | None = None
        self.basis_version = 0
        self.window = (puts.low, puts.high)
        self.ledger = (
            PrivacyLedger(
                noise_multiplier=dp.noise_multiplier,
                delta=dp.delta,
                epsilon_budget=dp.epsilon_budget,
            )
            if dp.enabled
            else None
        )

    def absorb(self, total: np.ndarray, *, contributors: int, sample_rate: float) -> RoundUpdate:
        """Fold one round's summed statistic in and recompute basis and window.

        `total` is the flat sum over `contributors` clients (plain path: validated and clipped
        here by `sum_statistics`; SecAgg+ path: the unmasked sum, bounded on each device).
        """
        if contributors < 1:
            raise ValueError(f"contributors must be >= 1, got {contributors}")
        if total.shape != (self.schema.flat_size,) or not np.all(np.isfinite(total)):
            raise ValueError("total must be a finite vector of the schema's flat size")
        epsilon = noise_std = None
        if self.ledger is not None:
            assert self.noise_rng is not None  # checked in __init__
            epsilon = self.ledger.record_release(sample_rate)  # refuses beyond the budget
            noise_std = self.dp_cfg.noise_multiplier * self.schema.sensitivity
            total = add_gaussian_noise(
                total,
                noise_multiplier=self.dp_cfg.noise_multiplier,
                sensitivity=self.schema.sensitivity,
                rng=self.noise_rng,
            )
        # The mean over contributors keeps the scale independent of the fleet size; the count is
        # public (it is the number of replies), so dividing by it is post-processing.
        mean = unflatten_statistic(total / contributors, self.schema)
        decay = self.basis_cfg.decay
        self.moment = decay * self.moment + mean[SECOND_MOMENT]
        self.signal_share = decay * self.signal_share + mean[SIGNAL_SHARE]
        self.count_share = decay * self.count_share + mean[COUNT_SHARE]
        self.basis, evals = basis_from_second_moment(self.moment, self.basis_cfg.rank)
        self.basis_version += 1
        density = np.full(self.schema.num_buckets, np.nan)
        if self.puts_cfg.adapt:
            # Running shares are sums of decayed means: normalise so the threshold reads as a share.
            norm = max(float(self.count_share.sum()), 1e-12)
            self.window, density = choose_window(
                self.signal_share / norm,
                self.count_share / norm,
                self.schema,
                width_buckets=self.width_buckets,
                current=self.window,
                min_count_share=self.puts_cfg.min_count_share,
            )
        return RoundUpdate(
            contributors=contributors,
            basis_version=self.basis_version,
            window=self.window,
            density=[None if np.isnan(x) else float(x) for x in density],
            top_eigenvalues=[float(x) for x in evals[: self.basis_cfg.rank]],
            epsilon=epsilon,
            noise_std=noise_std,
        )

    # --- checkpoint (resume after a restart) ---------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write the state atomically (arrays .npz + json), so a crash leaves the old one intact."""
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {
            "moment": self.moment,
            "signal_share": self.signal_share,
            "count_share": self.count_share,
        }
        if self.basis is not None:
            arrays["basis"] = self.basis
        tmp = directory / "fleet-state.npz.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        tmp.replace(directory / "fleet-state.npz")
        meta: dict[str, Any] = {
            "dim": self.schema.dim,
            "num_buckets": self.schema.num_buckets,
            "num_train_timesteps": self.schema.num_train_timesteps,
            "basis_version": self.basis_version,
            "window": list(self.window),
            "dp_history": self.ledger.history if self.ledger is not None else None,
        }
        _atomic_write_text(directory / "fleet-state.json", json.dumps(meta, indent=2))

    def load(self, directory: Path) -> None:
        """Restore a saved state; FileNotFoundError if there is none, ValueError if incompatible."""
        meta_path, arr_path = directory / "fleet-state.json", directory / "fleet-state.npz"
        if not meta_path.is_file() or not arr_path.is_file():
            raise FileNotFoundError(f"no fleet state to resume in {directory}")
        meta = json.loads(meta_path.read_text())
        saved = (meta["dim"], meta["num_buckets"], meta["num_train_timesteps"])
        mine = (self.schema.dim, self.schema.num_buckets, self.schema.num_train_timesteps)
        if saved != mine:
            raise ValueError(f"saved fleet state has schema {saved}, this run has {mine}")
        if (meta["dp_history"] is not None) != (self.ledger is not None):
            raise ValueError("cannot resume: DP was enabled in one run and disabled in the other")
        with np.load(arr_path) as z:
            self.moment = z["moment"]
            self.signal_share = z["signal_share"]
            self.count_share = z["count_share"]
            self.basis = z["basis"] if "basis" in z else None
        self.basis_version = int(meta["basis_version"])
        self.window = (int(meta["window"][0]), int(meta["window"][1]))
        if self.ledger is not None:
            self.ledger = PrivacyLedger(
                noise_multiplier=self.dp_cfg.noise_multiplier,
                delta=self.dp_cfg.delta,
                epsilon_budget=self.dp_cfg.epsilon_budget,
                history=[tuple(h) for h in meta["dp_history"]],  # type: ignore[misc]
            )


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
