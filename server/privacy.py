"""Central differential privacy of the aggregate: Gaussian noise and RDP accounting.

The mechanism is the Gaussian mechanism on the SUM of client statistics (DP-FedAvg, McMahan et
al. 2018): each client's statistic is bounded by the wire schema (L2 sensitivity
`WireSchema.sensitivity`), the server adds N(0, (sigma * sensitivity)^2) to every coordinate of
the sum, and the privacy loss of each release is tracked with opacus' RDP accountant
(Mironov 2017; subsampled Gaussian, Mironov, Talwar, Zhang 2019).
"""

from __future__ import annotations

import secrets

import numpy as np
from opacus.accountants import RDPAccountant


def secure_noise_generator() -> np.random.Generator:
    """A Generator seeded from the operating system's CSPRNG (`secrets`), never from ZO seeds.

    Notes
    -----
    The ZO direction seeds are public; noise derived from them could be subtracted. PCG64 seeded
    with 128 CSPRNG bits is unpredictable to an observer, though it is not itself a CSPRNG; a
    deployment that must resist floating-point side channels (Mironov 2012) should use a
    discrete Gaussian instead (documented in docs/federation.md).
    """
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def add_gaussian_noise(
    total: np.ndarray, *, noise_multiplier: float, sensitivity: float, rng: np.random.Generator
) -> np.ndarray:
    """Return `total + N(0, (noise_multiplier * sensitivity)^2 I)` (float64)."""
    if not noise_multiplier > 0 or not sensitivity > 0:
        raise ValueError(
            f"noise_multiplier and sensitivity must be > 0, got {noise_multiplier}, {sensitivity}"
        )
    std = noise_multiplier * sensitivity
    return np.asarray(total, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(total))


class PrivacyLedger:
    """Tracks epsilon over rounds with opacus' RDPAccountant and enforces a budget.

    Parameters
    ----------
    noise_multiplier
        sigma of every release.
    delta
        the delta at which epsilon is reported.
    epsilon_budget
        a release is refused when epsilon after it would exceed this.
    history
        past releases as (sigma, sample_rate, steps) - the accountant's own checkpoint format,
        so that a resumed server continues the count instead of restarting it at zero.

    Notes
    -----
    Each round is ONE release (one noisy sum). The sample rate q is passed explicitly per round
    (sampled clients / available clients); the RDP bound for q < 1 assumes Poisson sampling.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        delta: float,
        epsilon_budget: float,
        history: list[tuple[float, float, int]] | None = None,
    ) -> None:
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        if not epsilon_budget > 0:
            raise ValueError(f"epsilon_budget must be > 0, got {epsilon_budget}")
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.epsilon_budget = float(epsilon_budget)
        self._accountant = RDPAccountant()
        self._accountant.history = [tuple(h) for h in (history or [])]  # type: ignore[misc]

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(float(s), float(q), int(n)) for s, q, n in self._accountant.history]

    def epsilon(self) -> float:
        """Epsilon spent so far at `delta` (0.0 before the first release)."""
        if not self._accountant.history:
            return 0.0
        return float(self._accountant.get_epsilon(delta=self.delta))

    def epsilon_after(self, sample_rate: float) -> float:
        """Epsilon after one more release at `sample_rate`, without recording it."""
        _check_rate(sample_rate)
        probe = RDPAccountant()
        probe.history = list(self._accountant.history) + [
            (self.noise_multiplier, float(sample_rate), 1)
        ]
        return float(probe.get_epsilon(delta=self.delta))

    def can_release(self, sample_rate: float) -> bool:
        return self.epsilon_after(sample_rate) <= self.epsilon_budget

    def record_release(self, sample_rate: float) -> float:
        """Record one release; refuse (ValueError) if it would exceed the budget. Returns epsilon."""
        eps = self.epsilon_after(sample_rate)
        if eps > self.epsilon_budget:
            raise ValueError(
                f"release refused: epsilon would reach {eps:.3f} > budget {self.epsilon_budget}"
            )
        self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=float(sample_rate))
        return eps


def _check_rate(sample_rate: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
