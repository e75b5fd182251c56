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


@dataclass(frozen=True)
class QualityConfig:
    """Scale and settings of one benchmark run (saved with the results)."""

    concepts: tuple[str, ...] = ("mosaic", "ember")
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = tuple(METHODS)
    budget: int = 1200  # UNet forward evaluations per run
    eval_points: int = 4  # fidelity measured after budget * k / eval_points, k = 1..eval_points
    zo_lr: float = 5e-3
    backprop_lr: float = 5e-3
    tau: int = 128
    n_images: int = 16  # images per fidelity evaluation
    gen_steps: int = 20
    guidance: float = 4.0
    threshold: float = 0.5
    model_dir: str | None = None  # None: the embedded default

    def __post_init__(self) -> None:
        for c in self.concepts:
            get_concept(c)  # raises with the known names
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
        if not self.concepts or not self.seeds or not self.methods:
            raise ValueError("concepts, seeds and methods must be non-empty")
        if self.budget < 3 * self.eval_points:
            raise ValueError(f"budget {self.budget} too small for {self.eval_points} eval points")
        if self.n_images < 1 or self.gen_steps < 1 or self.eval_points < 1:
            raise ValueError("n_images, gen_steps and eval_points must be >= 1")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")


@dataclass
class RunResult:
    """One (concept, seed, method) run."""

    concept: str
    seed: int
    method: str
    forwards: list[int] = field(default_factory=list)
    concept_match: list[float] = field(default_factory=list)
    feature_cosine: list[float] = field(default_factory=list)
    prompt_match: float = 0.0
    prompt_concept_match: float = 0.0
    forwards_to_threshold: int | None = None
    train_wall_s: float = 0.0
    train_peak_rise_mib: float = 0.0
    initial_concept_match: float = 0.0


def _zo_config(cfg: QualityConfig, method: str):  # type: ignore[no-untyped-def]
    from zo_core.config import ZOConfig

    spec = METHODS[method]
    lr = cfg.zo_lr if spec["optimizer"] == "zo" else cfg.backprop_lr
    return ZOConfig(use_sg=spec["use_sg"], puts=spec["puts"], lr=lr, tau=cfg.tau)


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


def run(cfg: QualityConfig, *, log: bool = True) -> dict[str, Any]:
    """Run the benchmark grid; returns the JSON-able record."""
    from zo_core.config import TIConfig
    from zo_core.engine import Personalizer
    from zo_core.memory import MemoryMeter

    engine = Personalizer.from_pretrained(cfg.model_dir)
    oracle = Oracle.load()
    meter = MemoryMeter("cpu")
    runs: list[RunResult] = []
    for concept_name in cfg.concepts:
        concept = get_concept(concept_name)
        ti = TIConfig(placeholder=concept.placeholder, initializer=concept.initializer)
        for seed in cfg.seeds:
            data = engine.prepare_data_from_images(concept.private_photos(seed), ti)
            initial = _fidelity(engine, engine.init_state(ti, seed=seed), oracle, concept, cfg, seed)
            for method in cfg.methods:
                zo = _zo_config(cfg, method)
                optimizer = METHODS[method]["optimizer"]
                per_step = zo.forwards_per_step if optimizer == "zo" else 1
                chunk = cfg.budget // cfg.eval_points // per_step
                state = engine.init_state(ti, seed=seed)
                res = RunResult(concept_name, seed, method,
                                initial_concept_match=initial["match"])
                spent = 0
                for k in range(cfg.eval_points):
                    with meter.phase(f"{concept_name}/{seed}/{method}/{k}"):
                        out = engine.train(data, state, zo, chunk, optimizer=optimizer)
                    rise = meter.phases[f"{concept_name}/{seed}/{method}/{k}"].rise_mib
                    res.train_peak_rise_mib = max(res.train_peak_rise_mib, rise)
                    state = out.state
                    spent += out.forward_passes
                    res.train_wall_s += out.wall_s
                    fid = _fidelity(engine, state, oracle, concept, cfg, seed)
                    res.forwards.append(spent)
                    res.concept_match.append(fid["match"])
                    res.feature_cosine.append(fid["feature_cosine"])
                    if res.forwards_to_threshold is None and fid["match"] >= cfg.threshold:
                        res.forwards_to_threshold = spent
                res.prompt_match, res.prompt_concept_match = _prompt_fidelity(
                    engine, state, oracle, concept, cfg, seed)
                runs.append(res)
                if log:
                    print(f"{concept_name} seed {seed} {method}: concept {res.concept_match} "
                          f"prompt {res.prompt_match:.2f} wall {res.train_wall_s:.1f}s", flush=True)
    return {
        "config": asdict(cfg),
        "scale": (f"{len(cfg.concepts)} concepts x {len(cfg.seeds)} seeds x "
                  f"{len(cfg.methods)} methods, {cfg.budget} UNet forwards per run, "
                  f"{cfg.n_images} images per fidelity point"),
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "runs": [asdict(r) for r in runs],
        "summary": summarize(runs, cfg),
    }


