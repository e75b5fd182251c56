"""The server loop against a fake Grid with hand-built replies: dropouts, error and hostile replies,
min-replies, DP budget, resume. No Flower run, no model."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from server.fleet_loop import run_fleet
from server.wire import parse_fit_reply
from zo_core.subspace_stats import (
    QUERY_REPLY_KEY,
    STAT_FIELDS,
    RoundBroadcast,
    StatisticRejected,
    WireSchema,
    client_statistic,
)

DIM, FP = 8, "ef" * 32
SCHEMA = WireSchema(dim=DIM, num_buckets=10, num_train_timesteps=1000)
Behaviour = Callable[[Message], Message | None]  # None = the node drops out


@pytest.fixture(autouse=True)
def task_identity() -> Iterable[None]:
    """Messages built by server code take their run id from the process's task identity."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = None, None, None


def fit_reply(msg: Message, arrays: list[np.ndarray], num_examples: int = 1) -> Message:
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, {"local-steps": 3.0})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def honest(seed: int) -> Behaviour:
    rng = np.random.default_rng(seed)
    stats = client_statistic(rng.normal(size=(6, DIM)), rng.integers(0, 1000, 6), rng.uniform(0, 1, 6), SCHEMA)
    return lambda msg: fit_reply(msg, [stats[k] for k in STAT_FIELDS])


def nan_stats(msg: Message) -> Message:
    return fit_reply(msg, [np.full((DIM, DIM), np.nan, np.float32), np.zeros(10, np.float32), np.zeros(10, np.float32)])


def huge_stats(msg: Message) -> Message:
    return fit_reply(msg, [np.eye(DIM, dtype=np.float32) * 1e6, np.zeros(10, np.float32), np.zeros(10, np.float32)])


def error_reply(msg: Message) -> Message:
    return Message(Error(code=2, reason="device crashed"), reply_to=msg)


class FakeGrid:
    """Answers the model query for every node, then train messages by each node's behaviour."""

    def __init__(self, behaviours: dict[int, Behaviour], fingerprints: dict[int, str] | None = None) -> None:
        self.behaviours = behaviours
        self.fingerprints = fingerprints or {}
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.behaviours)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            nid = msg.metadata.dst_node_id
            if msg.metadata.message_type == MessageType.QUERY:
                rec = ConfigRecord({"model-fingerprint": self.fingerprints.get(nid, FP), "token-dim": DIM,
                                    "num-train-timesteps": 1000})  # fmt: skip
                reply: Message | None = Message(RecordDict({QUERY_REPLY_KEY: rec}), reply_to=msg)
            else:
                reply = self.behaviours[nid](msg)
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = nid  # the link stamps the sender
                replies.append(reply)
        return replies


def run(grid: FakeGrid, tmp: Path, **cfg: Any) -> dict[str, Any]:
    config = {"num-rounds": 2, "clients-per-round": len(grid.behaviours), "min-nodes": len(grid.behaviours),
              "min-replies": 1, "basis.rank": 3, "run-dir": str(tmp / "run"), "wait-nodes-timeout-s": 5.0, **cfg}  # fmt: skip
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)  # type: ignore[arg-type]
    return run_fleet(grid, ctx, noise_rng=np.random.default_rng(0))  # type: ignore[arg-type]


def rounds(tmp: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((tmp / "run" / "rounds").glob("round-*.json"))]


def test_dropouts_errors_and_hostile_replies_are_counted_and_dropped(tmp_path: Path) -> None:
    grid = FakeGrid({1: honest(1), 2: nan_stats, 3: huge_stats, 4: error_reply, 5: lambda m: None, 6: honest(6)})
    summary = run(grid, tmp_path)
    assert summary["completed_rounds"] == 2
    r1, r2 = rounds(tmp_path)
    assert r1["status"] == "ok" and r1["update"]["contributors"] == 2
    assert set(r1["rejected"]) == {"2", "3"} and "non-finite" in r1["rejected"]["2"]
    assert "outside" in r1["rejected"]["3"] or "norm" in r1["rejected"]["3"]
    assert r1["errors"] == {"4": "2: device crashed"} and r1["dropped"] == [5]
    assert r2["basis_version"] == 1
    # the basis the hostile nodes could not touch: same as a run with only the honest two
    clean = FakeGrid({1: honest(1), 6: honest(6)})
    run(clean, tmp_path / "clean")
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    train_clean = [m for m in clean.sent if m.metadata.message_type == MessageType.TRAIN]
    b = compat.recorddict_to_fitins(train[-1].content, True).parameters.tensors
    b_clean = compat.recorddict_to_fitins(train_clean[-1].content, True).parameters.tensors
    assert b == b_clean


