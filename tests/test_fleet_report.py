"""Report generation: every file is written, consistent with the run, plots are real PNGs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from simulations.cli import main as simulate_main
from simulations.fleet.report import PLOTS
from simulations.fleet.scenario import SCENARIO_DIR

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    assert simulate_main(["simulate", "--scenario", str(SCENARIO_DIR / "test-fake.toml"), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_every_output_is_written(results: Path) -> None:
    for name in ("report.md", "rounds.json", "devices.csv", "memory-checks.csv", *PLOTS.values()):
        assert (results / name).is_file(), name
    for name in PLOTS.values():
        data = (results / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


@pytest.mark.slow
def test_report_agrees_with_rounds_and_devices(results: Path) -> None:
    rounds = json.loads((results / "rounds.json").read_text())
    with (results / "devices.csv").open() as fh:
        devices = list(csv.DictReader(fh))
    assert len(rounds["rounds"]) == rounds["scenario"]["fleet"]["rounds"] == 3
    assert len(devices) == sum(rounds["scenario"]["devices"].values())
    # Per-device counts add up to the per-round counts.
    for key in ("ok", "dropped", "crash", "oom", "straggler"):
        assert sum(int(d[key]) for d in devices) == sum(r[key] for r in rounds["rounds"]), key
    assert sum(int(d["bytes_up"]) for d in devices) == sum(r["bytes_up"] for r in rounds["rounds"])
    report = (results / "report.md").read_text()
    ok = sum(r["ok"] for r in rounds["rounds"])
    assert f"{ok} replies aggregated" in report
    assert "predicted vs measured" in report and "SD1.5 at 512 px" in report
    eps = rounds["rounds"][-1]["epsilon"]
    assert eps is not None and eps > 0  # the scenario has DP on
    assert all(f"]({p})" in report for p in PLOTS.values())


@pytest.mark.slow
def test_simulate_refuses_a_non_empty_results_folder(results: Path) -> None:
    with pytest.raises(FileExistsError, match="not empty"):
        simulate_main(["simulate", "--scenario", str(SCENARIO_DIR / "test-fake.toml"), "--out", str(results)])


def test_simulate_reports_a_missing_scenario(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="scenario file not found"):
        simulate_main(["simulate", "--scenario", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")])
