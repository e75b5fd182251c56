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
    with pytest.raises(ValueError, match="first_eval"):
        q.QualityConfig(budget=5, first_eval=6)
    assert q.eval_schedule(300, 2400) == [300, 600, 1200, 2400]
    assert q.eval_schedule(300, 1000) == [300, 600, 1000]
    cfg = q.QualityConfig(budget=2400, backprop_budget=600, first_eval=300)
    assert cfg.schedule("zoodip") == [300, 600, 1200, 2400]
    assert cfg.schedule("backprop_ti_puts") == [300, 600]
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
            "--backprop-budget", "6", "--first-eval", "6", "--n-images", "2", "--gen-steps", "2", "--precisions", "fp32",
            "int8", "--quant-methods", "zoodip", "--model", str(model),
            "--out", str(out)]
    q.main(argv)
    record = json.loads(out.read_text())
    runs = {(r["method"], r["precision"]): r for r in record["runs"]}
    assert set(runs) == {("zoodip", "fp32"), ("backprop_ti", "fp32"), ("zoodip", "int8")}
    # Scored at the same forward counts up to each budget: ZO spends n + 1 = 3 per step, backprop 1.
    assert runs[("zoodip", "fp32")]["forwards"] == [6, 12]
    assert runs[("backprop_ti", "fp32")]["forwards"] == [6]
    assert runs[("zoodip", "int8")]["forwards"] == [6, 12]
    against = record["paired_learnable"]["against"] if record["paired_learnable"] else {}
    assert set(against) <= {"backprop_ti"}
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


def test_paired_comparisons_on_synthetic_runs() -> None:
    q = _load()

    def run(method: str, seed: int, forwards: list[int], match: list[float], wall: list[float]):
        return q.RunResult("lagoon", seed, method, forwards=forwards, concept_match=match,
                           feature_cosine=[0.0] * len(match), wall_at=wall,
                           train_wall_s=wall[-1], initial_concept_match=0.1)

    runs = [
        run("zoodip", 0, [300, 600, 1200], [0.2, 0.4, 0.6], [1.0, 2.0, 4.0]),
        run("zoodip", 1, [300, 600, 1200], [0.1, 0.3, 0.5], [1.0, 2.0, 4.0]),
        run("backprop_ti_puts", 0, [300, 600], [0.5, 0.5], [3.0, 6.0]),
        run("backprop_ti_puts", 1, [300, 600], [0.2, 0.7], [3.0, 6.0]),
    ]
    out = q.paired_comparisons(runs)["against"]["backprop_ti_puts"]
    assert out["final_match_diff"]["mean"] == pytest.approx(((0.6 - 0.5) + (0.5 - 0.7)) / 2)
    assert out["final_match_diff"]["n"] == 2
    # equal forwards: ZOODiP's match at the reference's 600 forwards
    assert out["at_reference_budget_diff"]["mean"] == pytest.approx(((0.4 - 0.5) + (0.3 - 0.7)) / 2)
    # equal wall: the reference's match by ZOODiP's final 4.0 s is its 3.0 s point
    assert out["at_equal_wall_diff"]["mean"] == pytest.approx(((0.6 - 0.5) + (0.5 - 0.2)) / 2)
    # seed 0 reaches 0.5 at 1200 forwards, seed 1 never reaches 0.7
    assert out["reaches_reference_final"] == {"fraction": 0.5, "median_forwards": 1200.0,
                                              "reference_forwards": 600.0}