def test_round_fails_below_min_replies_and_the_basis_stays(tmp_path: Path) -> None:
    grid = FakeGrid({1: honest(1), 2: error_reply, 3: lambda m: None})
    run(grid, tmp_path, **{"min-replies": 2})
    r1, r2 = rounds(tmp_path)
    assert r1["status"] == r2["status"] == "failed" and "min-replies" in r1["reason"]
    assert r2["basis_version"] == 0


def test_dp_budget_stops_the_run_and_refuses_to_start(tmp_path: Path) -> None:
    grid = FakeGrid({1: honest(1), 2: honest(2)})
    summary = run(grid, tmp_path, **{"num-rounds": 10, "dp.enabled": True, "dp.noise-multiplier": 3.0,
                                     "dp.epsilon-budget": 4.0})  # fmt: skip
    done = rounds(tmp_path)
    assert 1 <= len(done) < 10 and summary["stopped"] and "budget" in summary["stopped"]
    assert all(r["update"]["epsilon"] <= 4.0 for r in done)
    with pytest.raises(ValueError, match="below the epsilon of a single round"):
        run(grid, tmp_path / "b", **{"dp.enabled": True, "dp.noise-multiplier": 0.5, "dp.epsilon-budget": 1.0})


def test_resume_continues_and_a_used_run_dir_is_refused(tmp_path: Path) -> None:
    grid = FakeGrid({1: honest(1), 2: honest(2)})
    run(grid, tmp_path, **{"num-rounds": 1})
    with pytest.raises(ValueError, match="resume=true"):
        run(grid, tmp_path, **{"num-rounds": 2})
    summary = run(grid, tmp_path, **{"num-rounds": 2, "resume": True})
    assert summary["completed_rounds"] == 2 and [r["round"] for r in rounds(tmp_path)] == [1, 2]
    assert rounds(tmp_path)[1]["basis_version"] == 1
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        run(grid, tmp_path / "fresh", **{"resume": True})


def test_nodes_on_another_model_are_reported_and_fail_their_rounds(tmp_path: Path) -> None:
    grid = FakeGrid({1: honest(1), 2: honest(2), 3: error_reply}, fingerprints={3: "00" * 32})
    summary = run(grid, tmp_path, **{"num-rounds": 1})
    assert summary["model_fingerprint"] == FP and "3" in summary["query_problems"]
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    b = RoundBroadcast.from_config(dict(train[0].content.config_records["fitins.config"]), None)
    assert b.model_fingerprint == FP  # every node is told which model the round is for


def test_parse_fit_reply_rejects_what_a_compromised_device_could_send() -> None:
    msg_like = honest(1)
    with pytest.raises(StatisticRejected, match="num_examples"):
        parse_fit_reply(fit_reply(_dummy(), [np.zeros((DIM, DIM), np.float32), np.zeros(10, np.float32),
                                             np.zeros(10, np.float32)], num_examples=500).content, SCHEMA)  # fmt: skip
    bad = msg_like(_dummy()).content
    bad.array_records["fitres.parameters"]["0"].__dict__["data"] = b"not a numpy array"
    with pytest.raises(StatisticRejected, match="unparseable"):
        parse_fit_reply(bad, SCHEMA)
    extra = msg_like(_dummy()).content
    extra["token"] = ConfigRecord({"theta": "0.1,0.2"})
    with pytest.raises(StatisticRejected, match="allowlisted"):
        parse_fit_reply(extra, SCHEMA)


def _dummy() -> Message:
    return Message(RecordDict(), dst_node_id=9, message_type=MessageType.TRAIN)
