"""Does the fleet help? Newcomer devices with the fleet's basis and window vs solo ZOODiP.

Protocol (per seed):

1. **Fleet phase.** `--veterans` devices, each with a personal concept of the embedded world,
   personalize for `--fleet-rounds` rounds of `--fleet-steps` steps through the real client code
   (`client.task.run_fit_round`: encrypted state, statistic, probe steps) and the real server math
   (`server.fleet_state.FleetState`: validated sum, optional DP noise, basis, window). Two fleets
   are run: without noise, and with DP noise multiplier `--dp-sigma` (its epsilon is reported).
2. **Newcomer phase.** `--newcomers` devices with concepts the fleet never saw learn their token
   from scratch for `--steps` steps in three arms with the same ZO seeds: `solo` (no basis, the
   paper's window [500, 900)), `fleet` (basis and window of the noiseless fleet) and `fleet-dp`.
   Every `--eval-every` steps the token is scored: with the oracle (fraction of generated
   "a photo of <concept>" images that carry all identity attributes), by the mean oracle-feature
   cosine of those images to the private photos (`--metric cosine`, the DINO analogue), or by the
   denoising loss on fixed draws over all timesteps (`--metric loss`).
3. Reported per arm: forward passes until the score first reaches each of `--thresholds`, the final score,
   and the curves; mean and spread over newcomers x seeds.

The split rotates with the seed, so every concept is a newcomer for some seed.
The DP noise here comes from a seeded generator so the benchmark is reproducible; production
noise comes from `server.privacy.secure_noise_generator`.

Usage::

    python benchmarks/federated.py                    # embedded model + oracle, default budget
    python benchmarks/federated.py --seeds 0 1 2 --steps 600
    python benchmarks/federated.py --model-dir DIR --metric loss   # any SD folder, loss only
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.state_store import EncryptedStateStore
from client.task import DeviceConfig, ModelCache, evaluate_state, run_fit_round
from server.config import BasisConfig, DPConfig, PutsConfig
from server.fleet_state import FleetState, sum_statistics
from zo_core.config import ZOConfig
from zo_core.engine import Personalizer
from zo_core.subspace_stats import RoundBroadcast, WireSchema

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_WINDOW = (500, 900)
# solo: no basis, paper window | fleet: fleet basis + fleet window | fleet-basis: fleet basis +
# paper window (separates the two) | fleet-basis-low: the same at `low_basis_weight` | fleet-dp:
# basis and window of the DP fleet
ARMS: tuple[str, ...] = ("solo", "fleet", "fleet-basis", "fleet-basis-low", "fleet-dp")


@dataclass(frozen=True)
class BenchConfig:
    model_dir: str | None
    seeds: tuple[int, ...]
    veterans: int
    newcomers: int
    fleet_rounds: int
    fleet_steps: int
    probe_steps: int
    segments: int
    steps: int
    eval_every: int
    metric: str
    thresholds: tuple[float, ...]
    images: int
    eval_draws: int
    basis_rank: int
    basis_weight: float
    dp_sigma: float
    lr: float
    arms: tuple[str, ...] = ARMS
    low_basis_weight: float = 0.2
    stat_source: str = "updates"

    def __post_init__(self) -> None:
        if self.metric not in ("oracle", "cosine", "loss"):
            raise ValueError(f"metric must be 'oracle', 'cosine' or 'loss', got {self.metric!r}")
        if self.steps % self.eval_every:
            raise ValueError("steps must be a multiple of eval-every")
        if min(self.veterans, self.newcomers, self.fleet_rounds, self.fleet_steps, self.steps) < 1:
            raise ValueError("veterans, newcomers, fleet-rounds, fleet-steps and steps must be >= 1")
        if not 0 <= self.basis_weight <= 1 or not 0 <= self.low_basis_weight <= 1 or not self.dp_sigma > 0:
            raise ValueError("basis-weight must lie in [0, 1] and dp-sigma be > 0")
        if not self.arms or set(self.arms) - set(ARMS):
            raise ValueError(f"arms must be a non-empty subset of {ARMS}, got {self.arms}")


def _concepts() -> list[Any]:
    from simulations.world.concepts import get_concept, list_concepts

    return [get_concept(n) for n in list_concepts()]


def _device(root: Path, concept: Any, seed: int, cfg: BenchConfig) -> DeviceConfig:
    data = root / concept.name / "photos"
    if not data.is_dir():
        concept.write_photos(data, seed=seed)
    state = root / concept.name / "state"
    return DeviceConfig(data_dir=data, state_dir=state, key_file=state / "device.key", model_dir=cfg.model_dir,
                        placeholder=concept.placeholder, initializer=concept.initializer, lr=cfg.lr, seed=seed)  # fmt: skip


def fleet_phase(model: Personalizer, cache: ModelCache, veterans: list[Any], cfg: BenchConfig, seed: int,
                root: Path, *, dp: bool) -> dict[str, Any]:  # fmt: skip
    """Veterans personalize and share statistics; returns the basis, window and epsilon."""
    schema = WireSchema(model.token_dim, 10, model.num_train_timesteps)
    fleet = FleetState(schema, basis=BasisConfig(rank=cfg.basis_rank, weight=cfg.basis_weight), puts=PutsConfig(),
                       dp=DPConfig(enabled=dp, noise_multiplier=cfg.dp_sigma, epsilon_budget=1e6),
                       noise_rng=np.random.default_rng([seed, 7]) if dp else None)  # fmt: skip
    devices = [_device(root, c, seed, cfg) for c in veterans]
    epsilon = None
    for rnd in range(1, cfg.fleet_rounds + 1):
        b = RoundBroadcast(round=rnd, local_steps=cfg.fleet_steps, probe_steps=cfg.probe_steps,
                           stat_segments=cfg.segments, stat_source=cfg.stat_source, n=2, mu=1e-3,
                           puts_low=fleet.window[0], puts_high=fleet.window[1], basis_version=fleet.basis_version,
                           basis_weight=cfg.basis_weight if fleet.basis is not None else 0.0,
                           model_fingerprint=model.fingerprint, dim=schema.dim, num_buckets=schema.num_buckets,
                           num_train_timesteps=schema.num_train_timesteps, basis=fleet.basis)  # fmt: skip
        stats = []
        for dev in devices:
            store = EncryptedStateStore(dev.state_dir, dev.key_file)
            s, _ = run_fit_round(model, cache.data(model, dev), store, dev, b)
            stats.append(s)
        epsilon = fleet.absorb(sum_statistics(stats, schema), contributors=len(stats), sample_rate=1.0).epsilon
    assert fleet.basis is not None
    return {"basis": fleet.basis, "window": fleet.window, "epsilon": epsilon}


def score(model: Personalizer, data: Any, state: Any, concept: Any, cfg: BenchConfig, oracle: Any) -> float:
    if cfg.metric == "loss":
        return evaluate_state(model, data, state, (0, model.num_train_timesteps), cfg.eval_draws)
    images = model.generate(state, [f"a photo of {concept.placeholder}"] * cfg.images, steps=20, seed=1234)
    fid = oracle.concept_fidelity(images, concept)
    return float(fid["match"] if cfg.metric == "oracle" else fid["feature_cosine"])


def newcomer_run(model: Personalizer, cache: ModelCache, dev: DeviceConfig, concept: Any, cfg: BenchConfig,
                 arm: dict[str, Any], oracle: Any) -> dict[str, Any]:  # fmt: skip
    """Personalize from scratch in one arm; score every eval-every steps."""
    data = cache.data(model, dev)
    state = model.init_state(dev.ti, seed=dev.seed)
    zo = ZOConfig(n=2, mu=1e-3, lr=cfg.lr, puts=arm["window"])
    basis = None if arm["basis"] is None else torch.from_numpy(arm["basis"])
    curve = [(0, score(model, data, state, concept, cfg, oracle))]
    passes = 0
    for _ in range(cfg.steps // cfg.eval_every):
        res = model.train(data, state, zo, cfg.eval_every, basis=basis, basis_weight=arm["weight"])
        state, passes = res.state, passes + res.forward_passes
        curve.append((passes, score(model, data, state, concept, cfg, oracle)))
    return {"curve": curve, "final": curve[-1][1]}


def passes_to(curve: list[tuple[int, float]], threshold: float, metric: str) -> int | None:
    """Forward passes at the first checkpoint whose score reaches `threshold` (None: never)."""
    better = (lambda v: v <= threshold) if metric == "loss" else (lambda v: v >= threshold)
    return next((p for p, v in curve if better(v)), None)


def run_seed(cfg: BenchConfig, seed: int) -> dict[str, Any]:
    """Fleet phase(s) and every newcomer arm for one seed."""
    cache = ModelCache()
    model = cache.model(cfg.model_dir, "none")
    oracle = None
    if cfg.metric != "loss":
        from simulations.world.oracle import Oracle

        oracle = Oracle.load()
    concepts = _concepts()
    if cfg.veterans + cfg.newcomers > len(concepts):
        raise ValueError(f"veterans + newcomers must be <= {len(concepts)} world concepts")
    t0 = time.time()
    shift = (seed * cfg.newcomers) % len(concepts)
    order = concepts[shift:] + concepts[:shift]
    newcomers, veterans = order[: cfg.newcomers], order[cfg.newcomers : cfg.newcomers + cfg.veterans]
    with tempfile.TemporaryDirectory() as tmp:
        needed = {False} if set(cfg.arms) & {"fleet", "fleet-basis", "fleet-basis-low"} else set()
        needed |= {True} if "fleet-dp" in cfg.arms else set()
        fleets = {dp: fleet_phase(model, cache, veterans, cfg, seed, Path(tmp) / f"fleet-{dp}", dp=dp)
                  for dp in sorted(needed)}  # fmt: skip
        plain, noisy = fleets.get(False), fleets.get(True)
        all_arms = {
            "solo": lambda: {"basis": None, "window": PAPER_WINDOW, "weight": 0.0},
            "fleet": lambda: {"basis": plain["basis"], "window": plain["window"], "weight": cfg.basis_weight},
            "fleet-basis": lambda: {"basis": plain["basis"], "window": PAPER_WINDOW, "weight": cfg.basis_weight},
            "fleet-basis-low": lambda: {"basis": plain["basis"], "window": PAPER_WINDOW,
                                        "weight": cfg.low_basis_weight},
            "fleet-dp": lambda: {"basis": noisy["basis"], "window": noisy["window"], "weight": cfg.basis_weight},
        }  # fmt: skip
        arms = {name: all_arms[name]() for name in cfg.arms}
        runs: dict[str, dict[str, Any]] = {a: {} for a in arms}
        for c in newcomers:
            dev = _device(Path(tmp) / "newcomers", c, seed, cfg)
            for name, arm in arms.items():
                runs[name][c.name] = newcomer_run(model, cache, dev, c, cfg, arm, oracle)
                print(f"seed {seed} {c.name:>10} {name:>15}: curve {runs[name][c.name]['curve']}", flush=True)
    return {"seed": seed, "veterans": [c.name for c in veterans], "newcomers": [c.name for c in newcomers],
            "fleet_window": list(plain["window"]) if plain else None,
            "fleet_dp_window": list(noisy["window"]) if noisy else None,
            "fleet_dp_epsilon": noisy["epsilon"] if noisy else None, "runs": runs,
            "model_fingerprint": model.fingerprint, "token_dim": model.token_dim,
            "wall_s": round(time.time() - t0, 1)}  # fmt: skip


def _seed_worker(args: tuple[dict[str, Any], int, str]) -> str:
    """Process entry: run one seed and write it atomically (a crash loses only that seed)."""
    cfg_dict, seed, seeds_dir = args
    torch.set_num_threads(1)
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    path = Path(seeds_dir) / f"seed-{seed}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": _seedless(cfg_dict), "result": run_seed(cfg, seed)}, indent=1))
    tmp.replace(path)
    return path.name


def _seedless(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The config a per-seed file must match to be reused (JSON-normalised, without the seed list),
    plus the model's fingerprint: `model_dir` None names whichever embedded model is shipped, and a
    seed run on a retrained model must not be mixed with one from its predecessor."""
    from zo_core.model_io import model_fingerprint

    settings = {k: v for k, v in json.loads(json.dumps(cfg_dict)).items() if k != "seeds"}
    settings["model_fingerprint"] = model_fingerprint(cfg_dict["model_dir"])
    return settings


