"""Three sweep studies on the fleet harness, each a scenario TOML plus variants:

- ``epsilon_fidelity``: DP noise multiplier (and DP off) -> final epsilon vs final fidelity;
- ``quantization``: weight bits 32 / 8 / 4 -> predicted and measured peak memory vs fidelity;
- ``fleet_size``: 24 / 60 / 120 devices at a fixed sampled fraction -> fidelity per round, and the
  round at which each fleet first reaches a common fidelity threshold (convergence speed).

Usage: ``python -m simulations.studies.sweeps epsilon_fidelity --out runs/study-eps`` (the study
name is also the scenario file ``simulations/studies/<name>.toml``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from simulations.fleet.report import memory_validation  # noqa: E402
from simulations.fleet.runner import FleetResult  # noqa: E402
from simulations.studies.common import (  # noqa: E402
    common_overrides,
    load_study_scenario,
    run_variants,
    study_parser,
    write_study,
)


def _final(result: FleetResult, key: str) -> Any:
    return result.rounds[-1][key] if result.rounds else None


def epsilon_rows(results: dict[str, FleetResult]) -> list[dict[str, Any]]:
    return [{"variant": name, "noise multiplier": r.scenario.dp.noise_multiplier if r.scenario.dp.enabled else None,
             "final epsilon": _final(r, "epsilon"), "final fidelity": _final(r, "fidelity_mean"),
             "device rounds aggregated": sum(x["ok"] for x in r.rounds)} for name, r in results.items()]


def quantization_rows(results: dict[str, FleetResult]) -> list[dict[str, Any]]:
    rows = []
    for name, r in results.items():
        val = memory_validation(r)
        rows.append({"variant": name, "bits": r.scenario.planner.bits[0],
                     "predicted peak MiB": val[0]["predicted_mib"] if val else None,
                     "measured peak MiB": val[0]["measured_mean_mib"] if val else None,
                     "final fidelity": _final(r, "fidelity_mean"),
                     "wall s": round(r.wall_s, 1)})
    return rows


def fidelity_by_participation(result: FleetResult) -> dict[int, float]:
    """Mean fidelity of the devices after their k-th finished local round, for each k."""
    by_k: dict[int, list[float]] = {}
    for d in result.devices:
        for k, (_, fid) in enumerate(d.history, start=1):
            by_k.setdefault(k, []).append(fid)
    return {k: sum(v) / len(v) for k, v in sorted(by_k.items())}


def fleet_size_rows(results: dict[str, FleetResult]) -> list[dict[str, Any]]:
    """Per fleet: mean fidelity after 1, 2, 3 local rounds of a device, and the rounds a device
    needs to reach a common threshold (90% of the best such mean over all fleets)."""
    curves = {name: fidelity_by_participation(r) for name, r in results.items()}
    best = max((v for c in curves.values() for v in c.values()), default=None)
    threshold = 0.9 * best if best is not None else None
    rows = []
    for name, r in results.items():
        c = curves[name]
        reached = next((k for k, v in c.items() if threshold is not None and v >= threshold), None)
        rows.append({"variant": name, "devices": r.scenario.num_devices,
                     "clients per round": r.scenario.fleet.clients_per_round,
                     **{f"fidelity after {k} local rounds": c.get(k) for k in (1, 2, 3)},
                     "local rounds to threshold": reached, "threshold": threshold,
                     "final fleet fidelity": _final(r, "fidelity_mean"), "wall s": round(r.wall_s, 1)})
    return rows


def plot_curves(results: dict[str, FleetResult], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        ax.plot([x["round"] for x in r.rounds],
                [float("nan") if x["fidelity_mean"] is None else x["fidelity_mean"] for x in r.rounds],
                marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("mean fidelity of trained devices")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


STUDIES: dict[str, tuple[str, dict[str, dict[str, Any]], Callable[[dict[str, FleetResult]], list[dict[str, Any]]], str]] = {
    "epsilon_fidelity": (
        "Epsilon vs final fidelity",
        {"dp-off": {"dp.enabled": False}, "sigma-4": {"dp.noise-multiplier": 4.0},
         "sigma-2": {"dp.noise-multiplier": 2.0}, "sigma-1": {"dp.noise-multiplier": 1.0},
         "sigma-0.5": {"dp.noise-multiplier": 0.5}},
        epsilon_rows,
        "Same fleet, seed and faults; only the DP noise multiplier of the server's aggregate changes. "
        "DP noise touches only what the server releases (basis, window); each device still learns from "
        "its own photos, so fidelity can only suffer through a noisier fleet basis.",
    ),
    "quantization": (
        "Quantization bits vs memory vs fidelity",
        {"fp32": {"planner.bits": [32]}, "int8": {"planner.bits": [8]}, "int4": {"planner.bits": [4]}},
        quantization_rows,
        "Every device runs the same bits (quanto weight-only int8 / int4, as the paper); memory is the "
        "app memory measured by the worker watchdog, predicted by the calibrated memory model.",
    ),
    "fleet_size": (
        "Fleet size vs convergence speed",
        {"24-devices": {"devices.mid-range-phone": 12, "devices.high-end-phone": 12, "fleet.clients-per-round": 6},
         "60-devices": {"devices.mid-range-phone": 30, "devices.high-end-phone": 30, "fleet.clients-per-round": 15},
         "120-devices": {"devices.mid-range-phone": 60, "devices.high-end-phone": 60, "fleet.clients-per-round": 30}},
        fleet_size_rows,
        "A quarter of each fleet is sampled per round, so every fleet gives each device the same number of "
        "local rounds on average; what differs is how many devices feed the server's basis and window. "
        "Convergence speed is measured per device: mean fidelity after its k-th finished local round, and "
        "the k at which it first reaches 90% of the best value any fleet reached.",
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = study_parser("Run one sweep study")
    parser.add_argument("study", choices=sorted(STUDIES))
    args = parser.parse_args(argv)
    title, variants, tabulate, notes = STUDIES[args.study]
    overrides = common_overrides(args)
    results = run_variants(load_study_scenario(args.study), variants, args.out, common=overrides)
    plot = f"{args.study}-curves.png"
    path = write_study(args.out, args.study, title, tabulate(results), notes + f"\n\n![fidelity per round]({plot})",
                       overrides)
    plot_curves(results, args.out / plot, title)
    print(f"study: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
