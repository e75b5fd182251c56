"""Training memory and speed at Stable Diffusion 1.5 shapes: backprop textual inversion vs ZOODiP.

What it measures, per configuration, each in its OWN fresh Python process (so that no configuration
inherits another's heap, and the process peak is the configuration's own):

* peak resident memory of the process while training (1 warm-up + a few timed steps), in MiB;
* seconds per optimizer step;
* beside it, the physical floor of that configuration: the runtime baseline (the process after
  importing torch + diffusers + transformers + the engine), plus the bytes of the (quantized) UNet and
  text encoder weights, plus the activations of ONE batch-1 forward pass (measured as that forward's
  memory rise). Backprop cannot go below it; forward-only training should sit close to it.

The model is SD1.5-shaped with random weights (:func:`zo_core.sd15_configs.build_sd15_random`): memory
and time depend on shapes, not values. It is built once into ``--model-dir`` (4.3 GB, float32).

Every worker runs with ``MALLOC_MMAP_THRESHOLD_=131072`` (freed tensors go back to the system),
materialises the memory-mapped weights before measuring, and resets the kernel's high-water mark per
phase (``zo_core.memory.MemoryMeter``).

Run from the repository root (full, about 25 minutes on 2 CPU cores)::

    python benchmarks/memory.py

It runs as a script, not ``python -m benchmarks.memory``: opacus 1.6 installs a top-level package
named ``benchmarks`` into site-packages, which shadows this folder as a module path.

Quick check (256 px, two configurations)::

    python benchmarks/memory.py --resolution 256 --configs zo-int8,ti-fp32 --out-dir runs/bench-quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the repository's zo_core importable
    sys.path.insert(0, str(REPO))
DEFAULT_MODEL_DIR = Path("runs") / "bench" / "sd15-random-fp32"
DEFAULT_OUT_DIR = Path("benchmarks") / "results"
RESULT_STEM = "memory-sd15"
# glibc serves allocations above this many bytes with mmap, so freeing them returns the memory to the
# system and later phases do not see earlier phases' freed heap as resident (cpu-stack.md).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
PLACEHOLDER, INITIALIZER = "<bench-object>", "dog"
FLOOR_TIMESTEP = 700  # inside the PUTS window [500, 900); any t costs the same


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration."""

    name: str
    label: str
    optimizer: str  # "backprop" | "zo"
    backend: str  # a zo_core.config.QUANT_BACKENDS name
    batched: bool = True  # ZO: the n + 1 candidates in one forward (batch n + 1) or one by one
    n: int = 2

    def __post_init__(self) -> None:
        if self.optimizer not in ("backprop", "zo"):
            raise ValueError(f"optimizer must be 'backprop' or 'zo', got {self.optimizer!r}")


CONFIGS: dict[str, BenchConfig] = {
    c.name: c
    for c in (
        BenchConfig("ti-fp32", "(a) backprop TI, fp32 weights", "backprop", "none"),
        BenchConfig("ti-int8", "(b) backprop TI, quanto int8 weights", "backprop", "quanto-int8"),
        BenchConfig(
            "zo-int8", "(c) ZO n=2, quanto int8, n+1 forwards batched", "zo", "quanto-int8"
        ),
        BenchConfig(
            "zo-int4", "(d) ZO n=2, quanto int4 UNet (int8 text), batched", "zo", "quanto-int4"
        ),
        BenchConfig(
            "zo-int8-seq",
            "(e) ZO n=2, quanto int8, n+1 forwards one by one",
            "zo",
            "quanto-int8",
            False,
        ),
        BenchConfig("zo-fp32", "(extra) ZO n=2, fp32 weights, batched", "zo", "none"),
    )
}
DEFAULT_CONFIGS = ("ti-fp32", "ti-int8", "zo-int8", "zo-int4", "zo-int8-seq")


# --------------------------------------------------------------------------------------------------
# Worker: one configuration, in its own process
# --------------------------------------------------------------------------------------------------


