"""Quality benchmark (issue 3): ZOODiP and its ablations vs backprop textual inversion.

On the embedded tinyworld model, for every (concept, seed, method), a token is learned from the
concept's private photos at an equal budget of UNet forward evaluations, and scored by the oracle
(`simulations.world.oracle`) at regular points of the budget:

* concept fidelity: fraction of images of "a photo of <token>" carrying all identity attributes
  (the CLIP-I / DINO analogue), and mean oracle-feature cosine to the private photos;
* prompt fidelity: fraction of images honouring the asked context ("... on a gray background")
  with the token in the prompt (the CLIP-T analogue), measured at the end of the budget;
* steps to threshold: the first budget point at which concept fidelity reaches `--threshold`;
* wall time of training and the peak resident-memory rise of the training phase.

Methods (method.md sections 4-5): ZOODiP = RGE + ZOAdam + SG + PUTS; without SG; without PUTS
(uniform t); plain ZO (neither); backprop TI (uniform t) and backprop TI + PUTS. A ZO step costs
n + 1 forwards, a backprop step one forward (plus its backward: compare wall time too).

Run from the repository root as a script (opacus installs a top-level ``benchmarks`` package
that shadows this folder for ``python -m``); the scale used is written into the results:
``python benchmarks/quality.py --concepts mosaic ember --seeds 0 --budget 1200``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(REPO))

from simulations.world.concepts import get_concept, list_concepts  # noqa: E402
from simulations.world.oracle import Oracle, context_prompts  # noqa: E402

METHODS: dict[str, dict[str, Any]] = {
    "zoodip": {"optimizer": "zo", "use_sg": True, "puts": (500, 900)},
    "zo_no_sg": {"optimizer": "zo", "use_sg": False, "puts": (500, 900)},
    "zo_no_puts": {"optimizer": "zo", "use_sg": True, "puts": None},
    "plain_zo": {"optimizer": "zo", "use_sg": False, "puts": None},
    "backprop_ti": {"optimizer": "backprop", "use_sg": False, "puts": None},
    "backprop_ti_puts": {"optimizer": "backprop", "use_sg": False, "puts": (500, 900)},
}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Concepts whose VAE ceiling is below this cannot show a full concept match, whatever the method.
LEARNABLE_CEILING = 0.5


PRECISIONS: dict[str, str] = {"fp32": "none", "int8": "quanto-int8", "int4": "quanto-int4"}


def eval_schedule(first: int, budget: int) -> list[int]:
    """Forward counts at which a run is scored: first, 2 first, 4 first, ... and the budget.

    Doubling spacing shows the fast start of backprop TI and the long tail of ZO on one log axis,
    and every method is scored at the same forward counts up to its own budget, so runs are
    compared at equal forwards without interpolation.
    """
    points, f = [], first
    while f < budget:
        points.append(f)
        f *= 2
    return [*points, budget]


@dataclass(frozen=True)
class QualityConfig:
    """Scale and settings of one benchmark run (saved with the results)."""

    concepts: tuple[str, ...] = ("lagoon", "ember")
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = tuple(METHODS)
    precisions: tuple[str, ...] = ("fp32",)  # keys of PRECISIONS; int8 / int4 via quanto
    quant_methods: tuple[str, ...] = ("zoodip", "backprop_ti")  # the methods run quantized too
    # UNet forward evaluations per run: ZO methods (n + 1 per step) and backprop methods (one
    # forward and its backward per step). The paper trains ZO for many times TI's steps (30,000
    # vs 5,000), so the two budgets are set apart and ZO's is long enough to show its plateau.
    budget: int = 1200
    backprop_budget: int = 1200
    first_eval: int = 300  # forwards of the first scored point; then doubling (eval_schedule)
    zo_lr: float = 5e-3
    backprop_lr: float = 5e-3
    tau: int | None = 128  # the paper's, explicit (the recorded grid); None: the engine's D-aware default
    n_images: int = 16  # images per fidelity evaluation
    gen_steps: int = 20
    guidance: float = 7.5  # the generate command's default (the SD default)
    threshold: float = 0.5
    model_dir: str | None = None  # None: the embedded default

    def __post_init__(self) -> None:
        for c in self.concepts:
            get_concept(c)  # raises with the known names
        for group in (self.methods, self.quant_methods):
            unknown = [m for m in group if m not in METHODS]
            if unknown:
                raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise ValueError(f"unknown precisions {bad}; known: {list(PRECISIONS)}")
        if not self.concepts or not self.seeds or not self.methods or not self.precisions:
            raise ValueError("concepts, seeds, methods and precisions must be non-empty")
        if not 3 <= self.first_eval <= min(self.budget, self.backprop_budget):
            raise ValueError(f"first_eval must lie in [3, min(budget, backprop_budget)], got "
                             f"{self.first_eval} for budgets {self.budget}, {self.backprop_budget}")
        if self.n_images < 1 or self.gen_steps < 1:
            raise ValueError("n_images and gen_steps must be >= 1")
        if self.tau is not None and self.tau < 2:
            raise ValueError(f"tau must be >= 2, got {self.tau}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")

    def cells(self) -> list[tuple[str, int, str]]:
        """(concept, seed, precision): the unit of work one process runs and saves."""
        return [(c, s, p) for c in self.concepts for s in self.seeds for p in self.precisions]

    def methods_at(self, precision: str) -> list[str]:
        """fp32 runs every method; quantized precisions the `quant_methods` among them."""
        if precision == "fp32":
            return list(self.methods)
        return [m for m in self.methods if m in self.quant_methods]

    def schedule(self, method: str) -> list[int]:
        """The forward counts at which `method` is scored (its budget is the last)."""
        zo = METHODS[method]["optimizer"] == "zo"
        return eval_schedule(self.first_eval, self.budget if zo else self.backprop_budget)


@dataclass
class RunResult:
    """One (concept, seed, method, precision) run."""

    concept: str
    seed: int
    method: str
    precision: str = "fp32"
    forwards: list[int] = field(default_factory=list)
    concept_match: list[float] = field(default_factory=list)
    feature_cosine: list[float] = field(default_factory=list)
    wall_at: list[float] = field(default_factory=list)  # cumulative training wall s per point
    prompt_match: float = 0.0
    prompt_concept_match: float = 0.0
    forwards_to_threshold: int | None = None
    wall_to_threshold_s: float | None = None
    train_wall_s: float = 0.0
    train_peak_rise_mib: float = 0.0
    initial_concept_match: float = 0.0

    @property
    def label(self) -> str:
        return self.method if self.precision == "fp32" else f"{self.method}@{self.precision}"


def _zo_config(cfg: QualityConfig, method: str, precision: str = "fp32"):  # type: ignore[no-untyped-def]
    from zo_core.config import ZOConfig, default_mu

    spec = METHODS[method]
    lr = cfg.zo_lr if spec["optimizer"] == "zo" else cfg.backprop_lr
    return ZOConfig(use_sg=spec["use_sg"], puts=spec["puts"], lr=lr, tau=cfg.tau,
                    mu=default_mu(PRECISIONS[precision]))


def _fidelity(engine: Any, state: Any, oracle: Oracle, concept: Any, cfg: QualityConfig,
              seed: int) -> dict[str, float]:
    images = engine.generate(state, [f"a photo of {state.placeholder}"], num_images=cfg.n_images,
                             steps=cfg.gen_steps, guidance=cfg.guidance, seed=10_000 + seed)
    return oracle.concept_fidelity(images, concept)


def _prompt_fidelity(engine: Any, state: Any, oracle: Oracle, concept: Any, cfg: QualityConfig,
                     seed: int) -> tuple[float, float]:
    specs = context_prompts(concept)
    per = max(1, cfg.n_images // 4)
    match, keep = [], []
    for spec in specs:
        images = engine.generate(state, [spec.prompt(state.placeholder)], num_images=per,
                                 steps=cfg.gen_steps, guidance=cfg.guidance, seed=20_000 + seed)
        r = oracle.prompt_fidelity(images, spec, concept)
        match.append(r["match"])
        keep.append(r["concept_match"])
    return float(np.mean(match)), float(np.mean(keep))


def run_cell(cfg: QualityConfig, concept_name: str, seed: int, precision: str,
             *, log: bool = True) -> list[RunResult]:
    """Every method of one (concept, seed, precision) cell from the same initial token."""
    from zo_core.config import QuantConfig, TIConfig
    from zo_core.engine import Personalizer
    from zo_core.memory import MemoryMeter

    engine = Personalizer.from_pretrained(cfg.model_dir,
                                          quant=QuantConfig(backend=PRECISIONS[precision]))
    oracle = Oracle.load()
    meter = MemoryMeter("cpu")
    concept = get_concept(concept_name)
    ti = TIConfig(placeholder=concept.placeholder, initializer=concept.initializer)
    data = engine.prepare_data_from_images(concept.private_photos(seed), ti)
    initial = _fidelity(engine, engine.init_state(ti, seed=seed), oracle, concept, cfg, seed)
    runs = []
    for method in cfg.methods_at(precision):
        zo = _zo_config(cfg, method, precision)
        optimizer = METHODS[method]["optimizer"]
        per_step = zo.forwards_per_step if optimizer == "zo" else 1
        state = engine.init_state(ti, seed=seed)
        res = RunResult(concept_name, seed, method, precision,
                        initial_concept_match=initial["match"])
        spent = 0
        for k, point in enumerate(cfg.schedule(method)):
            phase = f"{method}/{k}"
            with meter.phase(phase):
                out = engine.train(data, state, zo, point // per_step - state.step,
                                   optimizer=optimizer)
            res.train_peak_rise_mib = max(res.train_peak_rise_mib, meter.phases[phase].rise_mib)
            state = out.state
            spent += out.forward_passes
            res.train_wall_s += out.wall_s
            fid = _fidelity(engine, state, oracle, concept, cfg, seed)
            res.forwards.append(spent)
            res.wall_at.append(res.train_wall_s)
            res.concept_match.append(fid["match"])
            res.feature_cosine.append(fid["feature_cosine"])
            if res.forwards_to_threshold is None and fid["match"] >= cfg.threshold:
                res.forwards_to_threshold, res.wall_to_threshold_s = spent, res.train_wall_s
        res.prompt_match, res.prompt_concept_match = _prompt_fidelity(
            engine, state, oracle, concept, cfg, seed)
        runs.append(res)
        if log:
            print(f"{concept_name} seed {seed} {res.label}: concept {res.concept_match} "
                  f"prompt {res.prompt_match:.2f} wall {res.train_wall_s:.1f}s", flush=True)
    return runs


@torch.no_grad()
def vae_ceiling(cfg: QualityConfig, concept_name: str, n: int = 48) -> float:
    """Oracle concept match on VAE reconstructions of fresh renders of the concept.

    No token can make the model draw what its decoder cannot: this is the highest concept match
    any method can reach, and it separates concepts that rank methods from those that cannot.
    """
    from diffusers import AutoencoderKL
    from PIL import Image

    from simulations.world.evaluate_model import vae_roundtrip
    from simulations.world.render import sample_scene
    from zo_core.model_io import inspect_model_dir

    concept = get_concept(concept_name)
    vae = AutoencoderKL.from_pretrained(inspect_model_dir(cfg.model_dir).root / "vae",
                                        local_files_only=True, torch_dtype=torch.float32)
    rng = np.random.default_rng([0, 9])
    scenes = [sample_scene(rng, fixed=concept.attributes) for _ in range(n)]
    images = [Image.fromarray(a) for a in vae_roundtrip(vae, scenes, rng)]
    return Oracle.load().concept_fidelity(images, concept)["match"]


def _cell_path(cells_dir: Path, cell: tuple[str, int, str]) -> Path:
    concept, seed, precision = cell
    return cells_dir / f"{concept}-seed{seed}-{precision}.json"


def _cell_settings(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """What a saved cell must match to be reused: every setting except the grid's own axes, so
    that runs over different concept / seed / precision lists share their common cells, plus the
    model's fingerprint: `model_dir` None names whichever embedded model is shipped, and a cell
    learned on a retrained model must not be mixed with one from its predecessor."""
    from zo_core.model_io import model_fingerprint

    axes = ("concepts", "seeds", "precisions")
    settings = {k: v for k, v in json.loads(json.dumps(cfg_dict)).items() if k not in axes}
    settings["model_fingerprint"] = model_fingerprint(cfg_dict["model_dir"])
    return settings


def _cell_worker(args: tuple[dict[str, Any], tuple[str, int, str], str, int]) -> str:
    """Process entry: run one cell, write its runs atomically (a crash loses only this cell)."""
    cfg_dict, cell, cells_dir, threads = args
    torch.set_num_threads(threads)
    cfg = QualityConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    runs = run_cell(cfg, *cell)
    path = _cell_path(Path(cells_dir), cell)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": _cell_settings(cfg_dict), "runs": [asdict(r) for r in runs]},
                              indent=1))
    tmp.replace(path)
    return path.name


def _cell_done(cells_dir: Path, cell: tuple[str, int, str], settings: dict[str, Any]) -> bool:
    path = _cell_path(cells_dir, cell)
    return path.exists() and json.loads(path.read_text())["config"] == settings


def run(cfg: QualityConfig, *, cells_dir: Path, jobs: int = 1, threads: int = 1,
        report_only: bool = False) -> dict[str, Any]:
    """Run every missing cell (`jobs` processes in parallel), then gather all cells' runs.

    With `report_only`, run nothing: summarize the grid's cells that are saved (an uneven grid,
    e.g. more seeds for some concepts, is several runs followed by one report).
    """
    import multiprocessing as mp

    cells_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = asdict(cfg)
    settings = _cell_settings(cfg_dict)  # hashes the model once, not once per cell
    todo = []
    for cell in cfg.cells():
        if _cell_done(cells_dir, cell, settings):
            print(f"cell {_cell_path(cells_dir, cell).name}: done before, reusing", flush=True)
        elif not report_only:
            todo.append((cfg_dict, cell, str(cells_dir), threads))
    print(f"{len(todo)} of {len(cfg.cells())} cells to run, {jobs} at a time", flush=True)
    if jobs == 1:
        for item in todo:
            _cell_worker(item)
    else:
        with mp.get_context("spawn").Pool(jobs) as pool:
            for i, name in enumerate(pool.imap_unordered(_cell_worker, todo), 1):
                print(f"[{i}/{len(todo)}] cell {name} written", flush=True)
    cells = [c for c in cfg.cells() if _cell_done(cells_dir, c, settings)]
    if not cells:
        raise FileNotFoundError(f"no saved cell in {cells_dir} matches these settings")
    runs = [RunResult(**r) for cell in cells
            for r in json.loads(_cell_path(cells_dir, cell).read_text())["runs"]]
    concepts = sorted({c for c, _, _ in cells}, key=cfg.concepts.index)
    ceilings = {c: vae_ceiling(cfg, c) for c in concepts}
    per_precision = ", ".join(f"{p} {sum(1 for c in cells if c[2] == p)}" for p in cfg.precisions)
    return {
        "config": cfg_dict,
        "model_fingerprint": settings["model_fingerprint"],
        "scale": (f"{len(concepts)} concepts, {len(cells)} (concept, seed, precision) cells "
                  f"({per_precision}), {len(cfg.methods)} methods at fp32, "
                  f"{cfg.budget} UNet forwards per ZO run and {cfg.backprop_budget} per backprop "
                  f"run, {cfg.n_images} images per fidelity point"),
        "cells": [list(c) for c in cells],
        "cells_missing": [list(c) for c in cfg.cells() if c not in cells],
        "machine": {"cpu_threads_per_job": threads, "jobs": jobs, "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "vae_ceiling": ceilings,
        "runs": [asdict(r) for r in runs],
        "summary": summarize(runs, cfg),
        "summary_learnable": summarize(
            [r for r in runs if ceilings[r.concept] >= LEARNABLE_CEILING], cfg),
        "paired_learnable": paired_comparisons(
            [r for r in runs if ceilings[r.concept] >= LEARNABLE_CEILING]),
    }


def _labels(cfg: QualityConfig) -> list[str]:
    return [m if p == "fp32" else f"{m}@{p}" for p in cfg.precisions for m in cfg.methods_at(p)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def summarize(runs: list[RunResult], cfg: QualityConfig) -> dict[str, dict[str, float | None]]:
    """Mean over concepts and seeds (and the spread over them), per method and precision."""
    out: dict[str, dict[str, float | None]] = {}
    for label in _labels(cfg):
        rs = [r for r in runs if r.label == label]
        if not rs:
            continue
        reached = [r for r in rs if r.forwards_to_threshold is not None]
        final, final_sd = _mean_std([r.concept_match[-1] for r in rs])
        out[label] = {
            "runs": float(len(rs)),
            "initial_concept_match": float(np.mean([r.initial_concept_match for r in rs])),
            "final_concept_match": final,
            "final_concept_match_std": final_sd,
            "final_feature_cosine": float(np.mean([r.feature_cosine[-1] for r in rs])),
            "prompt_match": float(np.mean([r.prompt_match for r in rs])),
            "prompt_concept_match": float(np.mean([r.prompt_concept_match for r in rs])),
            "runs_reaching_threshold": float(len(reached)) / len(rs),
            "mean_forwards_to_threshold": (float(np.mean([r.forwards_to_threshold for r in reached]))
                                           if reached else None),
            "mean_wall_to_threshold_s": (float(np.mean([r.wall_to_threshold_s for r in reached]))
                                         if reached else None),
            "train_wall_s": float(np.mean([r.train_wall_s for r in rs])),
            "train_peak_rise_mib": float(np.max([r.train_peak_rise_mib for r in rs])),
        }
    return out


def _mean_se(values: list[float]) -> dict[str, float]:
    """Mean, standard error and count of paired differences."""
    n = len(values)
    se = float(np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(np.mean(values)) if n else float("nan"), "se": se, "n": float(n)}


def _match_at(run: RunResult, *, forwards: int | None = None, wall: float | None = None) -> float:
    """A run's concept match at the last scored point within `forwards` or `wall` seconds
    (its initial match before the first point): what it had reached by then."""
    xs = run.forwards if forwards is not None else run.wall_at
    limit = forwards if forwards is not None else wall
    reached = [m for x, m in zip(xs, run.concept_match, strict=True) if x <= limit]  # type: ignore[operator]
    return reached[-1] if reached else run.initial_concept_match


def paired_comparisons(runs: list[RunResult], subject: str = "zoodip",
                       references: tuple[str, ...] = ("backprop_ti", "backprop_ti_puts")
                       ) -> dict[str, Any]:
    """`subject` against each reference and each other method, paired on (concept, seed, precision).

    For every pair of runs on the same cell: the difference of final concept matches (each at its
    own budget); for the references also at equal forwards (the reference's match at the
    subject's final forward count, and the subject's at the reference's budget) and at equal
    training wall time (the reference's match at the subject's final wall time); and whether and
    after how many forwards the subject first reaches the reference's final match.
    """
    by_key = {(r.concept, r.seed, r.precision, r.method): r for r in runs}
    cells = sorted({(r.concept, r.seed, r.precision) for r in runs})
    out: dict[str, Any] = {}
    for other in sorted({r.method for r in runs} - {subject}):
        pairs = [(by_key[(*c, subject)], by_key[(*c, other)]) for c in cells
                 if (*c, subject) in by_key and (*c, other) in by_key]
        if not pairs:
            continue
        entry: dict[str, Any] = {
            "final_match_diff": _mean_se([s.concept_match[-1] - o.concept_match[-1]
                                          for s, o in pairs])}
        if other in references:
            entry["at_reference_budget_diff"] = _mean_se(
                [_match_at(s, forwards=o.forwards[-1]) - o.concept_match[-1] for s, o in pairs])
            entry["at_equal_wall_diff"] = _mean_se(
                [s.concept_match[-1] - _match_at(o, wall=s.wall_at[-1]) for s, o in pairs])
            reach = [next((f for f, m in zip(s.forwards, s.concept_match, strict=True)
                           if m >= o.concept_match[-1]), None) for s, o in pairs]
            hit = [f for f in reach if f is not None]
            entry["reaches_reference_final"] = {
                "fraction": len(hit) / len(pairs),
                "median_forwards": float(np.median(hit)) if hit else None,
                "reference_forwards": float(np.median([o.forwards[-1] for _, o in pairs]))}
            entry["wall_per_forward_s"] = {
                subject: float(np.mean([s.train_wall_s / s.forwards[-1] for s, _ in pairs])),
                other: float(np.mean([o.train_wall_s / o.forwards[-1] for _, o in pairs]))}
        out[other] = entry
    return {"subject": subject, "against": out}


def _paired_table(paired: dict[str, Any]) -> list[str]:
    subject = paired["subject"]
    lines = [f"| {subject} minus | pairs | final match (each at its budget) | at the reference's "
             "budget (equal forwards) | at equal wall time | reaches the reference's final match "
             "(fraction, median forwards) |", "|---|---|---|---|---|---|"]

    def f(x: dict[str, float] | None) -> str:
        return "-" if x is None else f"{x['mean']:+.3f} +- {x['se']:.3f}"

    for other, e in paired["against"].items():
        reach = e.get("reaches_reference_final")
        reach_s = "-" if reach is None else (
            f"{reach['fraction']:.2f}, " + ("-" if reach["median_forwards"] is None
                                            else f"{reach['median_forwards']:.0f}"))
        lines.append(f"| {other} | {e['final_match_diff']['n']:.0f} | {f(e['final_match_diff'])} "
                     f"| {f(e.get('at_reference_budget_diff'))} | {f(e.get('at_equal_wall_diff'))} "
                     f"| {reach_s} |")
    return lines


def _table(summary: dict[str, Any]) -> list[str]:
    lines = ["| method | runs | concept match start -> end (std) | feature cos | prompt match | "
             "concept kept in context | runs >= threshold | forwards / wall s to threshold | "
             "train wall s | peak rise MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        ftt = ("-" if s["mean_forwards_to_threshold"] is None else
               f"{s['mean_forwards_to_threshold']:.0f} / {s['mean_wall_to_threshold_s']:.1f}")
        lines.append(
            f"| {m} | {s['runs']:.0f} | {s['initial_concept_match']:.2f} -> "
            f"{s['final_concept_match']:.2f} ({s['final_concept_match_std']:.2f}) | "
            f"{s['final_feature_cosine']:.3f} | {s['prompt_match']:.2f} | "
            f"{s['prompt_concept_match']:.2f} | {s['runs_reaching_threshold']:.2f} | {ftt} | "
            f"{s['train_wall_s']:.1f} | {s['train_peak_rise_mib']:.0f} |")
    return lines


def markdown(record: dict[str, Any]) -> str:
    """Summary tables (all concepts; concepts the VAE can draw) and the per-concept finals."""
    cfg = record["config"]
    lines = [f"Scale: {record['scale']}.", "",
             "How the recorded run was produced and how to read it: `quality-notes.md` (kept by "
             "hand; this file is regenerated).", "",
             f"Machine: {record['machine']}; total wall {record.get('total_wall_s', '?')} s.", "",
             "VAE ceiling (concept match on VAE reconstructions of renders): "
             + ", ".join(f"{c} {v:.2f}" for c, v in record["vae_ceiling"].items()), "",
             "### All concepts", "", *_table(record["summary"]), ""]
    if record["summary_learnable"]:
        lines += [f"### Concepts with VAE ceiling >= {LEARNABLE_CEILING}", "",
                  *_table(record["summary_learnable"]), ""]
        for ref_name in ("backprop_ti", "backprop_ti_puts"):
            ref = record["summary_learnable"].get(ref_name)
            if ref and ref["final_concept_match"] > 0:
                lines.append(f"Final concept match relative to {ref_name} (these concepts, fp32): "
                             + ", ".join(f"{m} {s['final_concept_match'] / ref['final_concept_match']:.0%}"
                                         for m, s in record["summary_learnable"].items()
                                         if "@" not in m) + ".")
                lines.append("")
    if record.get("paired_learnable", {}).get("against"):
        lines += [f"### Paired differences on the concepts with VAE ceiling >= {LEARNABLE_CEILING} "
                  "(mean +- standard error over cells)", "",
                  *_paired_table(record["paired_learnable"]), ""]
    lines += _precision_table(record)
    labels = list(record["summary"])
    lines += ["### Final concept match per concept (mean over seeds)", "",
              "| concept | ceiling | " + " | ".join(labels) + " |",
              "|---|---|" + "---|" * len(labels)]
    for c in record["vae_ceiling"]:
        row = []
        for label in labels:
            vals = [r["concept_match"][-1] for r in record["runs"]
                    if r["concept"] == c and _run_label(r) == label]
            row.append(f"{np.mean(vals):.2f}" if vals else "-")
        lines.append(f"| {c} | {record['vae_ceiling'][c]:.2f} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _precision_table(record: dict[str, Any]) -> list[str]:
    """Quantized runs beside the fp32 runs of the same method on the same (concept, seed) cells,
    with the paired difference of final concept match (mean +- standard error)."""
    rows = []
    for label in record["summary"]:
        if "@" not in label:
            continue
        method = label.split("@")[0]
        quant = {(r["concept"], r["seed"]): r for r in record["runs"] if _run_label(r) == label}
        fp32 = {(r["concept"], r["seed"]): r for r in record["runs"]
                if _run_label(r) == method and (r["concept"], r["seed"]) in quant}
        if not fp32:
            continue
        keys = sorted(fp32)

        def cell(rs: list[dict[str, Any]]) -> str:
            return (f"{np.mean([r['concept_match'][-1] for r in rs]):.2f} / "
                    f"{np.mean([r['feature_cosine'][-1] for r in rs]):.3f} / "
                    f"{np.mean([r['train_wall_s'] for r in rs]):.1f}")
        diff = _mean_se([quant[k]["concept_match"][-1] - fp32[k]["concept_match"][-1] for k in keys])
        rows.append(f"| {label} | {len(keys)} | {cell([fp32[k] for k in keys])} | "
                    f"{cell([quant[k] for k in keys])} | {diff['mean']:+.3f} +- {diff['se']:.3f} |")
    if not rows:
        return []
    return ["### Quantized vs fp32 on the same cells", "",
            "| method@precision | pairs | fp32: match / feature cos / train s | quantized: match / "
            "feature cos / train s | quantized minus fp32 (match) |", "|---|---|---|---|---|",
            *rows, ""]


def _run_label(r: dict[str, Any]) -> str:
    return r["method"] if r.get("precision", "fp32") == "fp32" else f"{r['method']}@{r['precision']}"


def plot(record: dict[str, Any], png: Path) -> None:
    """Concept match and feature cosine vs forward passes, mean over concepts and seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    learnable = {c for c, v in record["vae_ceiling"].items() if v >= LEARNABLE_CEILING}
    which = f"the concepts with VAE ceiling >= {LEARNABLE_CEILING}"
    if not learnable:  # e.g. a random test model: show every concept rather than nothing
        learnable, which = set(record["vae_ceiling"]), "all concepts (none reaches the ceiling bar)"
    for label in record["summary"]:
        rs = [r for r in record["runs"] if _run_label(r) == label and r["concept"] in learnable]
        if not rs or "@" in label:  # quantized runs cover fewer cells: compared in the table
            continue
        x = rs[0]["forwards"]  # one schedule per method (eval_schedule)
        axes[0].plot(x, np.mean([r["concept_match"] for r in rs], axis=0), marker="o", label=label)
        axes[1].plot(x, np.mean([r["feature_cosine"] for r in rs], axis=0), marker="o",
                     label=label)
    start = [r["initial_concept_match"] for r in record["runs"] if r["concept"] in learnable]
    axes[0].axhline(float(np.mean(start)), color="black", ls="--", lw=1, label="initializer word")
    axes[0].axhline(record["config"]["threshold"], color="gray", ls=":", lw=1)
    axes[0].set_ylabel("oracle concept match (CLIP-I analogue)")
    axes[1].set_ylabel("oracle feature cosine to the photos (DINO analogue)")
    for ax in axes:
        ax.set_xlabel("UNet forward evaluations (log scale)")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"fp32, mean over {which} ({', '.join(sorted(learnable))}) and their seeds\n"
                 f"{record['scale']}", fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    d = QualityConfig()
    p = argparse.ArgumentParser(
        prog="python benchmarks/quality.py", description=__doc__.split("\n")[0],
        epilog="Each (concept, seed, precision) cell is saved under <out>.cells/ as it finishes; "
               "rerunning the same command reuses finished cells.")
    p.add_argument("--concepts", nargs="+", default=list(d.concepts), choices=list_concepts())
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds))
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=list(METHODS))
    p.add_argument("--precisions", nargs="+", default=list(d.precisions), choices=list(PRECISIONS),
                   help="fp32 runs every method; int8/int4 (quanto) only --quant-methods")
    p.add_argument("--quant-methods", nargs="+", default=list(d.quant_methods),
                   choices=list(METHODS))
    p.add_argument("--budget", type=int, default=d.budget, help="UNet forwards per ZO run")
    p.add_argument("--backprop-budget", type=int, default=d.backprop_budget,
                   help="UNet forwards (= steps) per backprop TI run")
    p.add_argument("--first-eval", type=int, default=d.first_eval,
                   help="forwards at the first scored point; then every doubling and the budget")
    p.add_argument("--n-images", type=int, default=d.n_images)
    p.add_argument("--gen-steps", type=int, default=d.gen_steps)
    p.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale")
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--zo-lr", type=float, default=d.zo_lr)
    p.add_argument("--backprop-lr", type=float, default=d.backprop_lr)
    p.add_argument("--tau", type=int, default=d.tau,
                   help="SG buffer length and refresh period (the paper's 128); at token sizes "
                        "below it the buffer spans all of token space")
    p.add_argument("--model", default=None, help="diffusers folder (default: embedded tinyworld)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "quality.json")
    p.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing; report the grid's saved cells (for grids run in parts)")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    if args.out.suffix != ".json":  # the .md, .png and .cells/ siblings are named after it
        p.error(f"--out must be a .json path, got {args.out}")
    torch.set_num_threads(args.threads)
    cfg = QualityConfig(concepts=tuple(args.concepts), seeds=tuple(args.seeds),
                        methods=tuple(args.methods), precisions=tuple(args.precisions),
                        quant_methods=tuple(args.quant_methods), budget=args.budget,
                        backprop_budget=args.backprop_budget, first_eval=args.first_eval,
                        n_images=args.n_images,
                        gen_steps=args.gen_steps, guidance=args.guidance,
                        threshold=args.threshold, zo_lr=args.zo_lr,
                        backprop_lr=args.backprop_lr, tau=args.tau, model_dir=args.model)
    t0 = time.time()
    record = run(cfg, cells_dir=args.out.with_suffix(".cells"), jobs=args.jobs,
                 threads=args.threads, report_only=args.report_only)
    record["total_wall_s"] = round(time.time() - t0, 1)
    record["command"] = "python benchmarks/quality.py " + " ".join(argv if argv is not None
                                                                     else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    args.out.with_suffix(".md").write_text(markdown(record))
    plot(record, args.out.with_suffix(".png"))
    print(markdown(record))


if __name__ == "__main__":
    main()
