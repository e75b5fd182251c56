"""Seeded fault draws: which sampled device suffers which fault in a round.

Every draw comes from a generator keyed by (scenario seed, round, device), so a device's faults
do not change when other devices join or leave the sample, and a run repeats exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from simulations.fleet.scenario import FaultConfig

FAULT_STREAM = 4


@dataclass(frozen=True)
class RoundFaults:
    """The faults one device suffers in one round (see `FaultConfig` for what each means)."""

    dropout: bool = False
    crash_at_step: int | None = None
    restart: bool = False
    straggler: bool = False
    memory_pressure: bool = False


def draw_faults(cfg: FaultConfig, seed: int, round_num: int, device_ids: Sequence[int], local_steps: int) -> dict[int, RoundFaults]:
    """Draw each device's faults for a round.

    A crash happens at a uniformly drawn step in ``[0, local_steps)``; a crashed device cannot
    also drop out (it never got to send), so dropout is drawn only for devices that do not crash.
    """
    out: dict[int, RoundFaults] = {}
    for dev in device_ids:
        rng = np.random.default_rng(np.random.SeedSequence([seed, FAULT_STREAM, round_num, dev]))
        u = rng.random(5)
        crash = int(rng.integers(0, local_steps)) if u[1] < cfg.crash else None
        out[dev] = RoundFaults(
            dropout=crash is None and bool(u[0] < cfg.dropout),
            crash_at_step=crash,
            restart=bool(u[2] < cfg.restart),
            straggler=bool(u[3] < cfg.straggler),
            memory_pressure=bool(u[4] < cfg.memory_pressure),
        )
    return out
