"""Subspace Gradient (method.md section 4): drop gradient components along the low-variance
directions of the recent token trajectory.

Notation: tau = buffer length, D = token size (V * d), buffer (tau, D) = the last tau tokens, lambda_i =
squared singular values of the standardised buffer, nu = variance share treated as noise, P (r, D) =
the rows (directions) removed, g' = g (I - P^T P). Before the first refresh P is empty (g' = g).
"""

from __future__ import annotations

import torch


def standardise(rows: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-feature zero mean and unit variance over the rows (features with no spread stay 0)."""
    centred = rows - rows.mean(dim=0, keepdim=True)
    std = centred.std(dim=0, keepdim=True, unbiased=False)
    return centred / std.clamp_min(eps)


def low_variance_directions(buffer: torch.Tensor, nu: float) -> torch.Tensor:
    """P (r, D): principal directions i* + 1 .. tau of the standardised buffer.

    i* is the smallest index whose cumulative explained variance exceeds 1 - nu; the directions after
    it carry at most nu of the trajectory's variance and are treated as estimator noise.
    """
    _, s, vh = torch.linalg.svd(standardise(buffer.double()), full_matrices=False)  # vh (tau, D)
    lam = s**2
    total = lam.sum()
    if total <= 0:
        return vh.new_zeros(0, buffer.shape[1]).float()
    cum = torch.cumsum(lam, 0) / total
    i_star = int(torch.nonzero(cum > 1.0 - nu)[0, 0])  # 0-based index of the first direction kept last
    # canonical strides: a (1, D) slice of vh has strides (1, 1), which sends the projection's matmul
    # down another kernel than the same values reloaded from a checkpoint - and breaks exact resume
    return vh[i_star + 1 :].float().clone(memory_format=torch.contiguous_format)


def project_out(grad: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """g (I - P^T P) for orthonormal rows P."""
    if directions.numel() == 0:
        return grad
    return grad - (directions @ grad) @ directions
