"""How the fleet harness scales: wall time and peak memory for 10, 100 and 1000 devices.

Each measurement runs in a fresh Python process (so peaks are its own) and reports:

- ``wall_s``: the whole run, start-up and calibration included;
- ``harness_peak_mib``: peak resident memory of the main process (scenario, planner, server,
  device bookkeeping, report);
- ``worker_peak_mib``: the largest peak of any worker process (model + one device task);
- ``state_kib``: on-disk size of all device folders (state + private data) at the end.

Two fleets per size: ``harness`` runs the numpy stand-in backend with 10% of the fleet sampled
per round (what the round loop, workers and bookkeeping cost as the fleet grows); ``embedded``
runs the real client on the embedded model (or ``--model-dir``) with a fixed 10 devices per
round (what a larger fleet costs when participation is fixed: it should barely grow, since the
model is loaded once per worker, not once per device).

Usage::

    python benchmarks/scale.py                  # writes benchmarks/results/scale.json and scale.md
    python benchmarks/scale.py --sizes 10 100   # a subset
    python benchmarks/scale.py --random-model   # `embedded` on random weights of the first embedded model's shapes

``--random-model`` builds (with `zo_core.model_factory`) a random-weight model with the shapes of
the embedded default (64 px, token width 64, UNet channels 48/96, VAE 16/32/64; see
`simulations/world/train_model.py`): time and memory depend on shapes, not weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ROUNDS = 2
LOCAL_STEPS = 5


def _scenario(kind: str, size: int, model_dir: str | None) -> dict[str, Any]:
    per_round = max(1, size // 10) if kind == "harness" else min(10, size)
    fleet: dict[str, Any] = {"name": f"scale-{kind}-{size}", "rounds": ROUNDS, "clients-per-round": per_round,
                             "local-steps": LOCAL_STEPS, "seed": 0, "workers": 2, "memory-scale": 1.0}
    if kind == "harness":
        fleet["backend"] = "fake"
    else:
        fleet.update(backend="embedded", fidelity="eval-loss")
        if model_dir:
            fleet["model-dir"] = model_dir
    share = {"low-end-phone": 0.25, "mid-range-phone": 0.35, "high-end-phone": 0.2, "jetson-edge-box": 0.1}
    devices = {k: int(size * v) for k, v in share.items()}
    devices["raspberry-pi-5"] = size - sum(devices.values())
    return {"fleet": fleet, "devices": devices,
            "profiles": {name: {"availability": 1.0} for name in devices},
            "planner": {"bits": [32, 8], "batched": [True], "resolution-scale": [1.0]},
            "basis": {"rank": 4}}


def build_random_model(out_dir: Path) -> Path:
    """A random-weight model whose tokenizer knows the world's words, shaped like the embedded default
    as first shipped (a two-level UNet; the shipped one now has three levels). The recorded results
    in benchmarks/results/scale.md were measured on this shape; it stays so that reruns compare."""
    from simulations.world.captions import vocabulary
    from simulations.world.concepts import get_concept, list_concepts
    from zo_core.model_factory import DEFAULT_WORDS, TinySDSpec, build_tiny_sd

    words = sorted(set(DEFAULT_WORDS) | set(vocabulary()) | {get_concept(c).initializer for c in list_concepts()})
    spec = TinySDSpec(resolution=64, token_dim=64, text_layers=2, text_heads=4, unet_channels=(48, 96),
                      attention_head_dim=12, vae_channels=(16, 32, 64), norm_num_groups=8)
    return build_tiny_sd(out_dir, spec, words=words, seed=0)


def _dir_kib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1024


def measure_one(kind: str, size: int, model_dir: str | None) -> dict[str, Any]:
    """Run one fleet in this process and measure it (called in a fresh subprocess)."""
    from simulations.fleet.report import write_report
    from simulations.fleet.runner import run_fleet
    from simulations.fleet.scenario import scenario_from_dict
    from zo_core.memory import read_status_mib

    out = Path(tempfile.mkdtemp(prefix=f"scale-{kind}-{size}-"))
    try:
        t0 = time.perf_counter()
        result = run_fleet(scenario_from_dict(_scenario(kind, size, model_dir), f"scale-{kind}-{size}"), out,
                           progress=lambda _: None)
        write_report(result, out)
        wall = time.perf_counter() - t0
        rounds = result.rounds
        # A worker's peak: its runtime baseline plus the largest device task it ran (each task's
        # VmHWM is reset at its start, so the workers' own high-water marks are per task).
        worker_peaks = [c["measured_mib"] for c in result.memory_checks] + list(result.calibration.values())
        return {
            "kind": kind,
            "devices": size,
            "rounds": len(rounds),
            "clients_per_round": result.scenario.fleet.clients_per_round,
            "device_rounds_ok": sum(r["ok"] for r in rounds),
            "errors": sum(r["error"] for r in rounds),
            "wall_s": round(wall, 2),
            "round_wall_s": [round(r["wall_s"], 2) for r in rounds],
            # VmHWM, not ru_maxrss: Linux carries the parent's pre-exec peak into ru_maxrss.
            "harness_peak_mib": round(read_status_mib("VmHWM"), 1),
            "worker_peak_mib": round(result.baseline_mib + max(worker_peaks), 1),
            "state_kib": round(_dir_kib(out / "devices"), 1),
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Fleet harness scale benchmark",
        "",
        f"Machine: {data['machine']}. Command: `{data['command']}`.",
        f"Model for `embedded`: {data['model']}.",
        "",
        f"Each fleet runs {ROUNDS} rounds of {LOCAL_STEPS} local steps on 2 worker processes; `harness` samples 10% "
        "of the fleet per round on the numpy stand-in backend, `embedded` samples 10 devices per round "
        "on the real client. Wall time is the run itself (worker start-up and calibration included, the main "
        "process's own imports not). Peaks: `VmHWM` of the main process; for workers, their runtime baseline "
        "plus the largest device task they ran. About 430 MiB of either is the interpreter with torch, "
        "diffusers and transformers imported.",
        "",
        "| fleet | devices | clients/round | device rounds ok | wall s | per-round wall s | main peak MiB | worker peak MiB | device folders KiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        lines.append(f"| {r['kind']} | {r['devices']} | {r['clients_per_round']} | {r['device_rounds_ok']} | {r['wall_s']} | "
                     f"{', '.join(str(x) for x in r['round_wall_s'])} | {r['harness_peak_mib']} | {r['worker_peak_mib']} | "
                     f"{r['state_kib']} |")
    lines += ["", "## How they grow", ""]
    for kind in ("harness", "embedded"):
        rows = [r for r in data["results"] if r["kind"] == kind]
        if len(rows) >= 2:
            a, b = rows[0], rows[-1]
            lines.append(
                f"- `{kind}`: {a['devices']} -> {b['devices']} devices ({b['devices'] / a['devices']:.0f}x): wall "
                f"{a['wall_s']} -> {b['wall_s']} s ({b['wall_s'] / a['wall_s']:.2f}x), main-process peak "
                f"{a['harness_peak_mib']} -> {b['harness_peak_mib']} MiB, worker peak {a['worker_peak_mib']} -> "
                f"{b['worker_peak_mib']} MiB, device folders {a['state_kib']} -> {b['state_kib']} KiB."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--kinds", nargs="+", choices=("harness", "embedded"), default=["harness", "embedded"])
    p.add_argument("--model-dir", default=None, help="diffusers folder for `embedded` (default: the embedded model)")
    p.add_argument("--random-model", action="store_true",
                   help="run `embedded` on random weights shaped like the first embedded model (two-level UNet; built in a temp folder)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.model_dir)))
        return 0
    if args.random_model and args.model_dir:
        raise ValueError("give either --model-dir or --random-model, not both")
    tmp_model = Path(tempfile.mkdtemp(prefix="scale-model-")) if args.random_model else None
    if tmp_model is not None:
        args.model_dir = str(build_random_model(tmp_model / "model"))
    try:
        results = _run_all(args)
    finally:
        if tmp_model is not None:
            shutil.rmtree(tmp_model, ignore_errors=True)
    if args.random_model:
        model = "random weights with the first embedded model's shapes (two-level UNet; --random-model)"
    elif args.model_dir:
        model = Path(args.model_dir).name
    else:
        model = "the embedded default (zo_core/assets/tinyworld)"
    data = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
                   f"{platform.system()} {platform.release()}",
        "command": "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": model,
        "rounds": ROUNDS,
        "local_steps": LOCAL_STEPS,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "scale.md").write_text(_markdown(data))
    print(f"wrote {args.out / 'scale.json'} and {args.out / 'scale.md'}")
    return 0


def _run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each (kind, size) in a fresh subprocess; returns the rows."""
    results = []
    for kind in args.kinds:
        for size in args.sizes:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", kind, str(size)]
            if args.model_dir:
                cmd += ["--model-dir", args.model_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{kind} with {size} devices failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{kind:9s} {size:5d} devices: {row['wall_s']:7.1f} s, main peak {row['harness_peak_mib']} MiB, "
                  f"worker peak {row['worker_peak_mib']} MiB", flush=True)
            results.append(row)
    return results


if __name__ == "__main__":
    raise SystemExit(main())
