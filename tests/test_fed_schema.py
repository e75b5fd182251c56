"""The wire schema and the shared statistics math (zo_core/subspace_stats.py): cheap, no Flower."""

from __future__ import annotations

import numpy as np
import pytest

from zo_core.subspace_stats import (
    BROADCAST_KEYS,
    COUNT_SHARE,
    SECOND_MOMENT,
    SIGNAL_SHARE,
    STAT_FIELDS,
    RoundBroadcast,
    StatisticRejected,
    WireSchema,
    basis_from_second_moment,
    choose_window,
    client_statistic,
    flatten_statistic,
    unflatten_statistic,
    validate_metrics,
    validate_statistic,
)

SCHEMA = WireSchema(dim=16, num_buckets=10, num_train_timesteps=1000)


def _stats(seed: int = 0, steps: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    updates = rng.normal(size=(steps, SCHEMA.dim)) * rng.uniform(1e-4, 1e2, size=(steps, 1))
    ts = rng.integers(500, 900, size=steps)
    sig = rng.uniform(0, 5, size=steps)
    return client_statistic(updates, ts, sig, SCHEMA)


def test_client_statistic_is_bounded_and_valid() -> None:
    s = _stats()
    validate_statistic(s, SCHEMA)
    assert list(s) == list(STAT_FIELDS)
    assert np.trace(s[SECOND_MOMENT]) == pytest.approx(1.0, abs=1e-5)  # unit updates
    assert np.linalg.norm(s[SECOND_MOMENT]) <= 1.0
    assert s[COUNT_SHARE].sum() == pytest.approx(1.0, abs=1e-6)
    assert s[SIGNAL_SHARE].sum() == pytest.approx(1.0, abs=1e-6)
    # only the buckets of [500, 900) were visited
    assert np.all(s[COUNT_SHARE][:5] == 0) and np.all(s[COUNT_SHARE][9:] == 0)


def test_statistic_does_not_depend_on_update_scale() -> None:
    rng = np.random.default_rng(1)
    upd = rng.normal(size=(8, SCHEMA.dim))
    ts, sig = np.full(8, 600), np.ones(8)
    a = client_statistic(upd, ts, sig, SCHEMA)[SECOND_MOMENT]
    b = client_statistic(upd * 1e6, ts, sig, SCHEMA)[SECOND_MOMENT]
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s.__setitem__(SECOND_MOMENT, s[SECOND_MOMENT] * np.float32(50)), "outside|norm"),
        (lambda s: s[SIGNAL_SHARE].__setitem__(0, np.nan), "non-finite"),
        (lambda s: s.__setitem__(COUNT_SHARE, np.zeros(11, np.float32)), "shape"),
        (lambda s: s.__setitem__(SIGNAL_SHARE, s[SIGNAL_SHARE].astype(np.float64)), "dtype"),
        (lambda s: s.__setitem__("theta", np.zeros(3, np.float32)), "names"),
        (lambda s: s.__setitem__(COUNT_SHARE, np.full(10, 0.9, np.float32)), "norm"),
        (lambda s: s.__setitem__(COUNT_SHARE, -np.abs(s[COUNT_SHARE])), ">= 0"),
    ],
)
def test_validate_rejects_off_schema(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    s = _stats()
    mutate(s)
    with pytest.raises(StatisticRejected, match=reason):
        validate_statistic(s, SCHEMA)


def test_validate_rejects_asymmetric_moment() -> None:
    s = _stats()
    m = np.zeros((SCHEMA.dim, SCHEMA.dim), np.float32)
    m[0, 1] = 0.5
    s[SECOND_MOMENT] = m
    with pytest.raises(StatisticRejected, match="symmetric"):
        validate_statistic(s, SCHEMA)


def test_metrics_allowlist() -> None:
    validate_metrics({"loss-first": 0.5, "local-steps": 3})
    with pytest.raises(StatisticRejected, match="allowlist"):
        validate_metrics({"theta-0": 0.1})
    with pytest.raises(StatisticRejected, match="finite"):
        validate_metrics({"loss-last": float("inf")})
    with pytest.raises(StatisticRejected, match="number"):
        validate_metrics({"loss-last": "0.1"})


def test_flatten_roundtrip() -> None:
    s = _stats()
    back = unflatten_statistic(flatten_statistic(s), SCHEMA)
    for k in STAT_FIELDS:
        np.testing.assert_array_equal(back[k], s[k])


def test_basis_recovers_a_planted_direction() -> None:
    rng = np.random.default_rng(2)
    direction = rng.normal(size=SCHEMA.dim)
    direction /= np.linalg.norm(direction)
    upd = 0.2 * rng.normal(size=(200, SCHEMA.dim)) + rng.choice([-1, 1], size=(200, 1)) * direction
    moment = sum(
        client_statistic(upd[i::4], np.full(50, 600), np.ones(50), SCHEMA)[SECOND_MOMENT] for i in range(4)
    )
    basis, evals = basis_from_second_moment(moment, rank=3)
    assert basis.shape == (3, SCHEMA.dim)
    np.testing.assert_allclose(basis @ basis.T, np.eye(3), atol=1e-5)
    assert abs(float(basis[0] @ direction)) > 0.98
    assert evals[0] > evals[1]


def test_choose_window_moves_to_the_signal_and_keeps_ties() -> None:
    a = np.array([0, 0, 0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.4])
    c = np.full(10, 0.1)
    window, density = choose_window(a, c, SCHEMA, width_buckets=4, current=(500, 900), min_count_share=0.05)
    assert window == (600, 1000)  # the last bucket carries 4x the signal per step
    assert density[9] == pytest.approx(4.0)
    flat = np.full(10, 0.1)
    window, _ = choose_window(flat, c, SCHEMA, width_buckets=4, current=(500, 900), min_count_share=0.05)
    assert window == (500, 900)  # ties keep the current window
    window, density = choose_window(flat, np.zeros(10), SCHEMA, width_buckets=4, current=(500, 900),
                                    min_count_share=0.05)  # fmt: skip
    assert window == (500, 900) and np.isnan(density).all()


def test_broadcast_roundtrip_and_strict_keys() -> None:
    basis, _ = basis_from_second_moment(np.diag(np.arange(SCHEMA.dim, dtype=float)), rank=2)
    b = RoundBroadcast(round=2, local_steps=5, n=2, mu=1e-3, puts_low=500, puts_high=900, basis_version=1,
                       basis_weight=0.5, model_fingerprint="ab" * 32, dim=16, num_buckets=10,
                       num_train_timesteps=1000, basis=basis)  # fmt: skip
    cfg = b.to_config()
    assert set(cfg) == BROADCAST_KEYS
    back = RoundBroadcast.from_config(cfg, basis)
    assert back == b
    with pytest.raises(ValueError, match="unknown"):
        RoundBroadcast.from_config({**cfg, "photo": "x"}, basis)
    with pytest.raises(ValueError, match="orthonormal"):
        RoundBroadcast.from_config(cfg, basis * 2)
    with pytest.raises(ValueError, match="PUTS"):
        RoundBroadcast.from_config({**cfg, "puts.high": 1200}, basis)
    grads = RoundBroadcast.from_config({**cfg, "stat.source": "gradients"}, basis)
    assert grads.stat_source == "gradients" and grads.to_config()["stat.source"] == "gradients"
    with pytest.raises(ValueError, match="stat_source"):
        RoundBroadcast.from_config({**cfg, "stat.source": "photos"}, basis)
    with pytest.raises(ValueError, match="must be a string"):
        RoundBroadcast.from_config({**cfg, "stat.source": 1}, basis)


def test_segment_displacements_find_a_drift_hidden_in_step_noise() -> None:
    """ZO steps are mostly noise; a small common drift shows in segment displacements, not in steps."""
    rng = np.random.default_rng(3)
    drift = rng.normal(size=SCHEMA.dim)
    drift /= np.linalg.norm(drift)
    clients = [0.3 * drift + rng.normal(size=(200, SCHEMA.dim)) for _ in range(4)]  # per-step SNR ~ 1/180
    ts, sig = np.full(200, 600), np.ones(200)

    def alignment(segments: int) -> float:
        moment = sum(client_statistic(u, ts, sig, SCHEMA, segments=segments)[SECOND_MOMENT] for u in clients)
        basis, _ = basis_from_second_moment(moment, rank=1)
        return abs(float(basis[0] @ drift))

    assert alignment(segments=2) > 0.85
    assert alignment(segments=0) < alignment(segments=2)
    s = client_statistic(clients[0], ts, sig, SCHEMA, segments=3)
    validate_statistic(s, SCHEMA)
    assert np.linalg.matrix_rank(s[SECOND_MOMENT].astype(np.float64), tol=1e-6) <= 3
