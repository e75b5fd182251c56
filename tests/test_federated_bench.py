"""benchmarks/federated.py: one tiny end-to-end run on a random model, and per-seed reuse."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():  # type: ignore[no-untyped-def]
    # Loaded by path: opacus ships a top-level `benchmarks` package that shadows the folder.
    spec = importlib.util.spec_from_file_location("federated_bench", REPO / "benchmarks" / "federated.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_federated_run(tmp_path: Path) -> None:
    from simulations.world.captions import vocabulary
    from zo_core.model_factory import build_tiny_sd
    from zo_core.model_io import fingerprint

    fed = _load()
    model = build_tiny_sd(tmp_path / "sd", words=vocabulary(), seed=0)
    out = tmp_path / "fed"
    argv = ["--model-dir", str(model), "--seeds", "0", "--veterans", "2", "--newcomers", "1",
            "--fleet-rounds", "1", "--fleet-steps", "4", "--probe-steps", "2", "--steps", "4",
            "--eval-every", "2", "--metric", "loss", "--eval-draws", "2", "--basis-rank", "2",
            "--out", str(out)]
    fed.main(argv)
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["summary"]) >= set(fed.ARMS)
    seed = result["per_seed"][0]
    (newcomer,) = seed["newcomers"]
    for arm in fed.ARMS:
        curve = seed["runs"][arm][newcomer]["curve"]
        assert [p for p, _ in curve] == [0, 6, 12]  # n + 1 = 3 forwards per ZO step
    # The solo and fleet arms start from the same token: their first scores agree exactly.
    assert len({seed["runs"][a][newcomer]["curve"][0][1] for a in fed.ARMS}) == 1
    assert result["summary"]["fleet-basis-low_minus_solo_final"]["n"] == 1
    solo = seed["runs"]["solo"][newcomer]["curve"]
    assert result["summary"]["solo"]["along_mean"] == pytest.approx((solo[1][1] + solo[2][1]) / 2)
    assert seed["fleet_dp_epsilon"] > 0
    assert "fleet-basis-low" in out.with_suffix(".md").read_text()
    # A finished seed is saved and reused by the same command; a changed config recomputes it.
    saved = out.with_suffix(".seeds") / "seed-0.json"
    stamp = saved.stat().st_mtime_ns
    fed.main(argv)
    assert saved.stat().st_mtime_ns == stamp
    fed.main([*argv, "--low-basis-weight", "0.1", "--arms", "solo", "fleet-basis-low"])
    assert saved.stat().st_mtime_ns != stamp
    assert json.loads(saved.read_text())["config"]["low_basis_weight"] == 0.1
    # The same command on a changed model recomputes: seeds from two models are never mixed.
    stamp = saved.stat().st_mtime_ns
    config = model / "unet" / "config.json"
    config.write_text(config.read_text() + "\n")
    fed.main([*argv, "--low-basis-weight", "0.1", "--arms", "solo", "fleet-basis-low"])
    assert saved.stat().st_mtime_ns != stamp
    assert json.loads(saved.read_text())["config"]["model_fingerprint"] == fingerprint(model)
