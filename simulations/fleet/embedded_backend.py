"""The device side on a real diffusion model: the project's client, one device at a time.

Each worker holds one `zo_core.engine.Personalizer` (the embedded default, or `model_dir`) at the
weight bits of the devices it is serving, and runs a device's round with the client's own
`client.task.run_fit_round` (load the encrypted on-device state, local ZO steps with the fleet's
basis and PUTS window, save the state, build the wire statistic). Nothing of the round logic is
re-implemented here; this module only maps a `DeviceTask` onto the client's inputs.

Fidelity (the simulation's oracle, never sent by a device) is measured after the device's memory
window, on the state the device saved:

- ``"oracle"``: generate images of the device's concept with its token and score them with the
  synthetic world's oracle (`simulations.world.oracle.Oracle`, mean feature cosine with the
  concept's photos: the analogue of the paper's CLIP-I / DINO);
- ``"eval-loss"``: minus the client's evaluation loss on fixed draws (`client.task.evaluate_state`);
  works on any model, e.g. the random tiny models of the tests.

Limits of the client today (asked for in the harness's report): `run_fit_round` always runs the
n + 1 candidates batched and at the model's native resolution, so plans with sequential forwards
or a lower resolution are refused here with a clear error rather than silently run otherwise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch

from client.state_store import EncryptedStateStore
from client.task import DeviceConfig, evaluate_state, load_state, run_fit_round
from simulations.fleet.backend import DeviceTask, InjectedCrash, TaskResult, state_sha
from simulations.fleet.workers import release_memory
from simulations.world.concepts import Concept, get_concept, list_concepts
from zo_core.config import QuantConfig, ZOConfig
from zo_core.engine import Personalizer, PrivateData
from zo_core.subspace_stats import RoundBroadcast

Fidelity = Literal["oracle", "eval-loss"]
BITS_TO_QUANT = {32: "none", 8: "quanto-int8", 4: "quanto-int4"}
FIDELITY_LABELS = {"oracle": "oracle feature cosine with the concept's photos", "eval-loss": "minus the evaluation loss"}
CALIBRATION_BUCKETS = 10


class EmbeddedBackend:
    """Runs the real client for simulated devices (see the module docstring).

    Parameters
    ----------
    model_dir
        A diffusers folder, or None for the embedded default model.
    zo
        Client-side ZO settings (``lr``; ``mu`` and ``n`` come from the broadcast and the plan).
    fidelity
        How fidelity is measured (``"oracle"`` or ``"eval-loss"``).
    eval_images, eval_steps
        Images generated per device and sampler steps, for ``"oracle"``.
    audit
        Return the device's token with its result (privacy audit study only).
    """

    def __init__(
        self,
        model_dir: str | None = None,
        zo: ZOConfig | None = None,
        *,
        fidelity: Fidelity = "oracle",
        eval_images: int = 4,
        eval_steps: int = 10,
        work_dir: str = "",
        concepts_per_device: int = 1,
        audit: bool = False,
    ) -> None:
        torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
        if fidelity not in ("oracle", "eval-loss"):
            raise ValueError(f"fidelity must be 'oracle' or 'eval-loss', got {fidelity!r}")
        if concepts_per_device != 1:
            raise ValueError("the client learns one concept per device (one placeholder per state store)")
        self.model_dir, self.zo, self.fidelity_kind = model_dir, zo or ZOConfig(), fidelity
        self.eval_images, self.eval_steps, self.audit = eval_images, eval_steps, audit
        self.oracle = None
        if fidelity == "oracle":
            from simulations.world.oracle import Oracle

            self.oracle = Oracle.load()
        self.concepts = list_concepts()
        self.model: Personalizer | None = None
        self.bits = 0

    # --- model and per-device memory ---------------------------------------------------------

    def load(self, bits: int) -> None:
        """Hold the model at `bits` (int8/int4: quanto, as the paper), freeing any other first."""
        if bits == self.bits:
            return
        if bits not in BITS_TO_QUANT:
            raise ValueError(f"the embedded backend runs bits {sorted(BITS_TO_QUANT)}, got {bits}")
        self.model = None
        release_memory()
        quant = QuantConfig(backend=BITS_TO_QUANT[bits])  # type: ignore[arg-type]
        self.model = Personalizer.from_pretrained(self.model_dir, quant=quant)
        self.bits = bits

    def forget(self, device_id: int) -> None:
        """Nothing to drop: no device's data outlives its task in a worker (see `_private_data`)."""

    def describe(self) -> dict[str, Any]:
        """D, T and the fingerprint of the loaded model, and the fidelity metric."""
        assert self.model is not None
        return {"dim": self.model.token_dim, "num_train_timesteps": self.model.num_train_timesteps,
                "fingerprint": self.model.fingerprint, "fidelity": FIDELITY_LABELS[self.fidelity_kind],
                "token_dim": self.model.token_dim, "resolution": self.model.info.resolution}

    # --- one device ---------------------------------------------------------------------------

    def concept(self, task: DeviceTask) -> Concept:
        return get_concept(self.concepts[task.concept % len(self.concepts)])

    def device_config(self, task: DeviceTask) -> DeviceConfig:
        c = self.concept(task)
        return DeviceConfig(
            data_dir=Path(task.data_dir) / "photos", state_dir=Path(task.state_dir),
            key_file=Path(task.data_dir) / "device.key", model_dir=self.model_dir,
            quant=BITS_TO_QUANT[task.plan.bits], placeholder=c.placeholder, initializer=c.initializer,
            lr=self.zo.lr, seed=max(task.device_id, 0),
        )

    def _broadcast(self, task: DeviceTask) -> RoundBroadcast:
        """The server's broadcast with the device's planned n (calibration builds its own)."""
        assert self.model is not None
        if task.broadcast:
            b = RoundBroadcast.from_config(task.broadcast["config"], task.broadcast["basis"])
            return dataclasses.replace(b, n=task.plan.n, local_steps=task.local_steps)
        low, high = self.zo.puts or (0, self.model.num_train_timesteps)
        return RoundBroadcast(round=1, local_steps=task.local_steps, n=task.plan.n, mu=self.zo.mu, puts_low=low,
                              puts_high=high, basis_version=0, basis_weight=0.0,
                              model_fingerprint=self.model.fingerprint, dim=self.model.token_dim,
                              num_buckets=CALIBRATION_BUCKETS, num_train_timesteps=self.model.num_train_timesteps)

    def run(self, task: DeviceTask) -> TaskResult:
        """One round of the real client for one device."""
        if not task.plan.batched or task.plan.resolution_scale != 1.0:
            raise ValueError(
                f"plan {task.plan.label}: client.task.run_fit_round runs batched forwards at the model's "
                "resolution only; restrict [planner] batched = [true] and resolution-scale = [1.0]"
            )
        if self.model is None or self.bits != task.plan.bits:
            raise RuntimeError(f"model loaded at {self.bits} bits, task planned {task.plan.bits}")
        data = self._private_data(task)
        if task.crash_at_step is not None:
            # The client gives no hook inside its step loop; crash part-way through the round's
            # work instead: after the data is prepared, before anything is saved.
            raise InjectedCrash(f"device {task.device_id}: injected crash before step {task.crash_at_step}")
        sha = state_sha(task.state_dir)
        device = self.device_config(task)
        store = EncryptedStateStore(device.state_dir, device.key_file)
        stats, metrics = run_fit_round(self.model, data, store, device, self._broadcast(task))
        extra: dict[str, Any] = {"model": self.describe()}
        if self.audit:  # simulation only: the study compares the token with what the server saw
            theta = load_state(store, self.model, device).theta.flatten().numpy().copy()
            init = self.model.init_state(device.ti, seed=device.seed).theta.flatten().numpy().copy()
            extra["audit"] = {"theta": theta, "theta_init": init}
        return TaskResult(reply=stats, metrics=metrics, fidelity=float("nan"),
                          forward_items=int(metrics["forward-passes"]), state_sha=sha, extra=extra)

    def _private_data(self, task: DeviceTask) -> PrivateData:
        """The device's photos (taken once, on first use), encoded for this task.

        Encoded every round rather than cached in the worker: a worker serves many devices, and a
        cache of all their latents would count against whichever device runs next. (The client's
        `ModelCache` keeps them, which is right for one device per process.)
        """
        assert self.model is not None
        device = self.device_config(task)
        if not device.data_dir.is_dir() or not any(device.data_dir.iterdir()):
            self.concept(task).write_photos(device.data_dir, seed=max(task.device_id, 0),
                                            resolution=self.model.info.resolution)
        return self.model.prepare_data(device.data_dir, device.ti)

    def evaluate(self, task: DeviceTask) -> float:
        """Fidelity of the state the device saved (outside its memory window; see module docstring)."""
        assert self.model is not None
        device = self.device_config(task)
        state = load_state(EncryptedStateStore(device.state_dir, device.key_file), self.model, device)
        if self.oracle is None:
            window = self.zo.puts or (0, self.model.num_train_timesteps)
            return -evaluate_state(self.model, self._private_data(task), state, window, draws=4)
        concept = self.concept(task)
        images = self.model.generate(state, [f"a photo of {concept.placeholder}"], num_images=self.eval_images,
                                     steps=self.eval_steps, seed=0)
        self.model.free_vae()
        return float(self.oracle.concept_fidelity(images, concept, photos_seed=max(task.device_id, 0))["feature_cosine"])


def make_embedded_backend(**kwargs: Any) -> EmbeddedBackend:
    """Factory the worker calls."""
    return EmbeddedBackend(**kwargs)