def run(cfg: BenchConfig, *, seeds_dir: Path, jobs: int = 1) -> dict[str, Any]:
    """Run every seed not already saved in `seeds_dir` (`jobs` processes), then summarize all."""
    import multiprocessing as mp

    torch.set_num_threads(1)
    seeds_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = asdict(cfg)
    settings = _seedless(cfg_dict)  # hashes the model once, not once per seed
    todo = []
    for seed in cfg.seeds:
        path = seeds_dir / f"seed-{seed}.json"
        if path.exists() and json.loads(path.read_text())["config"] == settings:
            print(f"seed {seed}: done before ({path.name}), reusing", flush=True)
            continue
        todo.append((cfg_dict, seed, str(seeds_dir)))
    t0 = time.time()
    if jobs == 1:
        for item in todo:
            _seed_worker(item)
    else:
        with mp.get_context("spawn").Pool(min(jobs, max(1, len(todo)))) as pool:
            for name in pool.imap_unordered(_seed_worker, todo):
                print(f"{name} written", flush=True)
    per_seed = [json.loads((seeds_dir / f"seed-{s}.json").read_text())["result"] for s in cfg.seeds]
    prints = {p["model_fingerprint"] for p in per_seed}
    if len(prints) != 1:
        raise ValueError(f"saved seeds come from different models {sorted(prints)}; delete {seeds_dir}")
    return {"config": cfg_dict, "model_fingerprint": prints.pop(), "token_dim": per_seed[0]["token_dim"],
            "machine": {"processor": platform.processor() or platform.machine(), "jobs": jobs,
                        "threads_per_job": 1, "torch": torch.__version__},
            "wall_s": round(time.time() - t0, 1), "wall_s_per_seed": [p["wall_s"] for p in per_seed],
            "per_seed": per_seed, "summary": summarize(per_seed, cfg)}  # fmt: skip


