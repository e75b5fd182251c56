"""The `fedzoodip simulate` command: run a fleet scenario and write its report.

The lead wires `add_simulate_parser` into the `fedzoodip` command; `run_simulate` is the handler.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from simulations.fleet.scenario import DEFAULT_SCENARIO, load_scenario


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Register ``simulate`` on a subparsers object; returns the new parser."""
    p = subparsers.add_parser(
        "simulate",
        help="simulate a fleet of memory-capped devices running the federated client",
        description="Run a fleet scenario (default: the shipped one on the embedded model) and write "
        "report.md, rounds.json, devices.csv and plots to the output folder.",
    )
    p.add_argument("--scenario", type=Path, default=None,
                   help=f"scenario TOML file (default: {DEFAULT_SCENARIO.name} shipped with the project)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: runs/simulate-<scenario name>-<UTC time>)")
    p.add_argument("--rounds", type=int, default=None, help="override fleet.rounds")
    p.add_argument("--workers", type=int, default=None, help="override fleet.workers (at most the CPU cores are useful)")
    p.add_argument("--seed", type=int, default=None, help="override fleet.seed")
    p.add_argument("--model-dir", default=None,
                   help="override fleet.model-dir: simulate a local diffusers folder instead of the embedded model")
    p.set_defaults(func=run_simulate)
    return p


def run_simulate(args: argparse.Namespace) -> int:
    """Run the scenario named by `args`; prints progress per round and where the report is."""
    from simulations.fleet.report import write_report
    from simulations.fleet.runner import run_fleet

    scenario = load_scenario(args.scenario)
    given = (("rounds", args.rounds), ("workers", args.workers), ("seed", args.seed), ("model_dir", args.model_dir))
    changes = {k: v for k, v in given if v is not None}
    if changes:
        scenario = scenario.with_fleet(**changes)
    out = args.out or Path("runs") / f"simulate-{scenario.fleet.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"results folder {out} exists and is not empty; choose another --out")
    result = run_fleet(scenario, out)
    report = write_report(result, out)
    print(f"report: {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m simulations.cli simulate ...``) until the lead wires it in."""
    parser = argparse.ArgumentParser(prog="fedzoodip")
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