def summarize(runs: list[RunResult], cfg: QualityConfig) -> dict[str, dict[str, float | None]]:
    """Mean over concepts and seeds, per method."""
    out: dict[str, dict[str, float | None]] = {}
    for method in cfg.methods:
        rs = [r for r in runs if r.method == method]
        if not rs:
            continue
        reached = [r.forwards_to_threshold for r in rs if r.forwards_to_threshold is not None]
        out[method] = {
            "initial_concept_match": float(np.mean([r.initial_concept_match for r in rs])),
            "final_concept_match": float(np.mean([r.concept_match[-1] for r in rs])),
            "final_feature_cosine": float(np.mean([r.feature_cosine[-1] for r in rs])),
            "prompt_match": float(np.mean([r.prompt_match for r in rs])),
            "prompt_concept_match": float(np.mean([r.prompt_concept_match for r in rs])),
            "runs_reaching_threshold": float(len(reached)) / len(rs),
            "mean_forwards_to_threshold": float(np.mean(reached)) if reached else None,
            "train_wall_s": float(np.mean([r.train_wall_s for r in rs])),
            "train_peak_rise_mib": float(np.max([r.train_peak_rise_mib for r in rs])),
        }
    return out


def markdown(record: dict[str, Any]) -> str:
    """The summary as a markdown table."""
    lines = [f"Scale: {record['scale']}.", "",
             "| method | concept match (start -> end) | feature cos | prompt match | "
             "concept kept in context | runs >= threshold | forwards to threshold | "
             "train wall s | peak rise MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, s in record["summary"].items():
        ftt = "-" if s["mean_forwards_to_threshold"] is None else f"{s['mean_forwards_to_threshold']:.0f}"
        lines.append(
            f"| {m} | {s['initial_concept_match']:.2f} -> {s['final_concept_match']:.2f} | "
            f"{s['final_feature_cosine']:.3f} | {s['prompt_match']:.2f} | "
            f"{s['prompt_concept_match']:.2f} | {s['runs_reaching_threshold']:.2f} | {ftt} | "
            f"{s['train_wall_s']:.1f} | {s['train_peak_rise_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], png: Path) -> None:
    """Concept match vs forward passes, mean over concepts and seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in record["config"]["methods"]:
        rs = [r for r in record["runs"] if r["method"] == method]
        if not rs:
            continue
        x = [0] + rs[0]["forwards"]
        y = [np.mean([r["initial_concept_match"] for r in rs])] + list(
            np.mean([r["concept_match"] for r in rs], axis=0))
        ax.plot(x, y, marker="o", label=method)
    ax.axhline(record["config"]["threshold"], color="gray", ls=":", lw=1)
    ax.set_xlabel("UNet forward evaluations")
    ax.set_ylabel("oracle concept match")
    ax.set_title(record["scale"], fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    d = QualityConfig()
    p = argparse.ArgumentParser(prog="python benchmarks/quality.py", description=__doc__.split("\n")[0])
    p.add_argument("--concepts", nargs="+", default=list(d.concepts), choices=list_concepts())
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds))
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=list(METHODS))
    p.add_argument("--budget", type=int, default=d.budget)
    p.add_argument("--eval-points", type=int, default=d.eval_points)
    p.add_argument("--n-images", type=int, default=d.n_images)
    p.add_argument("--gen-steps", type=int, default=d.gen_steps)
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--zo-lr", type=float, default=d.zo_lr)
    p.add_argument("--backprop-lr", type=float, default=d.backprop_lr)
    p.add_argument("--model", default=None, help="diffusers folder (default: embedded tinyworld)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "quality.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = QualityConfig(concepts=tuple(args.concepts), seeds=tuple(args.seeds),
                        methods=tuple(args.methods), budget=args.budget,
                        eval_points=args.eval_points, n_images=args.n_images,
                        gen_steps=args.gen_steps, threshold=args.threshold, zo_lr=args.zo_lr,
                        backprop_lr=args.backprop_lr, model_dir=args.model)
    t0 = time.time()
    record = run(cfg)
    record["total_wall_s"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    args.out.with_suffix(".md").write_text(markdown(record))
    plot(record, args.out.with_suffix(".png"))
    print(markdown(record))


if __name__ == "__main__":
    main()
