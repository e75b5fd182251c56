"""What a worker subprocess runs for one device, and what it sends back.

A *backend* is the device side of the simulation: it loads the model once per worker process
(per weight-bits setting), prepares a device's private data on first use, runs one round of local
training for a device from its on-device state, and evaluates the device's fidelity. Two exist:
`embedded_backend.EmbeddedBackend` (the real federated client on the embedded default model) and
`fake_backend.FakeBackend` (numpy, allocates memory like a model; for harness tests and scale runs).

Everything that crosses the process boundary here is plain data (picklable dataclasses and numpy
arrays), because the worker is a separate process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from simulations.fleet.memory_model import DevicePlan


class InjectedCrash(RuntimeError):
    """Raised inside a device's local training when the scenario injects a crash."""


@dataclass(frozen=True)
class DeviceTask:
    """One device's work in one round.

    Attributes
    ----------
    device_id
        Index of the device in the fleet.
    round
        Round number (1-based); 0 is a calibration task.
    plan
        The configuration the planner chose for the device.
    state_dir
        A staging copy of the device's on-device state; the task reads and writes it, and the
        harness commits it only when the task ends in a state the device would have saved.
    data_dir
        The device's private data folder.
    concept
        Index of the device's concept in the backend's concept list (the simulation's oracle).
    broadcast
        What the server sent this round: scalar config values and numpy arrays.
    seed
        The device's seed for this round.
    local_steps
        Steps to run.
    crash_at_step
        Inject a crash after this many steps (None: no crash).
    fresh_start
        The device's app was restarted before this round: the worker drops everything it holds
        in memory for the device first, so the task must resume from the on-device state alone.
    """

    device_id: int
    round: int
    plan: DevicePlan
    state_dir: str
    data_dir: str
    concept: int
    broadcast: dict[str, Any]
    seed: int
    local_steps: int
    crash_at_step: int | None = None
    fresh_start: bool = False


@dataclass(frozen=True)
class TaskResult:
    """What one device's round produced.

    Attributes
    ----------
    reply
        The statistics the client sends to the server (name -> array), exactly as on the wire.
    metrics
        The scalar metrics the client sends.
    fidelity
        The simulation oracle's score of the device's saved token (never sent by a client); the
        worker fills it in after the device's memory window with `DeviceBackend.evaluate`.
    forward_items
        UNet forward batch items spent (drives the simulated clock).
    state_sha
        Hash of the on-device state the task started from (checks that no state was lost).
    """

    reply: dict[str, np.ndarray]
    metrics: dict[str, float]
    fidelity: float
    forward_items: int
    state_sha: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reply_bytes(self) -> int:
        """Bytes of the statistics payload (what the uplink carries, before framing)."""
        return int(sum(a.nbytes for a in self.reply.values()))


class DeviceBackend(Protocol):
    """The device side, as a worker process drives it."""

    def load(self, bits: int) -> None:
        """Hold the model with weights at `bits` (free any other); called outside device tasks."""

    def run(self, task: DeviceTask) -> TaskResult:
        """Run one round for one device from the state in ``task.state_dir``."""

    def forget(self, device_id: int) -> None:
        """Drop everything held in memory for a device (its app was restarted)."""

    def evaluate(self, task: DeviceTask) -> float:
        """The simulation oracle's fidelity of the state the task saved (run outside its memory window)."""


def state_sha(state_dir: str | Path) -> str:
    """SHA-256 over the names and bytes of every file in a state folder ("" when it is empty)."""
    root = Path(state_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    if not files:
        return ""
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()
