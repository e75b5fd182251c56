"""The estimator, Subspace Gradient and PUTS on problems with known answers."""

from __future__ import annotations

import pytest
import torch

from zo_core import estimator as est
from zo_core.puts import check_window, sample_timestep
from zo_core.subspace import low_variance_directions, project_out


def quadratic(target: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda cands: ((cands - target) ** 2).sum(dim=1)


@pytest.mark.parametrize("fn", [est.rge, est.spsa])
def test_one_step_lowers_a_quadratic_on_average(fn) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(64, generator=gen)
    theta = torch.zeros(64)
    loss = quadratic(target)
    gains = []
    for _ in range(200):
        e = fn(loss, theta, est.draw_directions(gen, 2, 64), 1e-3)
        new = theta - 1e-2 * e.grad
        gains.append(float(loss(theta[None]) - loss(new[None])))
    assert sum(gains) / len(gains) > 0
    assert sum(g > 0 for g in gains) > 120  # clearly more often downhill than not


def test_rge_is_unbiased_for_the_true_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(16, generator=gen)
    theta = torch.zeros(16)
    g = est.rge(quadratic(target), theta, est.draw_directions(gen, 20000, 16), 1e-4).grad
    true = 2 * (theta - target)
    assert torch.nn.functional.cosine_similarity(g, true, dim=0) > 0.98


def test_basis_directions_keep_energy_and_concentrate_in_the_basis() -> None:
    gen = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(100, 5, generator=gen))[0].T  # (5, 100) orthonormal rows
    e = est.draw_directions(gen, 4000, 100, basis, basis_weight=0.8)
    assert abs(float((e**2).sum(1).mean()) / 100 - 1.0) < 0.05
    share = float(((e @ basis.T) ** 2).sum(1).mean() / (e**2).sum(1).mean())
    assert 0.75 < share < 0.85  # 0.8 + 0.2 * 5/100
    with pytest.raises(ValueError, match="basis must be"):
        est.draw_directions(gen, 2, 99, basis, 0.5)
    with pytest.raises(ValueError, match="basis_weight"):
        est.draw_directions(gen, 2, 100, basis, 1.5)


def test_sg_removes_exactly_the_low_variance_directions() -> None:
    gen = torch.Generator().manual_seed(3)
    dim, tau = 40, 64
    signal = torch.linalg.qr(torch.randn(dim, 3, generator=gen))[0].T  # 3 known directions
    coeff = torch.randn(tau, 3, generator=gen) * torch.tensor([5.0, 3.0, 2.0])
    buffer = coeff @ signal + 1e-4 * torch.randn(tau, dim, generator=gen)
    # per-feature standardisation rescales axes, so the kept subspace is checked in standardised space
    scale = (buffer - buffer.mean(0)).std(0, unbiased=False)
    P = low_variance_directions(buffer, nu=1e-3)
    assert P.shape[0] == dim - 3  # all but the 3 trajectory directions are treated as noise
    kept = torch.linalg.qr((signal / scale).T)[0].T
    assert (P @ kept.T).abs().max() < 1e-3
    torch.testing.assert_close(P @ P.T, torch.eye(dim - 3), atol=1e-4, rtol=0)
    g = torch.randn(dim, generator=gen)
    g2 = project_out(g, P)
    assert (P @ g2).abs().max() < 1e-4  # nothing left along removed directions
    torch.testing.assert_close(kept @ g2, kept @ g, atol=2e-3, rtol=0)  # kept directions untouched
    assert torch.equal(project_out(g, torch.zeros(0, dim)), g)  # before the first refresh: identity


def test_sg_nu_controls_how_much_is_kept() -> None:
    gen = torch.Generator().manual_seed(4)
    buffer = torch.randn(32, 10, generator=gen) * torch.logspace(0, -3, 10)
    few = low_variance_directions(buffer, nu=0.5).shape[0]
    many = low_variance_directions(buffer, nu=1e-6).shape[0]
    assert few > many


def test_puts_never_leaves_its_window() -> None:
    gen = torch.Generator().manual_seed(5)
    ts = [sample_timestep(gen, (500, 900)) for _ in range(5000)]
    assert min(ts) >= 500 and max(ts) < 900
    assert min(ts) < 510 and max(ts) > 890  # covers the window
    assert check_window(None, 1000) == (0, 1000)
    for bad in [(900, 500), (0, 1001), (-1, 10), (5, 5)]:
        with pytest.raises(ValueError, match="PUTS window"):
            check_window(bad, 1000)
