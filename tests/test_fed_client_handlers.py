"""ClientApp handlers and the allowlist mod, driven by hand-built Message / Context (no Flower run)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.compat.common import recorddict_compat as compat
from PIL import Image

from client.allowlist import allowlist_mod
from client.client_app import MODELS, build_client_app
from client.state_store import EncryptedStateStore
from server.wire import fit_content, parse_fit_reply
from zo_core.state import PersonalState
from zo_core.subspace_stats import (
    QUERY_CONFIG_KEY,
    QUERY_REPLY_KEY,
    STAT_FIELDS,
    RoundBroadcast,
    WireSchema,
    basis_from_second_moment,
    client_statistic,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def make_message(content: RecordDict, mtype: str, node_id: int = 7) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=node_id,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                    message_type=mtype)  # fmt: skip
    return Message(content=content, metadata=meta)


def photos(directory: Path, n: int = 3, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((72, 72), Image.BILINEAR).save(directory / f"p{i}.png")
    return directory


@pytest.fixture()
def device(tmp_path: Path, tiny_model_dir: Path) -> Context:
    node_config = {"data-dir": str(photos(tmp_path / "photos")), "state-dir": str(tmp_path / "state"),
                   "model-dir": str(tiny_model_dir), "placeholder": "<my-cup>", "initializer": "cup"}  # fmt: skip
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})  # type: ignore[arg-type]


def broadcast_for(model, rnd: int = 1, basis: np.ndarray | None = None, **kw) -> RoundBroadcast:  # type: ignore[no-untyped-def]
    args = dict(round=rnd, local_steps=3, probe_steps=2, n=2, mu=1e-3, puts_low=500, puts_high=900,
                basis_version=0 if basis is None else 1, basis_weight=0.0 if basis is None else 0.5,
                model_fingerprint=model.fingerprint, dim=model.token_dim, num_buckets=10,
                num_train_timesteps=model.num_train_timesteps, basis=basis)  # fmt: skip
    args.update(kw)
    return RoundBroadcast(**args)  # type: ignore[arg-type]


def test_query_reports_only_model_facts(device: Context, tiny_model_dir: Path) -> None:
    app = build_client_app()
    reply = app(make_message(RecordDict({QUERY_CONFIG_KEY: ConfigRecord({"ask": "model"})}), MessageType.QUERY), device)
    assert not reply.has_error()
    rec = reply.content.config_records[QUERY_REPLY_KEY]
    model = MODELS.model(str(tiny_model_dir), "none")
    assert dict(rec) == {"model-fingerprint": model.fingerprint, "token-dim": model.token_dim,
                         "num-train-timesteps": model.num_train_timesteps}  # fmt: skip


def test_train_two_rounds_persists_and_resumes(device: Context, tiny_model_dir: Path, tmp_path: Path) -> None:
    app = build_client_app()
    model = MODELS.model(str(tiny_model_dir), "none")
    loads = MODELS.loads
    schema = WireSchema(model.token_dim, 10, model.num_train_timesteps)
    reply = app(make_message(fit_content(broadcast_for(model)), MessageType.TRAIN), device)
    assert not reply.has_error(), reply.error
    stats, metrics = parse_fit_reply(reply.content, schema)  # the server's validation accepts it
    assert metrics["local-steps"] == 3 and metrics["forward-passes"] == (3 + 2) * 3
    store = EncryptedStateStore(tmp_path / "state", tmp_path / "state" / "device.key")
    saved = store.load()
    assert saved is not None and saved[1]["round"] == "1"
    state1 = PersonalState.from_tensors(saved[0])
    assert state1.step == 3
    # round 2 with a basis, as after a restart: a fresh ClientApp, the state comes from disk
    basis, _ = basis_from_second_moment(stats["second-moment"].astype(np.float64) + np.eye(model.token_dim), 4)
    reply2 = build_client_app()(make_message(fit_content(broadcast_for(model, 2, basis)), MessageType.TRAIN), device)
    assert not reply2.has_error(), reply2.error
    state2 = PersonalState.from_tensors(store.load()[0])  # type: ignore[index]
    assert state2.step == 6 and not torch.equal(state2.theta, state1.theta)
    assert MODELS.loads == loads  # the model was loaded once per process, not per round


def test_gradient_statistic_is_valid_and_differs_from_the_update_statistic(
        device: Context, tiny_model_dir: Path, tmp_path: Path) -> None:
    model = MODELS.model(str(tiny_model_dir), "none")
    schema = WireSchema(model.token_dim, 10, model.num_train_timesteps)
    moments = {}
    for source in ("updates", "gradients"):
        ctx = Context(run_id=1, node_id=7, run_config={}, state=RecordDict(),  # type: ignore[arg-type]
                      node_config={**device.node_config, "state-dir": str(tmp_path / source)})
        reply = build_client_app()(
            make_message(fit_content(broadcast_for(model, stat_source=source)), MessageType.TRAIN), ctx)
        assert not reply.has_error(), reply.error
        moments[source] = parse_fit_reply(reply.content, schema)[0]["second-moment"]
    # Same seed, same steps: only the vectors behind the second moment differ.
    assert not np.allclose(moments["updates"], moments["gradients"])


def test_client_refuses_another_models_round(device: Context, tiny_model_dir: Path, tmp_path: Path) -> None:
    model = MODELS.model(str(tiny_model_dir), "none")
    bad = broadcast_for(model, model_fingerprint="0" * 64)
    reply = build_client_app()(make_message(fit_content(bad), MessageType.TRAIN), device)
    assert reply.has_error() and "FingerprintMismatch" in reply.error.reason
    assert not (tmp_path / "state" / "personal-state.enc").exists()


def test_wrong_key_fails_the_round_without_touching_state(device: Context, tiny_model_dir: Path,
                                                          tmp_path: Path) -> None:  # fmt: skip
    model = MODELS.model(str(tiny_model_dir), "none")
    app = build_client_app()
    assert not app(make_message(fit_content(broadcast_for(model)), MessageType.TRAIN), device).has_error()
    state_file = tmp_path / "state" / "personal-state.enc"
    before = state_file.read_bytes()
    key = tmp_path / "state" / "device.key"
    key.write_bytes(bytes(32))
    reply = app(make_message(fit_content(broadcast_for(model, 2)), MessageType.TRAIN), device)
    assert reply.has_error() and "StateKeyError" in reply.error.reason
    assert state_file.read_bytes() == before


def test_evaluate_reports_only_metrics(device: Context, tiny_model_dir: Path) -> None:
    model = MODELS.model(str(tiny_model_dir), "none")
    cfg = ConfigRecord({"round": 1, "model-fingerprint": model.fingerprint, "puts.low": 500, "puts.high": 900})
    reply = build_client_app()(make_message(RecordDict({"eval-config": cfg}), MessageType.EVALUATE), device)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"eval-metrics"}
    m = reply.content.metric_records["eval-metrics"]
    assert set(m) == {"eval-loss", "eval-draws"} and np.isfinite(m["eval-loss"])


# --- the allowlist against a misbehaving app (a stand-in for a compromised or buggy handler) ---


def _fake_app(make_reply) -> ClientApp:  # type: ignore[no-untyped-def]
    app = ClientApp(mods=[allowlist_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return make_reply(msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return make_reply(msg)

    return app


def _fit_reply(msg: Message, arrays: list[np.ndarray], metrics: dict | None = None) -> Message:  # type: ignore[type-arg]
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, metrics or {"loss-last": 0.1})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


FP = "ab" * 32
SCHEMA = WireSchema(dim=8, num_buckets=10, num_train_timesteps=1000)


def _train_msg() -> Message:
    b = RoundBroadcast(round=1, local_steps=1, n=2, mu=1e-3, puts_low=500, puts_high=900, basis_version=0,
                       basis_weight=0.0, model_fingerprint=FP, dim=8, num_buckets=10, num_train_timesteps=1000)  # fmt: skip
    return make_message(fit_content(b), MessageType.TRAIN)


def _good() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    s = client_statistic(rng.normal(size=(5, 8)), [600] * 5, [1.0] * 5, SCHEMA)
    return [s[k] for k in STAT_FIELDS]


CTX = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_allowlist_passes_a_conforming_reply() -> None:
    reply = _fake_app(lambda m: _fit_reply(m, _good()))(_train_msg(), CTX)
    assert not reply.has_error()
    np.testing.assert_array_equal(parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, True).parameters)[0],
                                  _good()[0])  # fmt: skip


@pytest.mark.parametrize(
    ("make_reply", "reason"),
    [
        (lambda m: _fit_reply(m, [_good()[0] * np.float32(40), *_good()[1:]]), "outside|norm"),
        (lambda m: _fit_reply(m, [np.full((8, 8), np.nan, np.float32), *_good()[1:]]), "non-finite"),
        (lambda m: _fit_reply(m, [np.zeros((9, 9), np.float32), *_good()[1:]]), "shape"),
        (lambda m: _fit_reply(m, [*_good(), np.zeros(8, np.float32)]), "4 arrays"),
        (lambda m: _fit_reply(m, _good(), {"theta-0": 0.3}), "allowlist"),
        (lambda m: Message(RecordDict({**compat.fitres_to_recorddict(FitRes(Status(Code.OK, ""),
            ndarrays_to_parameters(_good()), 1, {}), True), "token": ConfigRecord({"t": b"x"})}), reply_to=m),
         "unknown"),  # fmt: skip
        (lambda m: Message(RecordDict({"image": MetricRecord({"px": 1.0})}), reply_to=m), "records"),
    ],
)
def test_allowlist_refuses_and_never_sends(make_reply, reason: str) -> None:  # type: ignore[no-untyped-def]
    reply = _fake_app(make_reply)(_train_msg(), CTX)
    assert reply.has_error() and reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert not reply.has_content()  # nothing of the refused reply leaves
    import re

    assert re.search(reason, reply.error.reason), reply.error.reason


def test_allowlist_refuses_a_query_reply_with_extra_fields() -> None:
    def make(m: Message) -> Message:
        rec = ConfigRecord({"model-fingerprint": FP, "token-dim": 8, "num-train-timesteps": 1000, "theta": "1,2"})
        return Message(RecordDict({QUERY_REPLY_KEY: rec}), reply_to=m)

    reply = _fake_app(make)(make_message(RecordDict({QUERY_CONFIG_KEY: ConfigRecord({"ask": "model"})}),
                                         MessageType.QUERY), CTX)  # fmt: skip
    assert reply.has_error() and "fields" in reply.error.reason


def test_device_over_its_memory_budget_refuses_the_round(device: Context, tiny_model_dir: Path, tmp_path: Path) -> None:
    model = MODELS.model(str(tiny_model_dir), "none")
    tight = Context(run_id=1, node_id=7, node_config={**device.node_config, "memory-budget-mib": 1.0},
                    state=RecordDict(), run_config={})  # type: ignore[arg-type]  # fmt: skip
    reply = build_client_app()(make_message(fit_content(broadcast_for(model)), MessageType.TRAIN), tight)
    assert reply.has_error() and "MemoryError" in reply.error.reason and "budget" in reply.error.reason
    assert not (tmp_path / "state" / "personal-state.enc").exists()
