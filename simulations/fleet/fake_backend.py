"""A numpy stand-in for the device side: real memory, real statistics, a toy objective.

It exists so that the harness (planning, caps, faults, reports, scale) can be tested in seconds
and scaled to thousands of devices, independently of the diffusion engine. It is honest about the
two things the harness measures:

- memory: it allocates and touches real pages like a model would - weights proportional to the
  bits, activations proportional to the batch items and the square of the resolution - so the
  watchdog sees a real resident-memory peak;
- wire traffic: it sends the project's real statistic (`zo_core.subspace_stats.client_statistic`)
  computed from its token updates, so the server path is the real one.

The objective is ``L(theta) = ||theta - target||^2`` (+ noise); the token is optimised with the
same one-sided RGE (n directions, shared across the n + 1 evaluations), optionally drawing part of
each direction inside the fleet's broadcast basis. Fidelity is the cosine of theta with its target.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulations.fleet.backend import DeviceTask, InjectedCrash, TaskResult, state_sha
from zo_core.subspace_stats import WireSchema, client_statistic

MIB = 2**20


@dataclass(frozen=True)
class FakeModelSpec:
    """Memory shape and problem size of the stand-in model.

    Attributes
    ----------
    dim
        Token dimension D.
    weights_mib_fp32
        Resident weights at 32 bits (scaled by bits / 32).
    item_mib
        Activation memory per forward batch item at full resolution.
    num_concepts
        Distinct target concepts.
    concept_seed
        Seed of the concepts' target and initializer vectors.
    """

    dim: int = 32
    weights_mib_fp32: float = 64.0
    item_mib: float = 8.0
    num_concepts: int = 8
    concept_seed: int = 1234
    num_buckets: int = 10
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.dim < 2 or self.num_concepts < 1:
            raise ValueError(f"fake model needs dim >= 2 and num_concepts >= 1, got {self.dim}, {self.num_concepts}")
        if self.weights_mib_fp32 < 0 or self.item_mib < 0:
            raise ValueError("fake model memory sizes must be >= 0")


def concept_vectors(spec: FakeModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """(targets, initializers), each (num_concepts, dim): the initializer is the target's
    "class word": correlated with it (cosine about 0.5), as "dog" is with one particular dog."""
    rng = np.random.default_rng(spec.concept_seed)
    targets = rng.standard_normal((spec.num_concepts, spec.dim))
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    noise = rng.standard_normal((spec.num_concepts, spec.dim))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    inits = targets + 1.7 * noise
    inits /= np.linalg.norm(inits, axis=1, keepdims=True)
    return targets, inits


def _touch(mib: float) -> np.ndarray:
    """Allocate `mib` MiB and write every page, so that it is resident (not just reserved)."""
    return np.ones(int(mib * MIB) // 8, dtype=np.float64)


class FakeBackend:
    """The stand-in device side (see the module docstring)."""

    def __init__(self, spec: FakeModelSpec | None = None, *, lr: float = 0.05, mu: float = 1e-3,
                 audit: bool = False) -> None:
        self.spec = spec or FakeModelSpec()
        self.audit = audit
        self.lr = lr
        self.mu = mu
        self.targets, self.inits = concept_vectors(self.spec)
        self.schema = WireSchema(self.spec.dim, self.spec.num_buckets, self.spec.num_train_timesteps)
        self._weights: np.ndarray | None = None
        self._bits = 0

    def load(self, bits: int) -> None:
        """Hold "weights" of ``weights_mib_fp32 * bits / 32`` MiB."""
        if bits == self._bits:
            return
        self._weights = None
        gc.collect()
        self._weights = _touch(self.spec.weights_mib_fp32 * bits / 32)
        self._bits = bits

    def forget(self, device_id: int) -> None:
        """Nothing is held per device in memory: state lives on disk only."""

    def fidelity(self, theta: np.ndarray, concept: int) -> float:
        """Cosine of the token with its concept's target."""
        t = self.targets[concept % self.spec.num_concepts]
        return float(theta @ t / (np.linalg.norm(theta) * np.linalg.norm(t) + 1e-12))

    def run(self, task: DeviceTask) -> TaskResult:
        """One local round: RGE steps on the toy objective, then the wire statistic."""
        if self._bits != task.plan.bits:
            raise RuntimeError(f"model loaded at {self._bits} bits, task planned {task.plan.bits}")
        state_dir = Path(task.state_dir)
        sha = state_sha(state_dir)
        concept = task.concept % self.spec.num_concepts
        theta_path = state_dir / "theta.npy"
        theta = np.load(theta_path) if theta_path.is_file() else self.inits[concept].copy()
        target = self.targets[concept]
        rng = np.random.default_rng(task.seed)
        basis = task.broadcast.get("basis")
        basis_weight = float(task.broadcast.get("config", {}).get("basis.weight", 0.0))
        n = task.plan.n
        act_mib = self.spec.item_mib * task.plan.resolution_scale**2
        updates, timesteps, signal = [], [], []
        for step in range(task.local_steps):
            if task.crash_at_step is not None and step == task.crash_at_step:
                raise InjectedCrash(f"device {task.device_id}: injected crash at step {step}")
            # Activations: one forward of n + 1 items (batched) or n + 1 forwards of one item.
            acts = _touch(act_mib * task.plan.items)
            e = rng.standard_normal((n, self.spec.dim))
            if basis is not None and basis_weight > 0:
                inside = rng.standard_normal((n, basis.shape[0])) @ basis
                e = np.sqrt(1 - basis_weight) * e + np.sqrt(basis_weight) * inside * np.sqrt(self.spec.dim / basis.shape[0])
            noise = 0.01 * rng.standard_normal()
            base = float(np.sum((theta - target) ** 2)) + noise
            pert = np.array([np.sum((theta + self.mu * ei - target) ** 2) + noise for ei in e])
            diffs = (pert - base) / self.mu
            g = diffs @ e / n
            new = theta - self.lr * g
            updates.append(new - theta)
            theta = new
            timesteps.append(int(rng.integers(0, self.spec.num_train_timesteps)))
            signal.append(float(np.mean(np.abs(diffs))))
            del acts
        np.save(theta_path, theta)
        stats = client_statistic(np.array(updates), timesteps, signal, self.schema)
        return TaskResult(
            reply=stats,
            metrics={"local-steps": float(task.local_steps), "loss-last": float(np.sum((theta - target) ** 2))},
            fidelity=float("nan"),
            forward_items=task.local_steps * task.plan.forward_items_per_step,
            state_sha=sha,
            extra={"model": self.describe(),
                   **({"audit": {"theta": theta.copy(), "theta_init": self.inits[concept].copy()}} if self.audit else {})},
        )

    def evaluate(self, task: DeviceTask) -> float:
        """Cosine of the saved token with the device's target concept."""
        theta = np.load(Path(task.state_dir) / "theta.npy")
        return self.fidelity(theta, task.concept % self.spec.num_concepts)

    def describe(self) -> dict[str, object]:
        """What the server needs to know about the model: D, T and a fingerprint."""
        s = self.spec
        return {"dim": s.dim, "num_train_timesteps": s.num_train_timesteps, "fidelity": "cosine to target",
                "fingerprint": f"fake-d{s.dim}-c{s.num_concepts}-s{s.concept_seed}"}


def make_fake_backend(**kwargs: object) -> FakeBackend:
    """Factory the worker calls (keyword arguments from the scenario's backend settings)."""
    spec_keys = {"dim", "weights_mib_fp32", "item_mib", "num_concepts", "concept_seed"}
    spec = FakeModelSpec(**{k: v for k, v in kwargs.items() if k in spec_keys})  # type: ignore[arg-type]
    rest = {k: v for k, v in kwargs.items() if k not in spec_keys}
    return FakeBackend(spec, **rest)  # type: ignore[arg-type]
