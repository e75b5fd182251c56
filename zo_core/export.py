"""Write and read learned tokens in the format diffusers' `load_textual_inversion` reads.

A safetensors file mapping the placeholder to its (V, d) vectors, as diffusers' own textual-inversion
script writes it; diffusers names the extra vectors `<tok>_1`, `<tok>_2`, ... exactly as we do.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def save_learned_embeds(placeholder: str, theta: torch.Tensor, path: str | Path) -> Path:
    """Atomically write {placeholder: theta (V, d) fp32}."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({placeholder: theta.detach().float().cpu().contiguous()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load_learned_embeds(path: str | Path, token_dim: int | None = None) -> tuple[str, torch.Tensor]:
    """(placeholder, theta (V, d)) from a learned-embeds file; a clear error for anything else."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"embeddings file {p} does not exist")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{p} is not a safetensors file of learned embeddings: {err}") from err
    if len(tensors) != 1:
        raise ValueError(f"{p} holds {len(tensors)} tensors ({sorted(tensors)}); expected one placeholder")
    ((placeholder, theta),) = tensors.items()
    theta = theta.float()
    if theta.dim() == 1:
        theta = theta[None]
    if theta.dim() != 2:
        raise ValueError(f"{p}: embedding of {placeholder!r} has shape {tuple(theta.shape)}, expected (V, d)")
    if token_dim is not None and theta.shape[1] != token_dim:
        raise ValueError(
            f"{p}: token width {theta.shape[1]} does not match this model's text encoder width {token_dim}"
        )
    if not torch.isfinite(theta).all():
        raise ValueError(f"{p}: embedding holds NaN or infinite values")
    return placeholder, theta
