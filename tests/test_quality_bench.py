"""benchmarks/quality.py: config validation and one tiny end-to-end run on a random model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():  # type: ignore[no-untyped-def]
    # Loaded by path: opacus ships a top-level `benchmarks` package that shadows the folder.
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_config_validation() -> None:
    q = _load()
    with pytest.raises(ValueError, match="unknown concept"):
        q.QualityConfig(concepts=("unicorn",))
    with pytest.raises(ValueError, match="unknown methods"):
        q.QualityConfig(methods=("adam",))
    with pytest.raises(ValueError, match="too small"):
        q.QualityConfig(budget=5, eval_points=4)
    with pytest.raises(ValueError, match="threshold"):
        q.QualityConfig(threshold=0.0)


@pytest.mark.slow
def test_tiny_run_writes_consistent_results(tiny_world_model: Path, tmp_path: Path) -> None:
    q = _load()
    out = tmp_path / "quality.json"
    q.main(["--concepts", "ember", "--methods", "zoodip", "backprop_ti", "--budget", "12",
            "--eval-points", "2", "--n-images", "2", "--gen-steps", "2",
            "--model", str(tiny_world_model), "--out", str(out)])
    record = json.loads(out.read_text())
    runs = {r["method"]: r for r in record["runs"]}
    # Equal forward budgets: ZO spends n + 1 = 3 per step, backprop 1.
    assert runs["zoodip"]["forwards"] == [6, 12]
    assert runs["backprop_ti"]["forwards"] == [6, 12]
    assert set(record["summary"]) == {"zoodip", "backprop_ti"}
    assert "1 concepts x 1 seeds x 2 methods" in record["scale"]
    assert out.with_suffix(".md").read_text().count("\n| ") == 3
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.fixture(scope="module")
def tiny_world_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random SD-shaped model whose tokenizer knows the world's words (initializers)."""
    from simulations.world.captions import vocabulary
    from zo_core.model_factory import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("world-sd"), words=vocabulary(), seed=0)
