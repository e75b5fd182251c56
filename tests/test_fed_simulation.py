"""End-to-end Flower simulations (Ray): a 2-client run with DP, a restart, and SecAgg+.

Flower 1.42's `run_simulation` passes an empty run config, so the tests wrap the apps: the server
main gets the run config set before `run_fleet`, and an outermost client mod hands the ClientApp a
Context carrying the same run config (Flower forbids editing the run config in place). Another
outermost mod captures every message a device sends, exactly as it leaves the ClientApp.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from PIL import Image

from client.allowlist import allowlist_mod
from client.client_app import build_client_app, secure_aggregation_mod
from client.state_store import EncryptedStateStore
from server import fleet_state, secure_aggregation
from server.fleet_loop import run_fleet
from zo_core.state import PersonalState
from zo_core.subspace_stats import (
    QUERY_REPLY_KEY,
    STAT_FIELDS,
    WireSchema,
    client_statistic,
    flatten_statistic,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

BACKEND = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 1, "include_dashboard": False}}


def _pickle_this_module_by_value() -> None:
    """Ray ships the ClientApp (and these test mods) to its actors with cloudpickle; the actors
    cannot import this test module by name, so its functions travel by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def config_mod(run_config: dict[str, Any]):  # type: ignore[no-untyped-def]
    def mod(msg: Message, ctx: Context, call_next):  # type: ignore[no-untyped-def]
        merged = Context(run_id=ctx.run_id, node_id=ctx.node_id, node_config=ctx.node_config, state=ctx.state,
                         run_config={**ctx.run_config, **run_config})  # fmt: skip
        return call_next(msg, merged)

    return mod


def capture_mod(directory: str):  # type: ignore[no-untyped-def]
    """Write a description and the raw bytes of every outgoing message."""

    def mod(msg: Message, ctx: Context, call_next):  # type: ignore[no-untyped-def]
        reply = call_next(msg, ctx)
        name = f"{ctx.node_config['partition-id']}-{time.monotonic_ns()}"
        desc: dict[str, Any] = {"type": msg.metadata.message_type, "error": reply.has_error(), "records": {}}
        raw = bytearray()
        if reply.has_content():
            for key, rec in reply.content.items():
                kind = type(rec).__name__
                entry: dict[str, Any] = {"kind": kind, "keys": sorted(rec.keys())}
                if kind == "ArrayRecord":
                    # legacy Parameters travel as .npy bytes (Array shape ()): read the true shape
                    entry["shapes"] = [list(np.load(io.BytesIO(rec[k].data), allow_pickle=False).shape)
                                       for k in rec.keys()]  # fmt: skip
                    for k in rec.keys():
                        raw += rec[k].data
                else:
                    for v in rec.values():
                        for item in v if isinstance(v, list) else [v]:
                            raw += item if isinstance(item, bytes) else str(item).encode()
                desc["records"][key] = entry
        out = Path(directory)
        (out / f"{name}.json").write_text(json.dumps(desc))
        (out / f"{name}.bin").write_bytes(bytes(raw))
        return reply

    return mod


def server_app(run_config: dict[str, Any], results: dict[str, Any]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid, context: Context) -> None:  # type: ignore[no-untyped-def]
        ctx = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                      state=context.state, run_config={**context.run_config, **run_config})  # fmt: skip
        try:
            results["summary"] = run_fleet(grid, ctx)
        except BaseException as exc:  # surfaced by the test, not swallowed by the simulation
            results["error"] = exc
            raise

    return app


def write_photos(directory: Path, seed: int) -> None:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((72, 72)).save(directory / f"{i}.png")


