"""The harness on the real client: a tiny random SD-shaped model, two rounds, faults on."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.fleet.runner import FleetResult, run_fleet
from simulations.fleet.scenario import scenario_from_dict
from simulations.world.concepts import get_concept, list_concepts
from zo_core.model_factory import DEFAULT_WORDS, build_tiny_sd


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory: pytest.TempPathFactory) -> FleetResult:
    root = tmp_path_factory.mktemp("fleet-embedded")
    words = list(DEFAULT_WORDS) + [get_concept(c).initializer for c in list_concepts()]
    model = build_tiny_sd(root / "model", words=words, seed=0)
    data = {
        "fleet": {"name": "embedded-smoke", "rounds": 2, "clients-per-round": 4, "local-steps": 3, "seed": 1,
                  "backend": "embedded", "model-dir": str(model), "fidelity": "eval-loss", "workers": 2},
        "devices": {"mid-range-phone": 3, "jetson-edge-box": 2},
        "profiles": {"mid-range-phone": {"availability": 1.0}, "jetson-edge-box": {"availability": 1.0}},
        "planner": {"bits": [32, 8], "batched": [True], "resolution-scale": [1.0]},
        "faults": {"crash": 0.2, "restart": 0.5},
        "dp": {"enabled": True, "epsilon-budget": 100.0},
        "basis": {"rank": 4},
    }
    return run_fleet(scenario_from_dict(data, "embedded-smoke"), root / "run", progress=lambda _: None)


@pytest.mark.slow
def test_real_client_rounds_complete_with_encrypted_states(embedded_run: FleetResult) -> None:
    rounds = embedded_run.rounds
    assert len(rounds) == 2
    assert sum(r["error"] for r in rounds) == 0, [e for d in embedded_run.devices for e in d.errors]
    assert sum(r["state_mismatch"] for r in rounds) == 0
    assert sum(r["ok"] for r in rounds) >= 3
    assert rounds[-1]["epsilon"] is not None and rounds[-1]["basis_version"] >= 1
    trained = [d for d in embedded_run.devices if d.counts.get("ok")]
    for d in trained:
        files = [p.name for p in d.state_dir.iterdir()]
        assert files and all(not f.endswith(".npy") for f in files)  # the client's encrypted store
        assert d.fidelity is not None and d.fidelity < 0  # minus an evaluation loss
    # Every variant of the model the fleet mixes has its own fingerprint.
    assert set(embedded_run.model["fingerprints"]) == {32, 8}


@pytest.mark.slow
def test_memory_model_predicts_the_real_client_within_the_planner_headroom(embedded_run: FleetResult) -> None:
    checks = embedded_run.memory_checks
    assert checks
    for c in checks:
        assert c["measured_mib"] > 0
        assert abs(c["predicted_mib"] - c["measured_mib"]) / c["measured_mib"] < embedded_run.scenario.planner.headroom
