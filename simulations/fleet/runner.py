"""The rounds of a simulated fleet: plan devices, sample, inject faults, run, aggregate, record.

What runs where (details in docs/simulation.md):

- main process: this loop, the planner, fault draws, device sampling, the simulated clock and
  the server (`fleet_server.SimulatedServer`, the project's own server math);
- worker subprocesses (`workers.WorkerPool`, one per core): the device side (a backend: the real
  client on the embedded model, or the numpy stand-in), the model loaded once per worker, each
  device task under its memory cap.

Device state lives on disk, one folder per device; a task works on a staging copy, committed
only when the device would have saved it (finished locally), so an out-of-memory kill, a crash or
a dead worker never leaves a half-written state, and every task checks that it starts from
exactly the state last committed (``state_sha``).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simulations.fleet.backend import DeviceTask, TaskResult, state_sha
from simulations.fleet.faults import RoundFaults, draw_faults
from simulations.fleet.fleet_server import SimulatedServer
from simulations.fleet.memory_model import (
    DevicePlan,
    MemoryModel,
    auto_memory_scale,
    plan_device,
)
from simulations.fleet.profiles import DeviceProfile
from simulations.fleet.scenario import Scenario
from simulations.fleet.workers import Job, Outcome, WorkerPool
from zo_core.subspace_stats import WireSchema

Progress = Callable[[str], None]
# Called after each round's aggregation with (round, server, [(device, result) that arrived]).
RoundHook = Callable[[int, SimulatedServer, list[tuple["Device", TaskResult]]], None]
CALIBRATION_STEPS = 2
SAMPLING_STREAM, CONCEPT_STREAM, SEED_STREAM = 1, 2, 3

BACKENDS: dict[str, str] = {
    "fake": "simulations.fleet.fake_backend:make_fake_backend",
    "embedded": "simulations.fleet.embedded_backend:make_embedded_backend",
}


@dataclass
class Device:
    """One virtual device and what happened to it (mutable bookkeeping of the run)."""

    id: int
    profile: DeviceProfile
    concept: int
    budget_mib: float
    plan: DevicePlan | None
    predicted_mib: float | None
    state_dir: Path
    data_dir: Path
    committed_sha: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    fidelity: float | None = None
    peak_mib: float | None = None
    bytes_up: int = 0
    errors: list[str] = field(default_factory=list)
    # Fidelity after each round the device finished locally: (round, fidelity).
    history: list[tuple[int, float]] = field(default_factory=list)

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


@dataclass
class FleetResult:
    """Everything a report needs."""

    scenario: Scenario
    memory_model: MemoryModel
    memory_scale: float
    calibration: dict[str, float]
    devices: list[Device]
    rounds: list[dict[str, Any]]
    memory_checks: list[dict[str, Any]]
    model: dict[str, Any]
    wall_s: float
    worker_restarts: int
    baseline_mib: float


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def backend_kwargs(scenario: Scenario, work_dir: Path) -> dict[str, Any]:
    """Settings each worker's backend is built with."""
    if scenario.fleet.backend == "fake":
        return {"audit": scenario.fleet.audit}
    return {
        "audit": scenario.fleet.audit,
        "model_dir": scenario.fleet.model_dir or None,
        "zo": scenario.zo,
        "work_dir": str(work_dir),
        "concepts_per_device": scenario.fleet.concepts_per_device,
        "fidelity": scenario.fleet.fidelity,
        "eval_images": scenario.fleet.eval_images,
        "eval_steps": scenario.fleet.eval_steps,
    }


def calibration_plans(scenario: Scenario) -> list[DevicePlan]:
    """Two plans per (bits, resolution) with different batch items, to fit the memory model.

    With sequential forwards allowed: 1 item (sequential) and 2 items (batched n = 1), so every
    batched plan with n >= 2 is an extrapolation the run then checks. Batched only: 2 and 4 items
    (n = 1 and n = 3), so n = 2 is an interpolation.
    """
    planner = scenario.planner
    pairs = ((1, False), (1, True)) if False in planner.batched else ((1, True), (3, True))
    return [DevicePlan(bits=b, n=n, batched=bt, resolution_scale=r)
            for b in planner.bits for r in planner.resolution_scale for n, bt in pairs]


