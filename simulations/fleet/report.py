"""Write a fleet run's results folder: report.md, rounds.json, devices.csv, memory.csv, plots.

Plots use matplotlib's Agg backend (files only, no display), one PNG per question:
fidelity over rounds per profile, peak memory per profile against its cap, epsilon over rounds,
bytes per round, and excluded / OOM / dropped / crashed / straggling devices per round.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from simulations.fleet.memory_model import sd15_table  # noqa: E402
from simulations.fleet.runner import FleetResult  # noqa: E402

FAILURE_KINDS = ("excluded", "oom", "dropped", "crash", "straggler", "over_upload_limit", "error", "state_mismatch")
PLOTS = {
    "fidelity": "fidelity-per-profile.png",
    "memory": "peak-memory-per-profile.png",
    "epsilon": "epsilon.png",
    "bytes": "bytes-per-round.png",
    "failures": "failures-per-round.png",
}


def write_report(result: FleetResult, out_dir: str | Path) -> Path:
    """Write every output file; returns the path of report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rounds.json").write_text(json.dumps(_rounds_json(result), indent=2))
    _write_devices_csv(result, out / "devices.csv")
    _write_memory_csv(result, out / "memory-checks.csv")
    _plot_fidelity(result, out / PLOTS["fidelity"])
    _plot_memory(result, out / PLOTS["memory"])
    _plot_epsilon(result, out / PLOTS["epsilon"])
    _plot_bytes(result, out / PLOTS["bytes"])
    _plot_failures(result, out / PLOTS["failures"])
    errors = [f"device {d.id} ({d.profile.name}) {e}" for d in result.devices for e in d.errors]
    (out / "errors.txt").write_text("\n\n".join(errors) + ("\n" if errors else ""))
    path = out / "report.md"
    path.write_text(_markdown(result))
    return path


def _rounds_json(result: FleetResult) -> dict[str, Any]:
    sc = result.scenario
    return {
        "scenario": {"name": sc.fleet.name, "source": sc.source, "fleet": asdict(sc.fleet), "devices": sc.devices,
                     "planner": asdict(sc.planner), "faults": asdict(sc.faults), "dp": asdict(sc.dp),
                     "secagg": asdict(sc.secagg), "basis": asdict(sc.basis), "puts": asdict(sc.puts),
                     "zo": asdict(sc.zo),
                     "profiles": {k: asdict(v) for k, v in sc.profiles.items() if k in sc.devices}},
        "model": result.model,
        "memory_scale": result.memory_scale,
        "memory_model": result.memory_model.to_json(),
        "calibration_mib": result.calibration,
        "runtime_baseline_mib": result.baseline_mib,
        "worker_restarts": result.worker_restarts,
        "wall_s": result.wall_s,
        "rounds": result.rounds,
    }


def device_rows(result: FleetResult) -> list[dict[str, Any]]:
    """One row per device: profile, budget, plan, predicted and measured peak, outcomes, fidelity."""
    rows = []
    for d in result.devices:
        rows.append({
            "device": d.id,
            "profile": d.profile.name,
            "budget_mib": round(d.budget_mib, 3),
            "plan": d.plan.label if d.plan else "excluded",
            "predicted_mib": None if d.predicted_mib is None else round(d.predicted_mib, 3),
            "peak_mib": None if d.peak_mib is None else round(d.peak_mib, 3),
            "sampled": sum(v for k, v in d.counts.items() if k not in ("excluded", "restarted")),
            **{k: d.counts.get(k, 0) for k in ("ok", "dropped", "crash", "oom", "straggler", "over_upload_limit",
                                                "error", "restarted", "state_mismatch")},
            "bytes_up": d.bytes_up,
            "fidelity": None if d.fidelity is None else round(d.fidelity, 5),
        })
    return rows


def _write_devices_csv(result: FleetResult, path: Path) -> None:
    rows = device_rows(result)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _write_memory_csv(result: FleetResult, path: Path) -> None:
    fields = ["device", "profile", "plan", "predicted_mib", "measured_mib", "cap_mib", "simulated_s", "wall_s"]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(result.memory_checks)


