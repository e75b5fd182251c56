"""Zeroth-order gradient estimates of the token loss (method.md section 2).

Notation: theta (D,) = the flattened token (V * d), mu = perturbation scale, e_i (D,) = random
direction, n = number of directions, L = loss, g (D,) = gradient estimate, B (k, D) = an optional
orthonormal basis of directions (the fleet's), w = the share of perturbation energy drawn inside it.

RGE (one-sided):  g = 1/n sum_i (L(theta + mu e_i) - L(theta)) / mu * e_i        n + 1 forwards
SPSA (central):   g = 1/n sum_i (L(theta + mu e_i) - L(theta - mu e_i)) / (2 mu) * e_i   2n forwards
All candidates of a step are evaluated in ONE batched forward with shared noise, timestep and image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

LossFn = Callable[[torch.Tensor], torch.Tensor]  # (B, D) candidates -> (B,) losses


@dataclass(frozen=True)
class Estimate:
    grad: torch.Tensor  # (D,) fp32
    loss: float  # L(theta) for RGE; mean of the +/- losses for SPSA
    signal: float  # mean |finite difference| / mu: how much the loss reacts to the token at this t


def draw_directions(
    gen: torch.Generator, n: int, dim: int, basis: torch.Tensor | None = None, basis_weight: float = 0.0
) -> torch.Tensor:
    """n directions (n, D) with E||e||^2 = D.

    With a basis, e = sqrt(1 - w) xi + sqrt(w D / k) B^T zeta (xi ~ N(0, I_D), zeta ~ N(0, I_k)): a share w
    of the perturbation energy goes into the k directions the fleet found useful.
    """
    xi = torch.randn(n, dim, generator=gen, dtype=torch.float32)
    if basis is None or basis_weight == 0.0:
        return xi
    if not 0.0 <= basis_weight <= 1.0:
        raise ValueError(f"basis_weight must be in [0, 1], got {basis_weight}")
    k = basis.shape[0]
    if basis.dim() != 2 or basis.shape[1] != dim:
        raise ValueError(f"basis must be (k, {dim}), got {tuple(basis.shape)}")
    zeta = torch.randn(n, k, generator=gen, dtype=torch.float32)
    inside = zeta @ basis.float()
    return math.sqrt(1.0 - basis_weight) * xi + math.sqrt(basis_weight * dim / k) * inside


def rge(loss_fn: LossFn, theta: torch.Tensor, directions: torch.Tensor, mu: float) -> Estimate:
    """One-sided random gradient estimate from ONE evaluation of n + 1 candidates."""
    # 1. candidates: theta, theta + mu e_1, ..., theta + mu e_n        (n + 1, D)
    cands = torch.cat([theta[None], theta[None] + mu * directions])
    # 2. one batched forward (common random numbers inside loss_fn)
    losses = loss_fn(cands).float()
    # 3. finite differences -> g
    diffs = (losses[1:] - losses[0]) / mu  # (n,)
    grad = (diffs[:, None] * directions).mean(dim=0)
    return Estimate(grad=grad, loss=float(losses[0]), signal=float(diffs.abs().mean()))


def spsa(loss_fn: LossFn, theta: torch.Tensor, directions: torch.Tensor, mu: float) -> Estimate:
    """Central-difference estimate from ONE evaluation of 2n candidates."""
    cands = torch.cat([theta[None] + mu * directions, theta[None] - mu * directions])  # (2n, D)
    losses = loss_fn(cands).float()
    n = directions.shape[0]
    diffs = (losses[:n] - losses[n:]) / (2 * mu)
    grad = (diffs[:, None] * directions).mean(dim=0)
    return Estimate(grad=grad, loss=float(losses.mean()), signal=float(diffs.abs().mean()))