def summarize(per_seed: list[dict[str, Any]], cfg: BenchConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    best = max if cfg.metric != "loss" else min
    for arm in cfg.arms:
        finals = [r["final"] for s in per_seed for r in s["runs"][arm].values()]
        peaks = [best(v for _, v in r["curve"]) for s in per_seed for r in s["runs"][arm].values()]
        # mean score along the curve after the start: a speed measure finer than the thresholds
        # (a token that gets there sooner has more good points on its curve)
        along = [float(np.mean([v for _, v in r["curve"][1:]])) for s in per_seed for r in s["runs"][arm].values()]
        out[arm] = {"final_mean": float(np.mean(finals)), "final_std": float(np.std(finals)),
                    "best_mean": float(np.mean(peaks)), "along_mean": float(np.mean(along)),
                    "thresholds": {}}  # fmt: skip
        for th in cfg.thresholds:
            passes = [passes_to(r["curve"], th, cfg.metric) for s in per_seed for r in s["runs"][arm].values()]
            hit = [p for p in passes if p is not None]
            out[arm]["thresholds"][str(th)] = {"reached": f"{len(hit)}/{len(passes)}",
                                               "passes_median": float(np.median(hit)) if hit else None}  # fmt: skip
    # paired: same newcomer, same seed, same ZO draws; arm minus solo
    if "solo" in cfg.arms:
        for arm in (a for a in cfg.arms if a != "solo"):
            diffs = [s["runs"][arm][c]["final"] - s["runs"]["solo"][c]["final"] for s in per_seed for c in s["runs"]["solo"]]
            out[f"{arm}_minus_solo_final"] = {"mean": float(np.mean(diffs)), "std": float(np.std(diffs)), "n": len(diffs)}
            diffs = [np.mean([v for _, v in s["runs"][arm][c]["curve"][1:]])
                     - np.mean([v for _, v in s["runs"]["solo"][c]["curve"][1:]])
                     for s in per_seed for c in s["runs"]["solo"]]  # fmt: skip
            out[f"{arm}_minus_solo_along"] = {"mean": float(np.mean(diffs)), "std": float(np.std(diffs)), "n": len(diffs)}
    return out


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    cfg, s = result["config"], result["summary"]
    better = "lower" if cfg["metric"] == "loss" else "higher"
    lines = [
        "# Fleet basis + window vs solo ZOODiP (benchmarks/federated.py)", "",
        f"Metric: `{cfg['metric']}` ({better} is better); "
        f"{cfg['newcomers']} newcomers x seeds {cfg['seeds']}; {cfg['steps']} steps each; fleet of "
        f"{cfg['veterans']} veterans x {cfg['fleet_rounds']} rounds x {cfg['fleet_steps']} steps; basis rank "
        f"{cfg['basis_rank']}, weight {cfg['basis_weight']} (low arm {cfg.get('low_basis_weight')}), "
        f"statistic from {cfg.get('stat_source', 'updates')}, segments {cfg['segments']} "
        f"(0 = per-step directions); DP noise multiplier {cfg['dp_sigma']}. "
        f"Model token dim {result['token_dim']}, wall per seed {result.get('wall_s_per_seed')} s "
        f"(when it was computed).", "",
        "How the recorded runs were produced and how to read them: `federated-notes.md` (kept by hand; "
        "this file is regenerated).", "",
        "| arm | final (mean +- std) | best along the curve (mean) | mean along the curve | "
        + " | ".join(f"reached {t} / median passes" for t in cfg["thresholds"]) + " |",
        "|---|---|---|---|" + "---|" * len(cfg["thresholds"]),
    ]  # fmt: skip
    for arm in cfg["arms"]:
        a = s[arm]
        cells = [f"{a['thresholds'][str(t)]['reached']} / {a['thresholds'][str(t)]['passes_median']}" for t in cfg["thresholds"]]
        lines.append(f"| {arm} | {a['final_mean']:.4f} +- {a['final_std']:.4f} | {a['best_mean']:.4f} | "
                     f"{a['along_mean']:.4f} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    lines.append("")
    for key, d in s.items():
        for what, label in (("_minus_solo_final", "final"), ("_minus_solo_along", "mean-along-the-curve")):
            if key.endswith(what):
                lines.append(f"- paired {label} difference {key.removesuffix(what)} - solo: "
                             f"{d['mean']:+.4f} +- {d['std']:.4f} (n = {d['n']})")  # fmt: skip
    eps = [p["fleet_dp_epsilon"] for p in result["per_seed"]]
    lines += ["", f"DP fleet epsilon at delta 1e-5 per seed: {eps}.",
              "Fleet windows per seed: " + ", ".join(str(p["fleet_window"]) for p in result["per_seed"]),
              "DP fleet windows per seed: " + ", ".join(str(p["fleet_dp_window"]) for p in result["per_seed"])]  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="SD folder (default: the embedded tinyworld model)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--veterans", type=int, default=3)
    p.add_argument("--newcomers", type=int, default=3)
    p.add_argument("--fleet-rounds", type=int, default=3)
    p.add_argument("--fleet-steps", type=int, default=100)
    p.add_argument("--probe-steps", type=int, default=10)
    p.add_argument("--segments", type=int, default=0, help="client statistic: 0 per-step, k displacement segments")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--metric", choices=("oracle", "cosine", "loss"), default="oracle",
                   help="oracle: fraction of images with every identity attribute; cosine: mean oracle-feature "
                        "cosine to the private photos (the DINO analogue); loss: denoising loss on fixed draws")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--eval-draws", type=int, default=32)
    p.add_argument("--basis-rank", type=int, default=8)
    p.add_argument("--basis-weight", type=float, default=0.5)
    p.add_argument("--dp-sigma", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--stat-source", choices=("updates", "gradients"), default="updates",
                   help="client statistic built from token updates or raw ZO gradient estimates")
    p.add_argument("--low-basis-weight", type=float, default=0.2, help="basis weight of the fleet-basis-low arm")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--out", type=Path, default=RESULTS / "federated",
                   help="results stem: <out>.json, <out>.md and <out>.seeds/ (one file per finished seed, reused)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error("--jobs must be >= 1")
    cfg = BenchConfig(model_dir=a.model_dir, seeds=tuple(a.seeds), veterans=a.veterans, newcomers=a.newcomers,
                      fleet_rounds=a.fleet_rounds, fleet_steps=a.fleet_steps, probe_steps=a.probe_steps, segments=a.segments,
                      steps=a.steps, eval_every=a.eval_every, metric=a.metric, thresholds=tuple(a.thresholds),
                      images=a.images, eval_draws=a.eval_draws, basis_rank=a.basis_rank,
                      basis_weight=a.basis_weight, dp_sigma=a.dp_sigma, lr=a.lr, arms=tuple(a.arms),
                      low_basis_weight=a.low_basis_weight, stat_source=a.stat_source)  # fmt: skip
    result = run(cfg, seeds_dir=a.out.with_suffix(".seeds"), jobs=a.jobs)
    result["command"] = "python benchmarks/federated.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write(result, a.out)
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
