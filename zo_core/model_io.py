"""Find, check and load a Stable Diffusion folder (diffusers layout), strictly offline.

Everything that differs between models (token width d, latent size, VAE scale factor, prediction type,
number of train timesteps) is read from the folder's configs, never assumed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tinyworld"
REQUIRED = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelFolderError(ValueError):
    """The folder is not a usable Stable Diffusion model; the message says what is wrong."""


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to know about a model folder before loading any weights."""

    root: Path
    token_dim: int
    latent_channels: int
    vae_scale_factor: int
    resolution: int
    num_train_timesteps: int
    prediction_type: str
    scheduler_class: str


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    """`None` means the embedded default model shipped with the package."""
    if model_dir is None:
        if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
            raise ModelFolderError(
                f"the embedded default model is missing from {DEFAULT_MODEL_DIR.name}/ in the package; "
                "rebuild it with `python -m simulations.world.train_model --out zo_core/assets/tinyworld`"
            )
        return DEFAULT_MODEL_DIR
    return Path(model_dir).expanduser()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} is not a JSON object")
    return data


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)


def inspect_model_dir(model_dir: str | Path | None) -> ModelInfo:
    """Check the folder layout and read the facts the engine needs; name everything that is missing."""
    root = resolve_model_dir(model_dir)
    if not root.is_dir():
        raise ModelFolderError(f"model folder {root} does not exist or is not a folder")
    index = root / "model_index.json"
    problems: list[str] = []
    if not index.is_file():
        problems.append("model_index.json")
    else:
        components = _read_json(index)
        if "text_encoder_2" in components:
            raise ModelFolderError(
                f"{root} is an SDXL-style model (two text encoders); fedzoodip supports single-text-encoder "
                "Stable Diffusion models (SD1.x, SD2.x) for now"
            )
    for name in REQUIRED:
        sub = root / name
        if not sub.is_dir():
            problems.append(f"{name}/")
            continue
        if name == "tokenizer":
            if not ((sub / "vocab.json").is_file() and (sub / "merges.txt").is_file()) and not (
                sub / "tokenizer.json"
            ).is_file():
                problems.append("tokenizer/vocab.json + merges.txt (or tokenizer.json)")
            continue
        config = "scheduler_config.json" if name == "scheduler" else "config.json"
        if not (sub / config).is_file():
            problems.append(f"{name}/{config}")
        if name != "scheduler" and not _weight_files(sub):
            problems.append(f"{name}/ weights (*.safetensors or *.bin)")
    if problems:
        raise ModelFolderError(
            f"{root} is not a Stable Diffusion folder in diffusers layout; missing: {', '.join(problems)}"
        )
    text_cfg = _read_json(root / "text_encoder" / "config.json")
    vae_cfg = _read_json(root / "vae" / "config.json")
    unet_cfg = _read_json(root / "unet" / "config.json")
    sched_cfg = _read_json(root / "scheduler" / "scheduler_config.json")
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
    cross = unet_cfg.get("cross_attention_dim")
    token_dim = int(text_cfg.get("hidden_size", -1))
    if isinstance(cross, int) and cross != token_dim:
        raise ModelFolderError(
            f"{root}: text encoder width {token_dim} does not match the UNet's cross_attention_dim {cross}"
        )
    return ModelInfo(
        root=root,
        token_dim=token_dim,
        latent_channels=int(unet_cfg.get("in_channels", 4)),
        vae_scale_factor=vae_scale,
        resolution=int(unet_cfg.get("sample_size", 64)) * vae_scale,
        num_train_timesteps=int(sched_cfg.get("num_train_timesteps", 1000)),
        prediction_type=str(sched_cfg.get("prediction_type", "epsilon")),
        scheduler_class=str(sched_cfg.get("_class_name", "DDPMScheduler")),
    )


def model_fingerprint(model_dir: str | Path | None) -> str:
    """`fingerprint` of a model folder given as a user would (None: the embedded default)."""
    return fingerprint(inspect_model_dir(model_dir).root)


def fingerprint(root: Path, *, chunk: int = 1 << 20) -> str:
    """A short identity of the base model (configs, tokenizer, weights) that the fleet must agree on.

    Quantization is deliberately NOT part of it: it is each device's local choice (a low-end phone
    runs the 4-bit UNet, an edge box int8), and the statistics the fleet shares - directions of
    token movement, timestep signal - refer to the same token space of the same base model.

    Hashing every byte of a 4 GB SD folder costs seconds at every start on a small device, so each
    weight file contributes its size and three 1 MiB samples (start, middle, end); every config and
    tokenizer file is hashed whole. Two folders that differ only inside unsampled bytes of a weight
    file of identical size would collide - accidental fine-tunes change the sampled bytes too.
    """
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        h.update(rel.encode() + b"\n")
        size = path.stat().st_size
        if path.suffix in _WEIGHT_SUFFIXES:
            h.update(str(size).encode())
            with path.open("rb") as f:
                for offset in (0, max(0, size // 2 - chunk // 2), max(0, size - chunk)):
                    f.seek(offset)
                    h.update(f.read(chunk))
        else:
            h.update(path.read_bytes())
    return h.hexdigest()[:16]