def memory_validation(result: FleetResult) -> list[dict[str, Any]]:
    """Predicted vs measured peak per planned configuration (all device rounds that finished)."""
    by_plan: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for c in result.memory_checks:
        if c["predicted_mib"] is not None:
            by_plan[c["plan"]].append((c["predicted_mib"], c["measured_mib"]))
    rows = []
    for plan, pairs in sorted(by_plan.items()):
        pred = pairs[0][0]
        meas = [m for _, m in pairs]
        mean = sum(meas) / len(meas)
        rows.append({"plan": plan, "runs": len(meas), "predicted_mib": pred, "measured_mean_mib": mean,
                     "measured_max_mib": max(meas), "error_pct": 100 * (pred - mean) / mean if mean else None})
    return rows


def _profiles(result: FleetResult) -> list[str]:
    return [name for name in result.scenario.devices if result.scenario.devices[name] > 0]


def _finish(fig: Any, ax: Any, path: Path, *, xlabel: str, ylabel: str, title: str, legend: bool = True) -> None:
    """Label, lay out, write and close one plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_fidelity(result: FleetResult, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [r["round"] for r in result.rounds]
    for name in _profiles(result):
        ys = [r["fidelity_by_profile"].get(name) for r in result.rounds]
        if any(y is not None for y in ys):
            ax.plot(rounds, [float("nan") if y is None else y for y in ys], marker="o", label=name)
    _finish(fig, ax, path, xlabel="round", title="Fidelity over rounds per profile",
            ylabel=f"fidelity: {result.model.get('fidelity', '?')} (mean over trained devices)")


def _plot_memory(result: FleetResult, path: Path) -> None:
    names = _profiles(result)
    peaks: dict[str, list[float]] = defaultdict(list)
    caps: dict[str, float] = {}
    for d in result.devices:
        caps[d.profile.name] = d.budget_mib
        if d.peak_mib is not None:
            peaks[d.profile.name].append(d.peak_mib)
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar(xs, [max(peaks[n]) if peaks[n] else 0.0 for n in names], color="tab:blue", label="measured peak (max)")
    ax.scatter(xs, [caps[n] for n in names], color="tab:red", marker="_", s=900, linewidths=3,
               label=f"cap (budget x {result.memory_scale:.3g})", zorder=3)
    ax.set_xticks(list(xs), names, rotation=20, fontsize=8)
    _finish(fig, ax, path, xlabel="profile", ylabel="app memory, MiB", title="Peak memory per profile against its cap")


def _plot_epsilon(result: FleetResult, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [r["round"] for r in result.rounds]
    eps = [r["epsilon"] for r in result.rounds]
    if result.scenario.dp.enabled:
        ax.plot(rounds, [float("nan") if e is None else e for e in eps], marker="o")
        ax.axhline(result.scenario.dp.epsilon_budget, color="tab:red", ls="--", label="budget")
        title = f"Epsilon over rounds (delta = {result.scenario.dp.delta:g})"
    else:
        ax.text(0.5, 0.5, "differential privacy off: no epsilon guarantee", ha="center", va="center",
                transform=ax.transAxes)
        title = "Epsilon over rounds"
    _finish(fig, ax, path, xlabel="round", ylabel="epsilon", title=title)


def _plot_bytes(result: FleetResult, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [r["round"] for r in result.rounds]
    ax.bar([x - 0.2 for x in rounds], [r["bytes_up"] / 1024 for r in result.rounds], width=0.4, label="uplink (devices -> server)")
    ax.bar([x + 0.2 for x in rounds], [r["bytes_down"] / 1024 for r in result.rounds], width=0.4, label="downlink (server -> devices)")
    _finish(fig, ax, path, xlabel="round", ylabel="KiB", title="Bytes sent per round")


def _plot_failures(result: FleetResult, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [r["round"] for r in result.rounds]
    bottom = [0.0] * len(rounds)
    for kind in FAILURE_KINDS:
        ys = [float(r.get(kind, 0)) for r in result.rounds]
        if any(ys):
            ax.bar(rounds, ys, bottom=bottom, label=kind)
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    _finish(fig, ax, path, xlabel="round", ylabel="devices",
            title="Excluded / OOM / dropped / crashed / straggling devices per round")


def _table(rows: list[dict[str, Any]], cols: list[str] | None = None) -> str:
    if not rows:
        return "(none)\n"
    cols = cols or list(rows[0])

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _markdown(result: FleetResult) -> str:
    sc = result.scenario
    totals = {k: sum(int(r.get(k, 0)) for r in result.rounds) for k in
              ("sampled", "ok", "dropped", "crash", "oom", "straggler", "over_upload_limit", "error", "restarted", "state_mismatch")}
    last = result.rounds[-1] if result.rounds else {}
    per_profile = []
    for name in _profiles(result):
        devs = [d for d in result.devices if d.profile.name == name]
        fids = [d.fidelity for d in devs if d.fidelity is not None]
        peaks = [d.peak_mib for d in devs if d.peak_mib is not None]
        per_profile.append({
            "profile": name, "devices": len(devs), "cap_mib": devs[0].budget_mib,
            "plan": devs[0].plan.label if devs[0].plan else "excluded",
            "predicted_mib": devs[0].predicted_mib, "max_peak_mib": max(peaks) if peaks else None,
            "trained": len(fids), "final_fidelity": sum(fids) / len(fids) if fids else None,
            "oom": sum(d.counts.get("oom", 0) for d in devs),
        })
    sd15_rows, sd15_source = sd15_table([sc.profiles[n] for n in _profiles(result)], sc.planner)
    parts = [
        f"# Fleet simulation: {sc.fleet.name}\n",
        f"Scenario `{sc.source}`: {sc.num_devices} devices, {sc.fleet.rounds} rounds, {sc.fleet.clients_per_round} "
        f"clients per round, {sc.fleet.local_steps} local steps, backend `{sc.fleet.backend}`, "
        f"DP {'on (sigma ' + format(sc.dp.noise_multiplier, 'g') + ')' if sc.dp.enabled else 'off'}, "
        f"secure aggregation {'on' if sc.secagg.enabled else 'off'}, seed {sc.fleet.seed}. "
        f"Wall time {result.wall_s:.1f} s with {sc.fleet.workers} worker processes "
        f"({result.worker_restarts} restarted after an out-of-memory kill or a dead worker). "
        f"Fidelity is {result.model.get('fidelity', 'unknown')!s} (higher is better).\n",
        "## Outcome\n",
        f"- device rounds: {totals['sampled']} sampled, {totals['ok']} replies aggregated, {totals['dropped']} dropped, "
        f"{totals['crash']} crashed, {totals['oom']} killed out-of-memory, {totals['straggler']} past the round "
        f"timeout, {totals['over_upload_limit']} over their upload limit, {totals['error']} other errors, "
        f"{totals['restarted']} restarted before the round.\n"
        f"- errors other than injected faults: {totals['error']} (tracebacks in `errors.txt`).\n"
        f"- state integrity: {totals['state_mismatch']} tasks started from a state other than the last committed one.\n"
        f"- excluded devices (no configuration fits): {sum(1 for d in result.devices if d.plan is None)}.\n"
        f"- final mean fidelity: {_num(last.get('fidelity_mean'))}; final epsilon: {_num(last.get('epsilon'))}.\n",
        "## Per profile\n",
        _table(per_profile),
        f"Caps are each profile's app budget x {result.memory_scale:.4g} "
        f"({'auto: the simulated model is as tight as SD1.5 at 512 px' if sc.fleet.memory_scale == 'auto' else 'memory-scale'}); "
        f"app memory is resident memory above the worker's runtime baseline ({result.baseline_mib:.0f} MiB).\n",
        "## Memory model: predicted vs measured\n",
        "Fitted per (bits, resolution) on the calibration peaks below (two batch sizes each, measured at "
        "start-up); each row compares the prediction for a planned configuration with the peaks measured "
        "while devices ran it (negative error: the model predicted less than measured).\n\n",
        _table(memory_validation(result)),
        "\nCalibration peaks (MiB): " + ", ".join(f"{k}: {v:.1f}" for k, v in result.calibration.items()) + "\n",
        "## What each profile could run with SD1.5 at 512 px\n",
        f"Real budgets, no scaling; figures: {sd15_source}.\n\n",
        _table(sd15_rows),
        "## Rounds\n",
        _table([{k: r[k] for k in ("round", "online", "sampled", "ok", "dropped", "crash", "oom", "straggler",
                                    "restarted", "bytes_up", "epsilon", "fidelity_mean", "wall_s")} for r in result.rounds]),
        "## Files\n",
        "`rounds.json` (scenario, model, every round), `devices.csv` (one row per device), `memory-checks.csv` "
        "(predicted vs measured per device round), plots: " + ", ".join(f"`{p}`" for p in PLOTS.values()) + ".\n",
    ]
    parts += [f"\n![{k}]({p})\n" for k, p in PLOTS.items()]
    return "\n".join(parts)


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}"
