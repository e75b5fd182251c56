"""benchmarks/quality.py: config validation and one tiny end-to-end run on a random model."""

from __future__ import annotations

import importlib.util
import json
import shutil
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
    with pytest.raises(ValueError, match="unknown precisions"):
        q.QualityConfig(precisions=("int3",))
    with pytest.raises(ValueError, match="tau must be >= 2"):
        q.QualityConfig(tau=1)
    with pytest.raises(SystemExit):  # argparse error: the siblings are named after a .json
        q.main(["--out", "results/quality"])
    assert q._zo_config(q.QualityConfig(tau=16), "zoodip").tau == 16
    cfg = q.QualityConfig(concepts=("lagoon",), seeds=(0, 1), precisions=("fp32", "int8"),
                          methods=("zoodip", "plain_zo"), quant_methods=("zoodip",))
    assert cfg.cells() == [("lagoon", 0, "fp32"), ("lagoon", 0, "int8"),
                           ("lagoon", 1, "fp32"), ("lagoon", 1, "int8")]
    assert cfg.methods_at("int8") == ["zoodip"] and cfg.methods_at("fp32") == ["zoodip", "plain_zo"]


@pytest.mark.slow
def test_tiny_run_writes_consistent_results(tiny_world_model: Path, tmp_path: Path) -> None:
    from zo_core.model_io import fingerprint

    q = _load()
    out = tmp_path / "quality.json"
    model = shutil.copytree(tiny_world_model, tmp_path / "model")  # retrained at the end
    argv = ["--concepts", "ember", "--methods", "zoodip", "backprop_ti", "--budget", "12",
            "--eval-points", "2", "--n-images", "2", "--gen-steps", "2", "--precisions", "fp32",
            "int8", "--quant-methods", "zoodip", "--model", str(model),
            "--out", str(out)]
    q.main(argv)
    record = json.loads(out.read_text())
    runs = {(r["method"], r["precision"]): r for r in record["runs"]}
    assert set(runs) == {("zoodip", "fp32"), ("backprop_ti", "fp32"), ("zoodip", "int8")}
    # Equal forward budgets: ZO spends n + 1 = 3 per step, backprop 1.
    assert runs[("zoodip", "fp32")]["forwards"] == [6, 12]
    assert runs[("backprop_ti", "fp32")]["forwards"] == [6, 12]
    assert runs[("zoodip", "int8")]["forwards"] == [6, 12]
    assert list(record["summary"]) == ["zoodip", "backprop_ti", "zoodip@int8"]
    assert "1 concepts, 2 (concept, seed, precision) cells (fp32 1, int8 1)" in record["scale"]
    assert 0.0 <= record["vae_ceiling"]["ember"] <= 1.0
    table = out.with_suffix(".md").read_text()
    assert "| zoodip@int8 |" in table and "| ember |" in table
    assert out.with_suffix(".png").stat().st_size > 0
    # Finished cells are saved one by one and reused: a rerun computes nothing and agrees.
    cells = sorted(p.name for p in out.with_suffix(".cells").iterdir())
    assert cells == ["ember-seed0-fp32.json", "ember-seed0-int8.json"]
    stamp = [p.stat().st_mtime_ns for p in out.with_suffix(".cells").iterdir()]
    q.main(argv)
    assert [p.stat().st_mtime_ns for p in out.with_suffix(".cells").iterdir()] == stamp
    assert json.loads(out.read_text())["runs"] == record["runs"]
    # A run over a sub-grid reuses the common cell; a changed setting recomputes it.
    q.main([*argv, "--precisions", "fp32"])  # the last --precisions wins
    assert [p.stat().st_mtime_ns for p in out.with_suffix(".cells").iterdir()] == stamp
    # --report-only runs nothing: it reports the saved cells of a larger grid, and lists the rest.
    q.main([*argv, "--seeds", "0", "1", "--report-only"])
    assert [p.stat().st_mtime_ns for p in out.with_suffix(".cells").iterdir()] == stamp
    partial = json.loads(out.read_text())
    assert partial["runs"] == record["runs"]
    assert partial["cells_missing"] == [["ember", 1, "fp32"], ["ember", 1, "int8"]]
    q.main([*argv, "--gen-steps", "3"])
    assert [p.stat().st_mtime_ns for p in out.with_suffix(".cells").iterdir()] != stamp
    with pytest.raises(FileNotFoundError, match="no saved cell"):
        q.main([*argv, "--gen-steps", "4", "--report-only"])
    # The same settings on a changed model (a retrained embedded default keeps its folder name)
    # match no saved cell: results from two models are never mixed.
    q.main([*argv, "--gen-steps", "3", "--report-only"])
    assert json.loads(out.read_text())["model_fingerprint"] == fingerprint(model)
    config = model / "unet" / "config.json"
    config.write_text(config.read_text() + "\n")
    with pytest.raises(FileNotFoundError, match="no saved cell"):
        q.main([*argv, "--gen-steps", "3", "--report-only"])


@pytest.fixture(scope="module")
def tiny_world_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random SD-shaped model whose tokenizer knows the world's words (initializers)."""
    from simulations.world.captions import vocabulary
    from zo_core.model_factory import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("world-sd"), words=vocabulary(), seed=0)
