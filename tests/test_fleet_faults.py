"""Fault injection: the run completes, every fault is recorded, no device state is lost."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from simulations.fleet.fake_backend import FakeBackend
from simulations.fleet.faults import draw_faults
from simulations.fleet.runner import FleetResult, run_fleet
from simulations.fleet.scenario import FaultConfig, Scenario, scenario_from_dict

FAULTY = {
    "fleet": {"name": "faulty", "rounds": 4, "clients-per-round": 8, "local-steps": 6, "seed": 3, "backend": "fake",
              "workers": 2, "round-timeout-s": 30.0, "item-seconds": 0.5},
    "devices": {"mid-range-phone": 6, "raspberry-pi-5": 4},
    "profiles": {"mid-range-phone": {"memory-budget-mib": 120, "availability": 1.0},
                 "raspberry-pi-5": {"memory-budget-mib": 120, "availability": 1.0}},
    "planner": {"bits": [32, 8], "resolution-scale": [1.0]},
    "faults": {"dropout": 0.15, "crash": 0.15, "restart": 0.3, "straggler": 0.15, "memory-pressure": 0.15,
               "memory-pressure-fraction": 0.9},
    "basis": {"rank": 4},
}


def _run(data: dict, out: Path) -> FleetResult:  # type: ignore[type-arg]
    return run_fleet(scenario_from_dict(data, "faulty"), out, progress=lambda _: None)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> FleetResult:
    return _run(FAULTY, tmp_path_factory.mktemp("faulty"))


def test_draws_are_per_device_and_reproducible() -> None:
    cfg = FaultConfig(dropout=0.5, crash=0.5, restart=0.5, straggler=0.5, memory_pressure=0.5)
    a = draw_faults(cfg, 1, 2, [0, 1, 2, 3], 10)
    b = draw_faults(cfg, 1, 2, [3, 2], 10)
    assert a[3] == b[3] and a[2] == b[2]  # another device joining or leaving changes nothing
    assert all(f.crash_at_step is None or not f.dropout for f in a.values())
    assert all(f.crash_at_step is None or 0 <= f.crash_at_step < 10 for f in a.values())


@pytest.mark.slow
def test_faulty_run_completes_and_records_every_fault(faulty_run: FleetResult) -> None:
    rounds = faulty_run.rounds
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    totals = {k: sum(r[k] for r in rounds) for k in ("ok", "dropped", "crash", "oom", "straggler", "restarted")}
    assert all(v > 0 for v in totals.values()), totals
    assert sum(r["state_mismatch"] for r in rounds) == 0
    assert sum(r["error"] for r in rounds) == 0
    for r in rounds:  # every sampled device is accounted for exactly once
        assert r["sampled"] == sum(r[k] for k in ("ok", "dropped", "crash", "oom", "straggler", "over_upload_limit",
                                                  "error", "state_mismatch"))
    assert faulty_run.worker_restarts == totals["oom"]


@pytest.mark.slow
def test_no_device_state_is_lost_or_corrupted(faulty_run: FleetResult) -> None:
    backend = FakeBackend()
    for d in faulty_run.devices:
        theta_path = d.state_dir / "theta.npy"
        finished = d.counts.get("ok", 0) + d.counts.get("dropped", 0) + d.counts.get("straggler", 0)
        # Only rounds that finished locally save state; OOM kills and crashes never do.
        assert theta_path.exists() == (finished > 0), (d.id, d.counts)
        if finished:
            assert backend.fidelity(np.load(theta_path), d.concept) == pytest.approx(d.fidelity, abs=1e-9)
        assert not any(p.name.endswith(".old") for p in d.state_dir.parent.iterdir())


@pytest.mark.slow
def test_a_fleet_under_total_memory_pressure_is_killed_but_the_run_completes(tmp_path: Path) -> None:
    data = {**FAULTY, "fleet": {**FAULTY["fleet"], "rounds": 2},
            "faults": {"memory-pressure": 1.0, "memory-pressure-fraction": 0.9}}
    res = _run(data, tmp_path)
    assert [r["oom"] for r in res.rounds] == [r["sampled"] for r in res.rounds]
    assert all(r["ok"] == 0 and r["epsilon"] is None for r in res.rounds)
    assert all(not (d.state_dir / "theta.npy").exists() for d in res.devices)


@pytest.mark.slow
def test_same_seed_same_run(faulty_run: FleetResult, tmp_path: Path) -> None:
    again = _run(FAULTY, tmp_path)
    keys = ("sampled", "ok", "dropped", "crash", "oom", "straggler", "restarted", "bytes_up", "fidelity_mean")
    assert [[r[k] for k in keys] for r in again.rounds] == [[r[k] for k in keys] for r in faulty_run.rounds]


def test_scenario_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown key 'roundz'"):
        scenario_from_dict({**FAULTY, "fleet": {**FAULTY["fleet"], "roundz": 3}})
    with pytest.raises(ValueError, match="unknown table"):
        scenario_from_dict({**FAULTY, "privacy": {}})
    with pytest.raises(ValueError, match="faults.crash must be in"):
        scenario_from_dict({**FAULTY, "faults": {"crash": 1.5}})
    with pytest.raises(ValueError, match="unknown profile"):
        scenario_from_dict({**FAULTY, "devices": {"toaster": 3}})
    with pytest.raises(ValueError, match="memory-budget-mib must be > 0"):
        scenario_from_dict({**FAULTY, "profiles": {"mid-range-phone": {"memory-budget-mib": 0}}})
    sc: Scenario = scenario_from_dict(FAULTY)
    with pytest.raises(ValueError, match="clients-per-round"):
        replace(sc, devices={"mid-range-phone": 2})
