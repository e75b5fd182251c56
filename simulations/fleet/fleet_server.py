"""The server side of a simulated fleet: the project's own server math, driven in-process.

The harness does not re-implement aggregation: it feeds the replies that arrived in time to
`server.fleet_state.sum_statistics` (validation + clipping, as the plain Flower path does) and
`server.fleet_state.FleetState.absorb` (DP noise, epsilon accounting, basis, PUTS window), exactly
the code the Flower ServerApp runs. What is simulated rather than executed:

- secure aggregation: the SecAgg+ protocol (masking, key shares) is not run; the server object
  only ever receives the sum, which is what SecAgg+ guarantees. Whether individual statistics are
  visible matters for the privacy audit study, which reads `last_individual_stats` only when
  secure aggregation is off.
- DP noise comes from a seeded generator so that a simulation repeats exactly; the deployed
  server draws it from `server.privacy.secure_noise_generator()`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from server.config import BasisConfig, DPConfig, PutsConfig, SecAggConfig
from server.fleet_state import FleetState, sum_statistics
from simulations.fleet.backend import TaskResult
from zo_core.config import ZOConfig
from zo_core.subspace_stats import RoundBroadcast, WireSchema

DP_NOISE_STREAM = 0xD9  # SeedSequence spawn key of the simulation's DP noise, apart from ZO seeds


class SimulatedServer:
    """Broadcasts and aggregates for the harness (see the module docstring).

    Parameters
    ----------
    schema
        Wire schema of the simulated model.
    fingerprint
        Fingerprint of the base model the fleet runs (the same for every weight-bits variant).
    zo, basis, puts, dp, secagg
        The scenario's configs.
    local_steps
        Steps per round broadcast to devices.
    seed
        Scenario seed (the DP noise stream derives from it).
    """

    def __init__(
        self,
        schema: WireSchema,
        *,
        fingerprint: str,
        zo: ZOConfig,
        basis: BasisConfig,
        puts: PutsConfig,
        dp: DPConfig,
        secagg: SecAggConfig,
        local_steps: int,
        seed: int,
    ) -> None:
        if not fingerprint:
            raise ValueError("the server needs the fingerprint of the model the fleet runs")
        self.schema, self.fingerprint, self.zo = schema, fingerprint, zo
        self.secagg, self.local_steps, self.basis_cfg = secagg, local_steps, basis
        noise = np.random.default_rng(np.random.SeedSequence([seed, DP_NOISE_STREAM])) if dp.enabled else None
        self.state = FleetState(schema, basis=basis, puts=puts, dp=dp, noise_rng=noise)
        self.dp_exhausted = False
        self.last_individual_stats: list[dict[str, np.ndarray]] | None = None
        self.last_sum: np.ndarray | None = None

    def round_broadcast(self, round_num: int) -> RoundBroadcast:
        """The validated broadcast object of a round."""
        return RoundBroadcast(
            round=round_num,
            local_steps=self.local_steps,
            n=self.zo.n,
            mu=self.zo.mu,
            puts_low=self.state.window[0],
            puts_high=self.state.window[1],
            basis_version=self.state.basis_version,
            basis_weight=self.basis_cfg.weight if self.state.basis is not None else 0.0,
            model_fingerprint=self.fingerprint,
            dim=self.schema.dim,
            num_buckets=self.schema.num_buckets,
            num_train_timesteps=self.schema.num_train_timesteps,
            basis=self.state.basis,
        )

    def broadcast(self, round_num: int) -> dict[str, Any]:
        """``{"config": flat scalars, "basis": (k, D) array or None}`` for every sampled device."""
        b = self.round_broadcast(round_num)
        return {"config": b.to_config(), "basis": b.basis}

    def broadcast_bytes(self, round_num: int) -> int:
        """Downlink bytes of one device's message (basis array + config values)."""
        b = self.broadcast(round_num)
        basis = b["basis"]
        return int((basis.nbytes if basis is not None else 0) + sum(len(str(k)) + 8 for k in b["config"]))

    def aggregate(self, round_num: int, replies: list[TaskResult], sample_rate: float) -> dict[str, Any]:
        """Fold the replies that arrived into the fleet state; returns the round's server metrics.

        A round with no reply changes nothing. When DP is on and the next release would exceed
        the epsilon budget, the server stops releasing (``dp_exhausted``) - the fleet keeps its
        last basis and window - and says so in the metrics, rather than stopping the run.
        """
        out: dict[str, Any] = {"contributors": len(replies), "epsilon": None, "basis_version": self.state.basis_version,
                               "window": list(self.state.window), "dp_exhausted": self.dp_exhausted}
        if not replies or self.dp_exhausted:
            out["epsilon"] = self.state.ledger.epsilon() if self.state.ledger is not None else None
            return out
        stats = [r.reply for r in replies]
        total = sum_statistics(stats, self.schema)
        self.last_sum = total
        self.last_individual_stats = None if self.secagg.enabled else stats
        ledger = self.state.ledger
        if ledger is not None and not ledger.can_release(sample_rate):
            self.dp_exhausted = True
            out.update(dp_exhausted=True, epsilon=ledger.epsilon())
            return out
        upd = self.state.absorb(total, contributors=len(replies), sample_rate=sample_rate)
        out.update(epsilon=upd.epsilon, basis_version=upd.basis_version, window=list(upd.window),
                   top_eigenvalue=upd.top_eigenvalues[0] if upd.top_eigenvalues else None)
        return out