@pytest.fixture()
def fleet_dirs(tmp_path: Path, tiny_model_dir: Path) -> dict[str, Any]:
    for pid in range(2):
        write_photos(tmp_path / "data" / f"partition-{pid}", seed=pid)
    (tmp_path / "capture").mkdir()
    cfg = {
        "num-rounds": 2, "clients-per-round": 2, "min-nodes": 2, "min-replies": 2, "local-steps": 3,
        "probe-steps": 2, "eval-every": 2, "model-dir": str(tiny_model_dir), "sim.data-root": str(tmp_path / "data"),
        "sim.state-root": str(tmp_path / "state"), "run-dir": str(tmp_path / "run"), "basis.rank": 4,
        "dp.enabled": True, "dp.noise-multiplier": 4.0, "dp.epsilon-budget": 50.0,
        "ti.placeholder": "<my-cup>", "ti.initializer": "cup",
    }  # fmt: skip
    return {"root": tmp_path, "cfg": cfg}


def _run(cfg: dict[str, Any], client: ClientApp, n: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    run_simulation(server_app(cfg, results), client, num_supernodes=n, backend_config=BACKEND)  # type: ignore[arg-type]
    if "error" in results:
        raise results["error"]
    return results["summary"]


def test_two_clients_two_rounds_with_dp_then_restart(fleet_dirs: dict[str, Any]) -> None:
    _pickle_this_module_by_value()
    root, cfg = fleet_dirs["root"], fleet_dirs["cfg"]
    client = build_client_app([config_mod(cfg), capture_mod(str(root / "capture"))])
    summary = _run(cfg, client, 2)

    # --- history: two completed rounds, a basis, epsilon accounted every round
    assert summary["completed_rounds"] == 2 and summary["stopped"] is None
    rounds = [json.loads(p.read_text()) for p in sorted((root / "run" / "rounds").glob("round-*.json"))]
    assert [r["status"] for r in rounds] == ["ok", "ok"]
    assert [r["basis_version"] for r in rounds] == [0, 1]  # round 2 ran with round 1's basis
    assert all(r["update"]["contributors"] == 2 and not r["rejected"] and not r["errors"] for r in rounds)
    eps = [r["update"]["epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1] <= 50.0 and summary["epsilon"] == pytest.approx(eps[1])
    assert set(rounds[1]["evaluation"]["metrics"]) == {str(n) for n in rounds[1]["sampled"]}

    # --- every message a device sent: allowlisted records only, no token, no image bytes
    states = {}
    for pid in range(2):
        store = EncryptedStateStore(root / "state" / f"partition-{pid}", root / "state" / f"partition-{pid}" / "device.key")
        states[pid] = PersonalState.from_tensors(store.load()[0])  # type: ignore[index]
        assert states[pid].step == 6
    descs = [json.loads(p.read_text()) for p in sorted((root / "capture").glob("*.json"))]
    blobs = [p.read_bytes() for p in sorted((root / "capture").glob("*.bin"))]
    assert sorted(d["type"] for d in descs) == ["evaluate"] * 2 + ["query"] * 2 + ["train"] * 4
    dim = states[0].theta.numel()
    for d in descs:
        assert not d["error"]
        if d["type"] == "train":
            assert set(d["records"]) == {"fitres.parameters", "fitres.metrics", "fitres.num_examples", "fitres.status"}
            assert d["records"]["fitres.parameters"]["shapes"] == [[dim, dim], [10], [10]]
        elif d["type"] == "evaluate":
            assert d["records"] == {"eval-metrics": {"kind": "MetricRecord", "keys": ["eval-draws", "eval-loss"]}}
        else:
            assert d["records"][QUERY_REPLY_KEY]["keys"] == ["model-fingerprint", "num-train-timesteps", "token-dim"]
    secrets = [s.theta.numpy().tobytes() for s in states.values()]
    secrets += [row.numpy().tobytes()[:64] for s in states.values() for row in s.theta]
    for pid in range(2):
        for img in (root / "data" / f"partition-{pid}").iterdir():
            secrets += [img.read_bytes()[-64:], np.asarray(Image.open(img)).tobytes()[:64]]
    assert not any(secret in blob for secret in secrets for blob in blobs)

    # --- restart: a new server process resumes the run, devices resume their states from disk
    summary2 = _run({**cfg, "num-rounds": 3, "resume": True}, build_client_app([config_mod(cfg)]), 2)
    assert summary2["completed_rounds"] == 3 and summary2["epsilon"] > eps[1]
    r3 = json.loads((root / "run" / "rounds" / "round-0003.json").read_text())
    assert r3["status"] == "ok" and r3["basis_version"] == 2
    for pid in range(2):
        store = EncryptedStateStore(root / "state" / f"partition-{pid}", root / "state" / f"partition-{pid}" / "device.key")
        assert PersonalState.from_tensors(store.load()[0]).step == 9  # type: ignore[index]


# --- SecAgg+: a fast stand-in trainer with known statistics, the real mods and server path ---

DIM, FP = 6, "cd" * 32
SCHEMA = WireSchema(dim=DIM, num_buckets=10, num_train_timesteps=1000)


def known_statistic(pid: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + pid)
    return client_statistic(rng.normal(size=(7, DIM)), rng.integers(0, 1000, 7), rng.uniform(0, 2, 7), SCHEMA)


def stand_in_app(cfg: dict[str, Any]) -> ClientApp:
    app = ClientApp(mods=[config_mod(cfg), allowlist_mod, secure_aggregation_mod, allowlist_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        stats = known_statistic(int(context.node_config["partition-id"]))
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([stats[k] for k in STAT_FIELDS]), 1,
                     {"local-steps": 7.0})  # fmt: skip
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        rec = ConfigRecord({"model-fingerprint": FP, "token-dim": DIM, "num-train-timesteps": 1000})
        return Message(RecordDict({QUERY_REPLY_KEY: rec}), reply_to=msg)

    return app


def test_secagg_with_dp_sum_equals_plain_sum_and_server_never_sees_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pickle_this_module_by_value()
    cfg = {"num-rounds": 1, "clients-per-round": 3, "min-nodes": 3, "min-replies": 3, "basis.rank": 2,
           "secagg.enabled": True, "secagg.num-shares": 3, "secagg.reconstruction-threshold": 2,
           "dp.enabled": True, "dp.noise-multiplier": 2.0, "run-dir": str(tmp_path / "run")}  # fmt: skip
    seen_totals: list[np.ndarray] = []
    seen_params: list[list[bytes]] = []
    absorb, aggregate_fit = fleet_state.FleetState.absorb, secure_aggregation._RoundStrategy.aggregate_fit

    def spy_absorb(self, total, **kw):  # type: ignore[no-untyped-def]
        seen_totals.append(total.copy())
        return absorb(self, total, **kw)

    def spy_aggregate_fit(self, rnd, results, failures):  # type: ignore[no-untyped-def]
        seen_params.extend([list(res.parameters.tensors) for _, res in results])
        return aggregate_fit(self, rnd, results, failures)

    monkeypatch.setattr(fleet_state.FleetState, "absorb", spy_absorb)
    monkeypatch.setattr(secure_aggregation._RoundStrategy, "aggregate_fit", spy_aggregate_fit)
    summary = _run(cfg, stand_in_app(cfg), 3)

    assert summary["completed_rounds"] == 1
    record = json.loads((tmp_path / "run" / "rounds" / "round-0001.json").read_text())
    assert record["status"] == "ok" and record["secure"] and record["update"]["contributors"] == 3
    assert record["update"]["epsilon"] > 0  # DP noise on the secure sum, accounted
    plain = sum(flatten_statistic(known_statistic(pid)) for pid in range(3))
    (secure,) = seen_totals
    # SecAgg+ quantizes [-1, 1] onto 2^22 levels per client: error <= n * 2 / 2^22 per entry
    assert np.abs(secure - plain).max() <= 3 * 2.0 / 2**22 * 2
    # the server-side strategy got 3 FitRes, all carrying the same aggregate, none an individual one
    assert len(seen_params) == 3 and all(p == seen_params[0] for p in seen_params)
    agg = np.concatenate([np.load(io.BytesIO(t), allow_pickle=False).ravel() for t in seen_params[0]])
    for pid in range(3):
        assert np.abs(agg - flatten_statistic(known_statistic(pid))).max() > 1e-3
