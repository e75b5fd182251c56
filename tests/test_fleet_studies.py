"""The studies' own logic: overrides, and the privacy audit's scores on planted directions."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.fleet.backend import TaskResult
from simulations.fleet.fleet_server import SimulatedServer
from simulations.studies.common import apply_overrides, parse_override
from simulations.studies.privacy_audit import TokenAudit, best_line_cos
from zo_core.subspace_stats import COUNT_SHARE, SECOND_MOMENT, SIGNAL_SHARE, WireSchema


def test_overrides_parse_toml_values_and_reach_nested_tables() -> None:
    assert parse_override('fleet.backend="fake"') == ("fleet.backend", "fake")
    assert parse_override("planner.bits=[8, 4]") == ("planner.bits", [8, 4])
    assert parse_override("dp.enabled=false") == ("dp.enabled", False)
    base = {"fleet": {"rounds": 3}}
    out = apply_overrides(base, {"fleet.rounds": 5, "profiles.x.availability": 1.0})
    assert out == {"fleet": {"rounds": 5}, "profiles": {"x": {"availability": 1.0}}}
    assert base == {"fleet": {"rounds": 3}}  # the base is not mutated
    with pytest.raises(ValueError, match="table.key=value"):
        parse_override("rounds=3")


def test_best_line_cos_matches_a_dense_search() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b, v = rng.standard_normal((3, 16))
        v /= np.linalg.norm(v)
        # cos is scale-free: a + t v ~ cos(phi) a + sin(phi) v, and phi = +-pi/2 are the limits t -> +-inf.
        phi = np.linspace(-np.pi / 2, np.pi / 2, 200_001)
        xs = np.cos(phi)[:, None] * a[None, :] + np.sin(phi)[:, None] * v[None, :]
        dense = float(np.max(xs @ b / (np.linalg.norm(xs, axis=1) * np.linalg.norm(b))))
        assert best_line_cos(a, v, b) == pytest.approx(dense, abs=1e-4)
        assert best_line_cos(a, v, b) >= a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) - 1e-12


class _Dev:
    def __init__(self, i: int) -> None:
        self.id = i


def _reply(direction: np.ndarray, schema: WireSchema) -> dict[str, np.ndarray]:
    u = direction / np.linalg.norm(direction)
    share = np.full(schema.num_buckets, 1 / np.sqrt(schema.num_buckets), dtype=np.float32) / np.sqrt(schema.num_buckets)
    return {SECOND_MOMENT: np.outer(u, u).astype(np.float32), SIGNAL_SHARE: share, COUNT_SHARE: share}


def test_audit_sees_a_lone_device_exactly_and_a_summed_one_less() -> None:
    dim = 24
    schema = WireSchema(dim)
    server = SimulatedServer.__new__(SimulatedServer)  # only `schema` is read by the audit
    server.schema = schema
    rng = np.random.default_rng(1)
    init = rng.standard_normal((8, dim))
    deltas = rng.standard_normal((8, dim))
    arrived = []
    for i in range(8):
        res = TaskResult(reply=_reply(deltas[i], schema), metrics={}, fidelity=0.0, forward_items=1, state_sha="",
                         extra={"audit": {"theta": init[i] + deltas[i], "theta_init": init[i]}})
        arrived.append((_Dev(i), res))
    audit = TokenAudit(noise_multiplier=5.0, seed=0)
    audit(1, server, arrived)  # type: ignore[arg-type]
    s = {r["server view"]: r for r in audit.summary()}
    # A device whose whole round moved along one direction is fully exposed without SecAgg ...
    assert s["individual"]["direction |cos| mean"] == pytest.approx(1.0, abs=1e-5)
    assert s["individual"]["token cos mean"] == pytest.approx(1.0, abs=1e-5)
    # ... central DP on the sum does not change what the server holds ...
    assert s["individual + central DP"]["direction |cos| mean"] == s["individual"]["direction |cos| mean"]
    # ... and the sum of 8 devices' moments hides most of each one.
    assert s["secagg sum"]["direction |cos| mean"] < 0.8
    assert s["initializer only"]["token cos mean"] < s["individual"]["token cos mean"]