def _synthetic_photo(resolution: int, seed: int) -> Any:
    """A deterministic smooth colour field standing in for a photo (values do not change memory)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((resolution, resolution), Image.Resampling.BICUBIC)


def run_worker(
    cfg: BenchConfig, model_dir: Path, resolution: int, steps: int, warmup: int, threads: int
) -> dict[str, Any]:
    """Measure one configuration in this process; returns the JSON-ready record."""
    # The runtime every configuration pays: the model libraries the engine imports lazily, imported
    # here first so that the baseline includes them and the load phase measures weights only.
    import diffusers  # noqa: F401
    import optimum.quanto  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    from zo_core.config import QuantConfig, TIConfig, ZOConfig
    from zo_core.engine import Personalizer
    from zo_core.memory import MemoryMeter, materialize
    from zo_core.objective import Objective, Sample
    from zo_core.quantize import weight_bytes

    torch.set_num_threads(threads)
    meter = MemoryMeter("cpu")
    baseline = (
        meter.current_mib()
    )  # interpreter + torch + diffusers + transformers + quanto + engine

    with meter.phase("load"):
        model = Personalizer.from_pretrained(model_dir, quant=QuantConfig(backend=cfg.backend))  # type: ignore[arg-type]
        materialize(model.unet, model.text_encoder)
    after_load = meter.current_mib()
    weights = weight_bytes(model.unet) + weight_bytes(model.text_encoder)

    ti = TIConfig(placeholder=PLACEHOLDER, initializer=INITIALIZER, resolution=resolution)
    with meter.phase("prepare"):  # VAE loaded, one photo (+ flip) encoded, VAE freed
        data = model.prepare_data_from_images([_synthetic_photo(resolution, 0)], ti)
    state = model.init_state(ti, seed=0)

    # The floor's activation term: one batch-1 forward (text encoder + UNet + loss), no autograd.
    gen = torch.Generator().manual_seed(0)
    latent = data.latent_mean[:1]
    sample = Sample(
        latent=latent,
        noise=torch.randn(latent.shape, generator=gen),
        timestep=FLOOR_TIMESTEP,
        input_ids=data.captions[0][:1],
    )
    objective = Objective(
        model.text_encoder, model.unet, model.scheduler, model.splicer, data.token_ids
    )
    with torch.no_grad(), meter.phase("one_forward"):
        t0 = time.perf_counter()
        objective.losses(sample, state.theta[None])
        forward_s = time.perf_counter() - t0

    zo = ZOConfig(n=cfg.n, batched=cfg.batched)
    with meter.phase("warmup"):
        warm = model.train(data, state, zo, warmup, optimizer=cfg.optimizer)
    stamps: list[float] = []
    with meter.phase("steps"):
        t0 = time.perf_counter()
        timed = model.train(
            data,
            warm.state,
            zo,
            steps,
            optimizer=cfg.optimizer,
            on_step=lambda _s, _l: stamps.append(time.perf_counter()),
        )
    step_s = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]

    phases = {name: asdict(rec) for name, rec in meter.phases.items()}
    one_forward = meter.phases["one_forward"].rise_mib
    weights_mib = weights / 2**20
    return {
        **asdict(cfg),
        "runtime_baseline_mib": baseline,
        "after_load_mib": after_load,
        "weights_mib": weights_mib,
        "quant_report": model.quant_report.to_dict() if model.quant_report is not None else None,  # type: ignore[attr-defined]
        "one_forward_activations_mib": one_forward,
        "one_forward_s": forward_s,
        "floor_mib": baseline + weights_mib + one_forward,
        "train_peak_mib": max(meter.phases["warmup"].peak_mib, meter.phases["steps"].peak_mib),
        "train_step_rise_mib": meter.phases["steps"].peak_mib - meter.phases["steps"].start_mib,
        "load_peak_mib": meter.phases["load"].peak_mib,
        "prepare_peak_mib": meter.phases["prepare"].peak_mib,
        "process_peak_mib": max(rec.peak_mib for rec in meter.phases.values()),
        "s_per_step": timed.wall_s / steps,
        "step_s": step_s,
        "forward_passes_per_step": timed.forward_passes / steps,
        "losses": timed.losses,
        "peak_resettable": meter.resettable,
        "phases": phases,
    }


# --------------------------------------------------------------------------------------------------
# Driver: build the model once, one subprocess per configuration, write the report
# --------------------------------------------------------------------------------------------------


def ensure_model(model_dir: Path) -> Path:
    """Build the SD1.5-shaped random model once (skipped when the folder is complete)."""
    if (model_dir / "model_index.json").is_file() and (model_dir / "unet").is_dir():
        return model_dir
    from zo_core.sd15_configs import build_sd15_random

    print(f"building SD1.5-shaped random model in {model_dir} (once, ~1-2 min)", flush=True)
    build_sd15_random(model_dir, seed=0)
    return model_dir


def _run_one(cfg: BenchConfig, args: argparse.Namespace, tmp_out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        cfg.name,
        "--worker-out",
        str(tmp_out),
        "--model-dir",
        str(args.model_dir),
        "--resolution",
        str(args.resolution),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, **MALLOC_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"worker {cfg.name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    record: dict[str, Any] = json.loads(tmp_out.read_text())
    record["worker_wall_s"] = time.perf_counter() - start
    return record


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    import diffusers
    import optimum.quanto
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kib = next(
            int(l.split()[1])
            for l in Path("/proc/meminfo").read_text().splitlines()
            if l.startswith("MemTotal")
        )
        mem = f"{mem_kib / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        mem = "unknown"
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory": mem,
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "optimum_quanto": getattr(optimum.quanto, "__version__", "unknown"),
        "os": platform.platform(),
    }


def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def write_report(payload: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``memory-sd15.json`` (everything) and ``memory-sd15.md`` (the table and the verdicts)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{RESULT_STEM}.json"
    md_path = out_dir / f"{RESULT_STEM}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")

    runs = {r["name"]: r for r in payload["results"]}
    m, s = payload["machine"], payload["settings"]
    lines = [
        f"# Training memory at SD1.5 shapes, {s['resolution']} px, batch 1",
        "",
        (
            f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs (shared), {m['memory']} RAM; "
            f"torch {m['torch']} ({m['torch_threads']} thread(s)), diffusers {m['diffusers']}, "
            f"transformers {m['transformers']}, optimum-quanto {m['optimum_quanto']}."
        ),
        "",
        f"Reproduce: `{payload['command']}`",
        "",
        (
            "Each configuration ran in its own process (`MALLOC_MMAP_THRESHOLD_=131072`, weights materialised "
            f"before measuring), {s['warmup']} warm-up step(s) then {s['steps']} timed step(s). SD1.5-shaped "
            "model with random weights (UNet 859.5 M, text encoder 123.1 M parameters); the VAE is used once "
            "to cache latents and freed before training, as the engine does."
        ),
        "",
        (
            "**Peak** = the process's peak resident memory during training (warm-up and timed steps). "
            "**Floor** = runtime baseline (process after importing torch, diffusers, transformers and the "
            "engine) + UNet and text-encoder weight bytes + the activations of one batch-1 forward (that "
            "forward's measured memory rise); what any method must hold."
        ),
        "",
        "| configuration | peak MiB | floor MiB | = baseline | + weights | + 1 forward | peak / floor | s / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["results"]:
        lines.append(
            f"| {r['label']} | **{_fmt(r['train_peak_mib'])}** | {_fmt(r['floor_mib'])} | "
            f"{_fmt(r['runtime_baseline_mib'])} | {_fmt(r['weights_mib'])} | {_fmt(r['one_forward_activations_mib'])} | "
            f"{r['train_peak_mib'] / r['floor_mib']:.2f} | {r['s_per_step']:.1f} |"
        )
    lines += ["", "## Against the targets", ""]
    for line in verdicts(runs):
        lines.append(f"- {line}")
    lines += [
        "",
        "## Other peaks (MiB)",
        "",
        (
            "One-off phases of the same processes, outside training: loading the float checkpoint and "
            "quantizing it (the float file's pages are resident while quantization reads them), and "
            "encoding the photo and its flip with the float VAE at full resolution (then freed)."
        ),
        "",
        "| configuration | loading + quantizing | VAE encoding (prepare) | process resident after load |",
        "|---|---:|---:|---:|",
    ]
    for r in payload["results"]:
        lines.append(
            f"| {r['label']} | {_fmt(r['load_peak_mib'])} | {_fmt(r['prepare_peak_mib'])} | {_fmt(r['after_load_mib'])} |"
        )
    lines.append("")
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def verdicts(runs: dict[str, dict[str, Any]]) -> list[str]:
    """The task's targets, stated as measured (only for configurations that were run)."""
    out: list[str] = []

    def peak(name: str) -> float:
        return float(runs[name]["train_peak_mib"])

    for zo_name, how in (
        ("zo-int8", "n + 1 forwards batched"),
        ("zo-int8-seq", "forwards one by one"),
    ):
        if "ti-fp32" in runs and zo_name in runs:
            ratio = peak(zo_name) / peak("ti-fp32")
            met = "met" if ratio <= 1 / 3 else "NOT met"
            out.append(
                f"ZO int8 ({how}) peak / backprop TI fp32 peak = {ratio:.3f} (target <= 0.333: {met})."
            )
    if "zo-int8" in runs and "zo-int4" in runs:
        less = peak("zo-int4") < peak("zo-int8")
        out.append(
            f"ZO int4 peak {_fmt(peak('zo-int4'))} MiB vs ZO int8 {_fmt(peak('zo-int8'))} MiB "
            f"(target: less: {'met' if less else 'NOT met'})."
        )
    if "ti-fp32" in runs and "ti-int8" in runs:
        out.append(
            f"Backprop TI with int8 weights: {_fmt(peak('ti-int8'))} MiB vs {_fmt(peak('ti-fp32'))} MiB in fp32 "
            f"({peak('ti-int8') / peak('ti-fp32'):.2f}x)."
        )
    if "zo-int8" in runs and "zo-int8-seq" in runs:
        b, q = runs["zo-int8"], runs["zo-int8-seq"]
        out.append(
            f"ZO int8, n + 1 = 3 forwards batched vs one by one: {_fmt(b['train_peak_mib'])} vs "
            f"{_fmt(q['train_peak_mib'])} MiB, {b['s_per_step']:.1f} vs {q['s_per_step']:.1f} s/step."
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/memory.py",
        description="Peak memory and seconds per step of backprop textual inversion vs ZOODiP at SD1.5 "
        "shapes (random weights), one subprocess per configuration.",
        epilog="configurations: " + "; ".join(f"{c.name} = {c.label}" for c in CONFIGS.values()),
    )
    parser.add_argument(
        "--resolution", type=int, default=512, help="image side in pixels (default 512)"
    )
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated configuration names (default: {','.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument(
        "--steps", type=int, default=2, help="timed steps per configuration (default 2)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per worker (default 1)"
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help=f"SD1.5-shaped random model folder, built if missing (default {DEFAULT_MODEL_DIR})",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"where {RESULT_STEM}.json/.md are written (default {DEFAULT_OUT_DIR})",
    )
    parser.add_argument(
        "--rewrite-report",
        action="store_true",
        help=f"only re-render {RESULT_STEM}.md from the {RESULT_STEM}.json in --out-dir",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        parser.error(f"unknown configuration(s) {unknown or names}; choose from {sorted(CONFIGS)}")
    if len(set(names)) != len(names):
        parser.error(f"configuration listed twice in {names}")
    args.config_names = names
    args.model_dir = args.model_dir.expanduser().resolve()  # workers run with the repository as cwd
    args.out_dir = args.out_dir.expanduser().resolve()
    if args.resolution < 64 or args.resolution % 64:
        parser.error(
            f"--resolution must be a multiple of 64 and >= 64 (UNet downsamples the latent 3x), got {args.resolution}"
        )
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--steps and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        if args.worker not in CONFIGS or args.worker_out is None:
            raise ValueError(
                f"--worker needs a configuration name and --worker-out, got {args.worker!r}"
            )
        record = run_worker(
            CONFIGS[args.worker],
            args.model_dir,
            args.resolution,
            args.steps,
            args.warmup,
            args.threads,
        )
        args.worker_out.write_text(json.dumps(record))
        return 0

    if args.rewrite_report:
        payload = json.loads((args.out_dir / f"{RESULT_STEM}.json").read_text())
        payload["verdicts"] = verdicts({r["name"]: r for r in payload["results"]})
        json_path, md_path = write_report(payload, args.out_dir)
        print(f"rewrote {md_path}")
        return 0
    ensure_model(args.model_dir)
    results = []
    tmp_dir = args.model_dir.parent / "workers"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for name in args.config_names:
        print(f"[{time.strftime('%H:%M:%S')}] {CONFIGS[name].label} ...", flush=True)
        record = _run_one(CONFIGS[name], args, tmp_dir / f"{name}.json")
        print(
            f"    peak {record['train_peak_mib']:,.0f} MiB, floor {record['floor_mib']:,.0f} MiB, "
            f"{record['s_per_step']:.1f} s/step ({record['worker_wall_s']:.0f} s)",
            flush=True,
        )
        results.append(record)
    argv_shown = sys.argv[1:] if argv is None else argv
    payload = {
        "command": shlex.join(["python", "benchmarks/memory.py", *argv_shown]),
        "machine": machine_info(args.threads),
        "settings": {
            "resolution": args.resolution,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "batch": 1,
            "malloc_env": MALLOC_ENV,
        },
        "results": results,
        "verdicts": verdicts({r["name"]: r for r in results}),
    }
    json_path, md_path = write_report(payload, args.out_dir)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