def calibrate(pool: WorkerPool, scenario: Scenario, work_dir: Path) -> tuple[MemoryModel, dict[str, float], dict[str, Any]]:
    """Measure the peaks of `calibration_plans` and fit the memory model.

    Returns the fitted memory model, the measured peaks by plan label, and the model description
    the backend reported (dim, timesteps, and the fingerprint of each weight-bits variant).
    """
    plans = calibration_plans(scenario)
    jobs = []
    for i, plan in enumerate(plans):
        # One throwaway device per plan: workers run them concurrently, and a device's folders
        # (its key, its photos) belong to one device only.
        state = work_dir / "calibration" / f"state-{i}"
        state.mkdir(parents=True, exist_ok=True)
        data = work_dir / "calibration" / f"data-{i}"
        data.mkdir(parents=True, exist_ok=True)
        task = DeviceTask(device_id=-1 - i, round=0, plan=plan, state_dir=str(state), data_dir=str(data),
                          concept=0, broadcast={}, seed=i, local_steps=CALIBRATION_STEPS)
        jobs.append(Job(task, math.inf))
    outcomes = pool.run(jobs)
    measured: dict[DevicePlan, float] = {}
    model_info: dict[str, Any] = {"fingerprints": {}}
    for plan, out in zip(plans, outcomes, strict=True):
        if out.status != "ok" or out.peak_mib is None or out.result is None:
            raise RuntimeError(f"calibration of {plan.label} failed ({out.status}): {out.message}")
        measured[plan] = out.peak_mib
        info = dict(out.result.extra["model"])
        model_info["fingerprints"][plan.bits] = info.pop("fingerprint")
        model_info.update(info)
    shutil.rmtree(work_dir / "calibration", ignore_errors=True)
    model = MemoryModel.fit("simulated model (calibrated)", measured)
    return model, {p.label: v for p, v in measured.items()}, model_info


def build_devices(scenario: Scenario, model: MemoryModel, scale: float, store: Path) -> list[Device]:
    """Create the fleet: one `Device` per counted profile entry, each planned and given a folder."""
    rng = _rng(scenario.fleet.seed, CONCEPT_STREAM)
    devices: list[Device] = []
    for name, count in scenario.devices.items():
        prof = scenario.profiles[name]
        budget = prof.memory_budget_mib * scale
        plan, predicted = plan_device(budget, scenario.planner, model)
        for _ in range(count):
            i = len(devices)
            d = Device(i, prof, int(rng.integers(0, 1 << 30)), budget, plan, predicted,
                       store / f"{i:05d}" / "state", store / f"{i:05d}" / "data")
            d.state_dir.mkdir(parents=True, exist_ok=True)
            d.data_dir.mkdir(parents=True, exist_ok=True)
            devices.append(d)
    return devices


def simulated_seconds(device: Device, result: TaskResult, item_seconds: float, slowdown: float) -> float:
    """Simulated duration of a device's round: compute at the profile's speed, then upload."""
    assert device.plan is not None
    compute = result.forward_items * item_seconds * device.plan.resolution_scale**2 / device.profile.compute_speed
    upload = result.reply_bytes * 8 / (device.profile.upload_kbps * 1000)
    return compute * slowdown + upload


def _commit(device: Device, staging: Path) -> None:
    """Replace the device's state with the staging copy (rename: never half-written)."""
    old = device.state_dir.with_name("state.old")
    device.state_dir.rename(old)
    staging.rename(device.state_dir)
    shutil.rmtree(old)
    device.committed_sha = state_sha(device.state_dir)


