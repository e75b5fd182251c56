"""Partial Uniform Timestep Sampling (method.md section 5): t ~ U[T_L, T_U) instead of U[0, T).

Timesteps near the noise end carry the text conditioning a token must learn; the paper's window is
[500, 900) of T = 1000 (SDXL: [700, 900)).
"""

from __future__ import annotations

import torch


def check_window(window: tuple[int, int] | None, num_train_timesteps: int) -> tuple[int, int]:
    """The effective [lo, hi) for a model with T timesteps; None means the whole range."""
    if window is None:
        return 0, num_train_timesteps
    lo, hi = int(window[0]), int(window[1])
    if not 0 <= lo < hi <= num_train_timesteps:
        raise ValueError(f"PUTS window [{lo}, {hi}) must lie inside [0, {num_train_timesteps}) and be non-empty")
    return lo, hi


def sample_timestep(gen: torch.Generator, window: tuple[int, int]) -> int:
    """One integer timestep drawn uniformly from [lo, hi)."""
    lo, hi = window
    return int(torch.randint(lo, hi, (1,), generator=gen).item())
