"""Server-side aggregation, robustness, DP accounting, resume and config parsing (no Flower run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.config import BasisConfig, DPConfig, PutsConfig, ServerConfig
from server.fleet_state import FleetState, sum_statistics
from server.privacy import PrivacyLedger, add_gaussian_noise, secure_noise_generator
from zo_core.subspace_stats import (
    SECOND_MOMENT,
    StatisticRejected,
    WireSchema,
    client_statistic,
    flatten_statistic,
    unflatten_statistic,
)

SCHEMA = WireSchema(dim=12, num_buckets=10, num_train_timesteps=1000)


def _honest(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return client_statistic(rng.normal(size=(10, SCHEMA.dim)), rng.integers(500, 900, 10),
                            rng.uniform(0, 1, 10), SCHEMA)  # fmt: skip


def _fleet(dp: DPConfig = DPConfig(), rng: np.random.Generator | None = None) -> FleetState:
    return FleetState(SCHEMA, basis=BasisConfig(rank=3), puts=PutsConfig(), dp=dp, noise_rng=rng)


def test_hostile_replies_are_rejected() -> None:
    honest = [_honest(i) for i in range(3)]
    huge = dict(_honest(9))
    huge[SECOND_MOMENT] = huge[SECOND_MOMENT] * np.float32(1e6)
    nan = dict(_honest(8))
    nan[SECOND_MOMENT] = np.full_like(nan[SECOND_MOMENT], np.nan)
    wrong = dict(_honest(7))
    wrong[SECOND_MOMENT] = np.zeros((SCHEMA.dim + 1, SCHEMA.dim + 1), np.float32)
    for bad in (huge, nan, wrong):
        with pytest.raises(StatisticRejected):
            sum_statistics([*honest, bad], SCHEMA)


def test_an_accepted_hostile_statistic_moves_the_sum_at_most_its_clip() -> None:
    """The worst in-schema reply (a rank-1 spike, norm exactly 1) shifts the sum by <= sensitivity."""
    honest = [_honest(i) for i in range(4)]
    spike = np.zeros(SCHEMA.dim)
    spike[0] = 1.0
    hostile = client_statistic(np.tile(spike, (5, 1)), np.full(5, 999), np.full(5, 1e9), SCHEMA)
    base = sum_statistics(honest, SCHEMA)
    with_hostile = sum_statistics([*honest, hostile], SCHEMA)
    assert np.linalg.norm(with_hostile - base) <= SCHEMA.sensitivity + 1e-6
    # and its effect on the mean moment is bounded by 1/n in Frobenius norm
    m0 = unflatten_statistic(base / 4, SCHEMA)[SECOND_MOMENT]
    m1 = unflatten_statistic(with_hostile / 5, SCHEMA)[SECOND_MOMENT]
    assert np.linalg.norm(m1 - m0) <= 2 / 5 + 1e-6


def test_absorb_builds_basis_and_moves_window() -> None:
    fleet = _fleet()
    stats = [_honest(i) for i in range(3)]
    upd = fleet.absorb(sum_statistics(stats, SCHEMA), contributors=3, sample_rate=1.0)
    assert upd.basis_version == 1 and fleet.basis is not None
    np.testing.assert_allclose(fleet.basis @ fleet.basis.T, np.eye(3), atol=1e-5)
    assert upd.epsilon is None
    assert upd.window[1] - upd.window[0] == 400


def test_dp_noise_scale_and_source() -> None:
    rng = np.random.default_rng(0)
    noisy = add_gaussian_noise(np.zeros(200_000), noise_multiplier=2.0, sensitivity=np.sqrt(3), rng=rng)
    assert np.std(noisy) == pytest.approx(2.0 * np.sqrt(3), rel=0.02)
    a, b = secure_noise_generator(), secure_noise_generator()
    assert a.normal() != b.normal()  # CSPRNG-seeded: two generators never repeat each other


def test_ledger_golden_epsilon_and_budget() -> None:
    ledger = PrivacyLedger(noise_multiplier=1.0, delta=1e-5, epsilon_budget=1e9)
    for _ in range(100):
        ledger.record_release(1.0)
    assert ledger.epsilon() == pytest.approx(96, rel=0.05)  # flower.md: q=1, sigma=1, 100 releases
    tight = PrivacyLedger(noise_multiplier=6.4, delta=1e-5, epsilon_budget=8.0, history=[(6.4, 1.0, 99)])
    assert tight.epsilon() < 8.0
    small = PrivacyLedger(noise_multiplier=3.0, delta=1e-5, epsilon_budget=5.0)
    small.record_release(1.0)
    eps_before = small.epsilon()
    while small.can_release(1.0):
        small.record_release(1.0)
    with pytest.raises(ValueError, match="budget"):
        small.record_release(1.0)
    assert eps_before < small.epsilon() <= 5.0


def test_dp_fleet_accounts_every_release() -> None:
    fleet = _fleet(DPConfig(enabled=True, noise_multiplier=2.0, epsilon_budget=50.0), np.random.default_rng(1))
    total = sum_statistics([_honest(i) for i in range(4)], SCHEMA)
    e1 = fleet.absorb(total, contributors=4, sample_rate=0.5).epsilon
    e2 = fleet.absorb(total, contributors=4, sample_rate=0.5).epsilon
    assert e1 is not None and e2 is not None and 0 < e1 < e2
    with pytest.raises(ValueError, match="noise generator"):
        _fleet(DPConfig(enabled=True), None)


def test_resume_restores_state_and_ledger(tmp_path: Path) -> None:
    dp = DPConfig(enabled=True, noise_multiplier=3.0, epsilon_budget=50.0)
    fleet = _fleet(dp, np.random.default_rng(2))
    fleet.absorb(sum_statistics([_honest(i) for i in range(3)], SCHEMA), contributors=3, sample_rate=1.0)
    fleet.save(tmp_path)
    again = _fleet(dp, np.random.default_rng(3))
    again.load(tmp_path)
    np.testing.assert_array_equal(again.moment, fleet.moment)
    np.testing.assert_array_equal(again.basis, fleet.basis)  # type: ignore[arg-type]
    assert again.window == fleet.window and again.basis_version == 1
    assert again.ledger is not None and again.ledger.epsilon() == pytest.approx(fleet.ledger.epsilon())  # type: ignore[union-attr]
    with pytest.raises(FileNotFoundError):
        _fleet().load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="DP"):
        _fleet().load(tmp_path)


def test_secagg_range_holds_every_statistic() -> None:
    flat = flatten_statistic(_honest(3))
    assert np.abs(flat).max() <= 1.0  # SecAgg+ clipping_range = 1.0 never clips an honest client


def test_server_config_rejects_unknown_keys_and_bad_values() -> None:
    cfg = ServerConfig.from_run_config({"num-rounds": 2, "dp.enabled": True, "dp.noise-multiplier": 2.0,
                                        "model-dir": "", "zo.lr": 0.01})  # fmt: skip
    assert cfg.fleet.num_rounds == 2 and cfg.dp.enabled and cfg.dp.noise_multiplier == 2.0
    with pytest.raises(ValueError, match="unknown run-config keys"):
        ServerConfig.from_run_config({"dp.nosie-multiplier": 2.0})
    with pytest.raises(ValueError, match="noise-multiplier"):
        ServerConfig.from_run_config({"dp.noise-multiplier": 0.0})
    with pytest.raises(ValueError, match="min-replies"):
        ServerConfig.from_run_config({"min-replies": 3, "clients-per-round": 2})
    assert ServerConfig.from_run_config({"basis.source": "gradients"}).basis.source == "gradients"
    with pytest.raises(ValueError, match="basis.source"):
        ServerConfig.from_run_config({"basis.source": "tokens"})
    with pytest.raises(ValueError, match="bucket edges"):
        FleetState(SCHEMA, basis=BasisConfig(rank=3), puts=PutsConfig(low=510), dp=DPConfig(), noise_rng=None)
