"""One device's work in a round: load what it needs, run local ZO steps, build its statistic.

Kept free of message handling (client_app.py does that) so it can be tested and benchmarked
directly. Nothing here sends anything: it returns the statistic and metrics, the caller wraps
them, and the allowlist mod decides what leaves.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.state_store import EncryptedStateStore
from zo_core.config import QuantConfig, TIConfig, ZOConfig
from zo_core.engine import Personalizer, PrivateData
from zo_core.memory import process_peak_mib
from zo_core.state import PersonalState
from zo_core.subspace_stats import RoundBroadcast, client_statistic

log = logging.getLogger("fedzoodip.client")

Scalar = bool | int | float | str
EVAL_SEED = 0x5EED  # evaluation draws are fixed, so eval-loss compares rounds on the same samples


class FingerprintMismatch(RuntimeError):
    """The server's round is for another model than the one on this device."""


@dataclass(frozen=True)
class DeviceConfig:
    """Where a device's private things live and how it runs (node config, or the partition).

    Deployment: `--node-config 'data-dir="..." state-dir="..." model-dir="..."'`. Simulation:
    the partition id picks `sim.data-root/partition-<id>` (photos written by the test or the
    embedded world) and `sim.state-root/partition-<id>`.
    """

    data_dir: Path
    state_dir: Path
    key_file: Path
    model_dir: str | None  # None: the embedded default model
    quant: str = "none"
    memory_budget_mib: float = 0.0  # 0 = no budget
    placeholder: str = "<my-concept>"
    initializer: str = "object"
    num_vectors: int = 1
    lr: float = 5e-3
    seed: int = 0
    eval_draws: int = 4

    def __post_init__(self) -> None:
        QuantConfig(backend=self.quant)  # type: ignore[arg-type]  # validates the name
        TIConfig(placeholder=self.placeholder, initializer=self.initializer, num_vectors=self.num_vectors)
        if self.memory_budget_mib < 0:
            raise ValueError(f"memory-budget-mib must be >= 0, got {self.memory_budget_mib}")
        if not self.lr > 0:
            raise ValueError(f"zo.lr must be > 0, got {self.lr}")
        if self.eval_draws < 1:
            raise ValueError(f"eval.draws must be >= 1, got {self.eval_draws}")

    @property
    def ti(self) -> TIConfig:
        return TIConfig(placeholder=self.placeholder, initializer=self.initializer, num_vectors=self.num_vectors)

    @classmethod
    def from_context(cls, node_config: Mapping[str, Scalar], run_config: Mapping[str, Scalar]) -> DeviceConfig:
        """Deployment reads `data-dir` / `state-dir` from the node config; simulation the partition."""
        model_dir = str(node_config.get("model-dir", run_config.get("model-dir", ""))) or None
        common = {
            "model_dir": model_dir,
            "quant": str(node_config.get("quant", run_config.get("quant", "none"))),
            "memory_budget_mib": float(node_config.get("memory-budget-mib", 0.0)),
            "lr": float(run_config.get("zo.lr", 5e-3)),
            "eval_draws": int(run_config.get("eval.draws", 4)),
            "num_vectors": int(run_config.get("ti.num-vectors", 1)),
        }
        if "data-dir" in node_config:
            state_dir = Path(str(node_config.get("state-dir", "")))
            if not str(node_config.get("state-dir", "")):
                raise ValueError("node config has data-dir but no state-dir")
            return cls(
                data_dir=Path(str(node_config["data-dir"])),
                state_dir=state_dir,
                key_file=Path(str(node_config.get("key-file", state_dir / "device.key"))),
                placeholder=str(node_config.get("placeholder", run_config.get("ti.placeholder", "<my-concept>"))),
                initializer=str(node_config.get("initializer", run_config.get("ti.initializer", "object"))),
                seed=int(node_config.get("seed", 0)),
                **common,  # type: ignore[arg-type]
            )
        if "partition-id" not in node_config:
            raise ValueError("node config has neither data-dir (deployment) nor partition-id (simulation)")
        pid = int(node_config["partition-id"])
        data_root, state_root = str(run_config.get("sim.data-root", "")), str(run_config.get("sim.state-root", ""))
        if not state_root:
            raise ValueError("simulation needs the run-config key sim.state-root")
        placeholder = str(run_config.get("ti.placeholder", "<my-concept>"))
        initializer = str(run_config.get("ti.initializer", "object"))
        if data_root:
            data_dir = Path(data_root) / f"partition-{pid}"
        else:
            data_dir, placeholder, initializer = _world_partition(pid, Path(state_root), run_config)
        state_dir = Path(state_root) / f"partition-{pid}"
        return cls(
            data_dir=data_dir,
            state_dir=state_dir,
            key_file=state_dir / "device.key",
            placeholder=placeholder,
            initializer=initializer,
            seed=pid,
            **common,  # type: ignore[arg-type]
        )


def _world_partition(pid: int, state_root: Path, run_config: Mapping[str, Scalar]) -> tuple[Path, str, str]:
    """Partition id -> a personal concept of the embedded world; its photos are written once."""
    from simulations.world.concepts import get_concept, list_concepts

    names = list_concepts()
    concept = get_concept(names[pid % len(names)])
    photos = state_root / f"partition-{pid}" / "photos"
    if not photos.is_dir() or not any(photos.iterdir()):
        concept.write_photos(photos, seed=pid)
    return photos, concept.placeholder, concept.initializer


