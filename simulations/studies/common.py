"""Run variants of a study's scenario and collect what each study tabulates.

A study is a base scenario TOML and a set of variants, each a set of overrides written as dotted
keys (``{"dp.noise-multiplier": 2.0}``), so that every run is reproducible from the study file and
the overrides printed in its report.
"""

from __future__ import annotations

import argparse
import copy
import json
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from simulations.fleet.report import write_report
from simulations.fleet.runner import FleetResult, RoundHook, run_fleet
from simulations.fleet.scenario import scenario_from_dict

STUDY_DIR = Path(__file__).resolve().parent


def parse_override(text: str) -> tuple[str, Any]:
    """``table.key=value`` with a TOML value (``fleet.backend="fake"``, ``fleet.rounds=3``)."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise ValueError(f"override must look like table.key=value, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word: take it as a string
    return key.strip(), parsed


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of parsed TOML with dotted-key overrides applied (``table.key`` or ``a.b.key``)."""
    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        *tables, key = dotted.split(".")
        node = out
        for t in tables:
            node = node.setdefault(t, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted!r}: {t!r} is not a table")
        node[key] = value
    return out


def load_study_scenario(name: str) -> dict[str, Any]:
    """Parsed TOML of ``simulations/studies/<name>.toml``."""
    path = STUDY_DIR / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"study scenario not found: {path}")
    with path.open("rb") as fh:
        return tomllib.load(fh)


def run_variants(
    base: dict[str, Any],
    variants: Mapping[str, Mapping[str, Any]],
    out_dir: Path,
    *,
    common: Mapping[str, Any] | None = None,
    hook_factory: Callable[[str], RoundHook | None] | None = None,
) -> dict[str, FleetResult]:
    """Run every variant (its own results folder and report under `out_dir`)."""
    results: dict[str, FleetResult] = {}
    for name, overrides in variants.items():
        data = apply_overrides(base, {**(common or {}), **overrides})
        scenario = scenario_from_dict(data, f"{base.get('fleet', {}).get('name', 'study')}:{name}")
        folder = out_dir / name
        print(f"== variant {name}: {dict(overrides)}", flush=True)
        hook = hook_factory(name) if hook_factory else None
        results[name] = run_fleet(scenario, folder, round_hook=hook)
        write_report(results[name], folder)
    return results


def study_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every study script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, required=True, help="results folder of the study")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="override a scenario value in every variant (repeatable), e.g. --set fleet.rounds=3")
    return p


def common_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return dict(parse_override(o) for o in args.overrides)


def write_study(out_dir: Path, name: str, title: str, rows: list[dict[str, Any]], notes: str,
                overrides: Mapping[str, Any]) -> Path:
    """``<name>.json`` (rows) and ``<name>.md`` (a table and the notes) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"overrides": dict(overrides), "rows": rows}, indent=2, default=str))
    cols = list(rows[0]) if rows else []

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    extra = f"\nOverrides applied to every variant: `{dict(overrides)}`.\n" if overrides else ""
    md = f"# {title}\n\n" + "\n".join(table) + "\n\n" + notes + "\n" + extra
    path = out_dir / f"{name}.md"
    path.write_text(md)
    return path
