"""The `personalize` job: learn one token from a folder of photos, with checkpoints and a run record.

Outputs in OUT/: `learned_embeds.safetensors` (diffusers format), `run.json` (resolved config, loss
curve, steps, wall time, peak memory), and `checkpoint.safetensors` (state + progress, written
atomically every K steps). A run killed at any point and started again with `resume=True` ends with
exactly the token an uninterrupted run with the same seed would have produced: every random draw of
step s comes from (seed, s), and the checkpoint holds everything else (token, Adam moments, SG buffer).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zo_core.config import QuantConfig, TIConfig, TrainConfig, ZOConfig
from zo_core.engine import Personalizer
from zo_core.memory import MemoryMeter, materialize
from zo_core.state import PersonalState

CHECKPOINT = "checkpoint.safetensors"
EMBEDS = "learned_embeds.safetensors"
RUN_RECORD = "run.json"

Progress = Callable[[int, int, float, float], None]  # (step, total, loss, peak MiB)


@dataclass(frozen=True)
class PersonalizeJob:
    """Everything one run needs; saved, resolved, in run.json and in the checkpoint."""

    images: str
    out: str
    model: str | None = None
    ti: TIConfig = TIConfig()
    zo: ZOConfig = ZOConfig()
    train: TrainConfig = TrainConfig()
    quant: QuantConfig = QuantConfig()
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Progress:
    losses: list[float] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    forward_passes: int = 0
    wall_s: float = 0.0


def _comparable(job: PersonalizeJob) -> dict[str, Any]:
    """The parts of a job that must not change across a resume (steps may grow, paths may move)."""
    d = job.to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("steps", "checkpoint_every")}
    d.pop("images")
    d.pop("out")
    return json.loads(json.dumps(d))


def save_checkpoint(path: Path, state: PersonalState, job: PersonalizeJob, progress: _Progress, fp: str) -> None:
    """One file, written to a temporary name then renamed: a crash leaves the old or the new, never half."""
    meta = {"job": _comparable(job), "fingerprint": fp, "progress": dataclasses.asdict(progress)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-ckpt-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(state.to_tensors(), tmp, metadata={"fedzoodip": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path, job: PersonalizeJob, fp: str) -> tuple[PersonalState, _Progress]:
    """Refuse a checkpoint of another model or another configuration instead of silently mixing them."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("fedzoodip", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("fingerprint") != fp:
        raise ValueError(f"checkpoint {path} was made with another model (fingerprint {meta.get('fingerprint')}, "
                         f"this model {fp})")  # fmt: skip
    if meta.get("job") != _comparable(job):
        raise ValueError(f"checkpoint {path} was made with a different configuration; start a new --out "
                         "or use the same settings to resume")  # fmt: skip
    return PersonalState.from_tensors(tensors), _Progress(**meta["progress"])


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def run_personalize(job: PersonalizeJob, *, resume: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) a job; returns the run record also written to OUT/run.json."""
    out = Path(job.out)
    ckpt = out / CHECKPOINT
    if resume and not ckpt.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
    if not resume and ckpt.is_file():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    meter = MemoryMeter()
    with meter.phase("load"):
        engine = Personalizer.from_pretrained(job.model, quant=job.quant, dtype=getattr(torch, job.dtype))
        materialize(engine.unet, engine.text_encoder)  # mapped weights made resident before measuring
    with meter.phase("encode"):
        data = engine.prepare_data(job.images, job.ti)  # validates everything before OUT is touched
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        state, prog = load_checkpoint(ckpt, job, engine.fingerprint)
    else:
        state, prog = engine.init_state(job.ti, seed=job.train.seed), _Progress()
    with meter.phase("train"):
        while state.step < job.train.steps:
            chunk = min(job.train.checkpoint_every - state.step % job.train.checkpoint_every,
                        job.train.steps - state.step)  # fmt: skip

            def on_step(step: int, loss: float) -> None:
                if progress is not None:
                    progress(step, job.train.steps, loss, meter.peak_mib())

            res = engine.train(data, state, job.zo, chunk, optimizer=job.train.optimizer, on_step=on_step)
            state = res.state
            prog.losses += res.losses
            prog.timesteps += res.timesteps
            prog.forward_passes += res.forward_passes
            prog.wall_s += res.wall_s
            save_checkpoint(ckpt, state, job, prog, engine.fingerprint)
    engine.export(state, out / EMBEDS)
    record = {
        "job": job.to_dict(),
        "fingerprint": engine.fingerprint,
        "model": {"root": engine.info.root.name, "token_dim": engine.token_dim,
                  "resolution": job.ti.resolution or engine.info.resolution,
                  "prediction_type": engine.info.prediction_type},  # fmt: skip
        "quantization": engine.quant_report.to_dict() if engine.quant_report is not None else None,
        "steps": state.step,
        "forward_passes": prog.forward_passes,
        # How much of token space the Subspace Gradient removes at the end (ZOConfig.sg_tau).
        "subspace_gradient": ({"removed_directions": int(state.sg_dirs.shape[0]),
                               "token_size": int(state.theta.numel()),
                               "tau": job.zo.sg_tau(state.theta.numel())}
                              if job.zo.use_sg and job.train.optimizer == "zo" else None),
        "train_wall_s": round(prog.wall_s, 3),
        "it_per_s": round(state.step / prog.wall_s, 3) if prog.wall_s > 0 else None,
        "peak_memory_mib": meter.peaks,
        "memory_phases_mib": {k: dataclasses.asdict(v) for k, v in meter.phases.items()},
        "losses": prog.losses,
        "timesteps": prog.timesteps,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _atomic_json(out / RUN_RECORD, record)
    return record