def run_fleet(
    scenario: Scenario, out_dir: str | Path, *, progress: Progress = print, round_hook: RoundHook | None = None
) -> FleetResult:
    """Run a scenario end to end and return what happened (`report.write_report` writes it out).

    Parameters
    ----------
    scenario
        The resolved scenario.
    out_dir
        Results folder; device state folders go to ``out_dir/devices``.
    progress
        Receives one line per stage and per round.
    round_hook
        Optional observer of each round (studies use it; see `RoundHook`).
    """
    t_start = time.perf_counter()
    fleet = scenario.fleet
    out = Path(out_dir)
    store = out / "devices"
    if store.is_dir() and any(store.iterdir()):
        raise FileExistsError(f"{store} holds devices of an earlier run; give the run an empty folder")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    # Concurrency is bounded by the cores: more workers than cores only adds model copies.
    workers = min(fleet.workers, os.cpu_count() or 1)
    progress(f"fleet: {scenario.num_devices} devices, {fleet.rounds} rounds, backend {fleet.backend}, "
             f"{workers} workers" + (f" (fleet.workers = {fleet.workers} bounded by {workers} CPU cores)"
                                     if workers < fleet.workers else ""))
    with WorkerPool(BACKENDS[fleet.backend], backend_kwargs(scenario, work), workers) as pool:
        t0 = time.perf_counter()
        mem_model, calibration, model_info = calibrate(pool, scenario, work)
        scale = auto_memory_scale(mem_model) if fleet.memory_scale == "auto" else float(fleet.memory_scale)
        progress(f"calibrated the memory model on {len(calibration)} configurations in {time.perf_counter() - t0:.1f} s; "
                 f"budget scale {scale:.4g}")
        devices = build_devices(scenario, mem_model, scale, store)
        eligible = [d for d in devices if d.plan is not None]
        excluded = len(devices) - len(eligible)
        for d in devices:
            if d.plan is None:
                d.count("excluded")
        progress(f"planned: {len(eligible)} devices can train, {excluded} excluded (no configuration fits)")
        schema = WireSchema(int(model_info["dim"]), scenario.puts.buckets, int(model_info["num_train_timesteps"]))
        server = SimulatedServer(schema, fingerprint=_one_fingerprint(model_info["fingerprints"]), zo=scenario.zo,
                                 basis=scenario.basis, puts=scenario.puts, dp=scenario.dp, secagg=scenario.secagg,
                                 local_steps=fleet.local_steps, seed=fleet.seed)
        rounds: list[dict[str, Any]] = []
        checks: list[dict[str, Any]] = []
        for r in range(1, fleet.rounds + 1):
            rec = _run_round(r, scenario, pool, server, eligible, work, checks, round_hook)
            rec["excluded"] = excluded
            rounds.append(rec)
            eps = rec["epsilon"]
            progress(
                f"round {r}/{fleet.rounds}: sampled {rec['sampled']} | ok {rec['ok']} dropped {rec['dropped']} "
                f"crash {rec['crash']} oom {rec['oom']} straggler {rec['straggler']} restarted {rec['restarted']} | "
                f"eps {'-' if eps is None else f'{eps:.3g}'} | fidelity {_fmt(rec['fidelity_mean'])} | {rec['wall_s']:.1f} s"
            )
        restarts = pool.restarts
        baseline = pool.baseline_mib
    shutil.rmtree(work, ignore_errors=True)
    return FleetResult(scenario, mem_model, scale, calibration, devices, rounds, checks, model_info,
                       time.perf_counter() - t_start, restarts, baseline)