class ModelCache:
    """One loaded model per (model dir, quant backend) per process.

    Flower's simulation reuses its Ray actors across rounds and clients, and a SuperNode's
    long-lived process handles many messages, so the model is loaded once there, not per client
    per round. Private data is cached per data dir for the same reason (encoding is the VAE's
    one use). A lock keeps concurrent first loads from doubling the memory.
    """

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], Personalizer] = {}
        self._data: dict[tuple[str, str, str, str], PrivateData] = {}
        self._lock = threading.Lock()
        self.loads = 0

    def model(self, model_dir: str | None, quant: str) -> Personalizer:
        key = (str(Path(model_dir).resolve()) if model_dir else "<embedded>", quant)
        with self._lock:
            if key not in self._models:
                self._models[key] = Personalizer.from_pretrained(
                    model_dir, quant=QuantConfig(backend=quant)  # type: ignore[arg-type]
                )
                self.loads += 1
            return self._models[key]

    def data(self, model: Personalizer, device: DeviceConfig) -> PrivateData:
        key = (model.fingerprint, str(device.data_dir.resolve()), device.placeholder, device.initializer)
        with self._lock:
            if key not in self._data:
                self._data[key] = model.prepare_data(device.data_dir, device.ti)
            return self._data[key]


def load_state(store: EncryptedStateStore, model: Personalizer, device: DeviceConfig) -> PersonalState:
    """The device's saved state, or a fresh one; a state for another model/concept is an error."""
    saved = store.load()
    if saved is None:
        return model.init_state(device.ti, seed=device.seed)
    tensors, meta = saved
    if meta.get("model-fingerprint") != model.fingerprint:
        raise FingerprintMismatch(
            f"the saved personal state in {store.path} was learned on another model; "
            "move it away to start over (it is not overwritten)"
        )
    state = PersonalState.from_tensors(tensors)
    if state.placeholder != device.placeholder:
        raise ValueError(f"saved state is for {state.placeholder!r}, device config says {device.placeholder!r}")
    return state


def run_fit_round(
    model: Personalizer,
    data: PrivateData,
    store: EncryptedStateStore,
    device: DeviceConfig,
    broadcast: RoundBroadcast,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Local ZO steps with the fleet's basis and window; persist the state; build the statistic."""
    t0 = time.perf_counter()
    if broadcast.model_fingerprint != model.fingerprint:
        raise FingerprintMismatch(
            f"round {broadcast.round} is for model {broadcast.model_fingerprint[:12]}..., this device "
            f"holds {model.fingerprint[:12]}...; refusing the round"
        )
    D = model.token_dim * device.num_vectors
    if broadcast.dim != D or broadcast.num_train_timesteps != model.num_train_timesteps:
        raise ValueError(
            f"broadcast schema (D={broadcast.dim}, T={broadcast.num_train_timesteps}) does not match "
            f"this device (D={D}, T={model.num_train_timesteps})"
        )
    if device.memory_budget_mib and process_peak_mib() > device.memory_budget_mib:
        # The model and the encoded photos are loaded by now: a device already over its budget
        # refuses the round instead of training into an out-of-memory kill mid-write.
        raise MemoryError(
            f"peak resident memory {process_peak_mib():.0f} MiB exceeds this device's budget of "
            f"{device.memory_budget_mib:.0f} MiB before training; use a quantized backend or a smaller model"
        )
    state = load_state(store, model, device)
    zo = ZOConfig(n=broadcast.n, mu=broadcast.mu, lr=device.lr, puts=(broadcast.puts_low, broadcast.puts_high))
    basis = None if broadcast.basis is None else torch.from_numpy(np.asarray(broadcast.basis, dtype=np.float32))
    res = model.train(data, state, zo, broadcast.local_steps, basis=basis, basis_weight=broadcast.basis_weight,
                      keep_grads=broadcast.stat_source == "gradients")
    store.save(
        res.state.to_tensors(),
        {"model-fingerprint": model.fingerprint, "round": str(broadcast.round)},
    )
    timesteps, signal = list(res.timesteps), list(res.signal)
    forwards = res.forward_passes
    if broadcast.probe_steps:
        # Probe the whole timestep range from the new state (result discarded): the signal of the
        # buckets outside the window is what lets the server move the window at all.
        probe_zo = dataclasses.replace(zo, puts=None)
        probe = model.train(data, res.state, probe_zo, broadcast.probe_steps)
        timesteps += probe.timesteps
        signal += probe.signal
        forwards += probe.forward_passes
    vectors = res.updates if broadcast.stat_source == "updates" else res.grads
    stats = client_statistic(vectors.numpy(), timesteps, signal, broadcast.schema,
                             segments=broadcast.stat_segments)
    k = max(1, len(res.losses) // 10)
    metrics = {
        "loss-first": float(np.mean(res.losses[:k])),
        "loss-last": float(np.mean(res.losses[-k:])),
        "local-steps": float(len(res.losses)),
        "forward-passes": float(forwards),
        "peak-rss-mib": process_peak_mib(),
        "wall-s": time.perf_counter() - t0,
    }
    if device.memory_budget_mib and metrics["peak-rss-mib"] > device.memory_budget_mib:
        log.warning("peak RSS %.0f MiB exceeds the device budget %.0f MiB",
                    metrics["peak-rss-mib"], device.memory_budget_mib)  # fmt: skip
    return stats, metrics


def evaluate_state(model: Personalizer, data: PrivateData, state: PersonalState, window: tuple[int, int],
                   draws: int) -> float:  # fmt: skip
    """Mean loss of the token on `draws` fixed draws inside `window`; the draws come from a fixed
    evaluation seed, not the training stream, so the numbers of two rounds are comparable."""
    return model.evaluate(data, state, window=window, draws=draws, seed=EVAL_SEED)