def _one_fingerprint(by_bits: dict[int, str]) -> str:
    """The fleet's base-model fingerprint; weight-bits variants of one model share it (quantization is a
    device's choice), so variants that disagree loaded different weights and the run must not start."""
    if len(set(by_bits.values())) != 1:
        raise ValueError(f"the weight-bits variants report different model fingerprints: {by_bits}")
    return next(iter(by_bits.values()))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _run_round(
    r: int,
    scenario: Scenario,
    pool: WorkerPool,
    server: SimulatedServer,
    eligible: list[Device],
    work: Path,
    checks: list[dict[str, Any]],
    round_hook: RoundHook | None = None,
) -> dict[str, Any]:
    """One round; returns its record."""
    t0 = time.perf_counter()
    fleet = scenario.fleet
    rng = _rng(fleet.seed, SAMPLING_STREAM, r)
    online = [d for d in eligible if rng.random() < d.profile.availability]
    k = min(fleet.clients_per_round, len(online))
    sampled = [online[i] for i in sorted(rng.choice(len(online), size=k, replace=False))] if k else []
    faults = draw_faults(scenario.faults, fleet.seed, r, [d.id for d in sampled], fleet.local_steps)
    broadcast = server.broadcast(r)
    jobs: list[Job] = []
    staging: list[Path] = []
    for d in sampled:
        assert d.plan is not None
        f: RoundFaults = faults[d.id]
        stage = work / f"{d.id:05d}-r{r}"
        shutil.copytree(d.state_dir, stage)
        staging.append(stage)
        cap = d.budget_mib * (1 - scenario.faults.memory_pressure_fraction if f.memory_pressure else 1.0)
        task = DeviceTask(device_id=d.id, round=r, plan=d.plan, state_dir=str(stage), data_dir=str(d.data_dir),
                          concept=d.concept, broadcast=broadcast,
                          seed=int(_rng(fleet.seed, SEED_STREAM, d.id, r).integers(0, 2**31 - 1)),
                          local_steps=fleet.local_steps, crash_at_step=f.crash_at_step, fresh_start=f.restart)
        jobs.append(Job(task, cap))
    outcomes = pool.run(jobs) if jobs else []
    counts = dict.fromkeys(("ok", "dropped", "crash", "oom", "error", "straggler", "over_upload_limit", "restarted", "state_mismatch"), 0)
    arrived: list[TaskResult] = []
    arrived_from: list[Device] = []
    bytes_up = 0
    sim_round_s = 0.0
    for d, job, stage, outcome in zip(sampled, jobs, staging, outcomes, strict=True):
        f = faults[d.id]
        if f.restart:
            counts["restarted"] += 1
            d.count("restarted")
        status, sim_s = _settle(d, job, stage, outcome, f, scenario, checks)
        counts[status] += 1
        d.count(status)
        if outcome.result is not None and status in ("ok", "straggler"):
            bytes_up += outcome.result.reply_bytes
            d.bytes_up += outcome.result.reply_bytes
        if status == "ok":
            assert outcome.result is not None
            arrived.append(outcome.result)
            arrived_from.append(d)
            sim_round_s = max(sim_round_s, sim_s)
    if counts["straggler"] or counts["dropped"]:
        sim_round_s = fleet.round_timeout_s
    available = max(len(eligible), 1)
    server_metrics = server.aggregate(r, arrived, sample_rate=max(len(sampled), 1) / available)
    if round_hook is not None:
        round_hook(r, server, list(zip(arrived_from, arrived, strict=True)))
    fid_by_profile: dict[str, list[float]] = {}
    for d in eligible:
        if d.fidelity is not None:
            fid_by_profile.setdefault(d.profile.name, []).append(d.fidelity)
    all_fid = [x for v in fid_by_profile.values() for x in v]
    return {
        "round": r,
        "online": len(online),
        "sampled": len(sampled),
        **counts,
        "bytes_up": bytes_up,
        "bytes_down": server.broadcast_bytes(r) * len(sampled),
        "epsilon": server_metrics["epsilon"],
        "dp_exhausted": server_metrics["dp_exhausted"],
        "basis_version": server_metrics["basis_version"],
        "puts_window": server_metrics["window"],
        "fidelity_by_profile": {k: float(np.mean(v)) for k, v in sorted(fid_by_profile.items())},
        "fidelity_mean": float(np.mean(all_fid)) if all_fid else None,
        "simulated_s": sim_round_s,
        "wall_s": time.perf_counter() - t0,
    }


def _settle(
    d: Device, job: Job, stage: Path, outcome: Outcome, f: RoundFaults, scenario: Scenario, checks: list[dict[str, Any]]
) -> tuple[str, float]:
    """Decide what a device's round counts as (and its simulated seconds), commit its state when
    it saved one, record the predicted-vs-measured memory check."""
    assert d.plan is not None
    if outcome.status != "ok" or outcome.result is None:
        shutil.rmtree(stage, ignore_errors=True)  # killed or crashed before saving: state untouched
        if outcome.status == "error":
            d.errors.append(f"round {job.task.round}: {outcome.message.strip()}")
        if outcome.status == "oom" and outcome.peak_mib is not None:
            d.peak_mib = max(d.peak_mib or 0.0, outcome.peak_mib)
        return outcome.status, 0.0
    res = outcome.result
    if res.state_sha != d.committed_sha:
        shutil.rmtree(stage, ignore_errors=True)
        return "state_mismatch", 0.0
    _commit(d, stage)
    d.fidelity = res.fidelity
    d.history.append((job.task.round, res.fidelity))
    assert outcome.peak_mib is not None
    d.peak_mib = max(d.peak_mib or 0.0, outcome.peak_mib)
    slowdown = scenario.faults.straggler_slowdown if f.straggler else 1.0
    sim_s = simulated_seconds(d, res, scenario.fleet.item_seconds, slowdown)
    checks.append({"device": d.id, "profile": d.profile.name, "plan": d.plan.label, "predicted_mib": d.predicted_mib,
                   "measured_mib": outcome.peak_mib, "cap_mib": job.cap_mib, "simulated_s": sim_s, "wall_s": outcome.wall_s})
    limit = d.profile.upload_limit_kib * 1024
    if f.dropout:
        return "dropped", sim_s
    if limit and res.reply_bytes > limit:
        return "over_upload_limit", sim_s
    if sim_s > scenario.fleet.round_timeout_s:
        return "straggler", sim_s
    return "ok", sim_s
