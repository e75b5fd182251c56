"""The server's round loop: wait for nodes, sample, broadcast, collect, aggregate, record.

One round, as data (DESIGN.md): broadcast (round, step budget, n, mu, PUTS window, basis and
its version, model fingerprint) -> each sampled device trains locally and replies with its
bounded statistic -> the server validates (plain path) or receives the secure sum (SecAgg+),
adds calibrated noise (DP), updates the basis and the window, and writes a JSON record.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.server import Grid

from server.config import ServerConfig
from server.fleet_state import FleetState, sum_statistics
from server.privacy import PrivacyLedger, secure_noise_generator
from server.secure_aggregation import run_secure_round
from server.wire import fit_content, parse_eval_reply, parse_fit_reply, parse_query_reply
from zo_core.subspace_stats import (
    EVAL_CONFIG_KEY,
    QUERY_CONFIG_KEY,
    RoundBroadcast,
    StatisticRejected,
    WireSchema,
)

log = logging.getLogger("fedzoodip.server")


class RunRecorder:
    """Writes `run.json` and one `rounds/round-XXXX.json` per round, atomically."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.rounds_dir = run_dir / "rounds"
        self.rounds_dir.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, payload: dict[str, Any]) -> Path:
        path = self.run_dir / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
        tmp.replace(path)
        return path

    def write_round(self, rnd: int, payload: dict[str, Any]) -> Path:
        return self.write(f"rounds/round-{rnd:04d}.json", payload)

    def rounds(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.rounds_dir.glob("round-*.json"))]


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float, poll_s: float = 1.0) -> list[int]:
    """Block until `minimum` nodes are connected; RuntimeError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} of the required {minimum} nodes connected within {timeout_s} s"
            )
        time.sleep(poll_s)


def query_model(grid: Grid, nodes: list[int], cfg: ServerConfig) -> tuple[str, int, int, dict[str, str]]:
    """Ask every node which model it holds; return (fingerprint, D, T, per-node problems).

    With `model-fingerprint` set, that one is required; otherwise the fingerprint most nodes
    report is adopted (and recorded). Nodes on another model will refuse every round.
    """
    msgs = [
        Message(
            RecordDict({QUERY_CONFIG_KEY: ConfigRecord({"ask": "model"})}),
            dst_node_id=nid,
            message_type=MessageType.QUERY,
            group_id="model-query",
        )
        for nid in nodes
    ]
    answers: dict[int, tuple[str, int, int]] = {}
    problems: dict[str, str] = {}
    for reply in grid.send_and_receive(msgs, timeout=cfg.fleet.round_timeout_s):
        nid = reply.metadata.src_node_id
        if reply.has_error():
            problems[str(nid)] = f"error reply: {reply.error.code}: {reply.error.reason}"
            continue
        try:
            answers[nid] = parse_query_reply(reply)
        except StatisticRejected as exc:
            problems[str(nid)] = str(exc)
    if not answers:
        raise RuntimeError(f"no node answered the model query: {problems}")
    if cfg.fleet.model_fingerprint:
        matching = [a for a in answers.values() if a[0] == cfg.fleet.model_fingerprint]
        if not matching:
            raise RuntimeError(
                f"no node holds the configured model {cfg.fleet.model_fingerprint[:12]}...: "
                f"nodes report {sorted({a[0][:12] for a in answers.values()})}"
            )
        chosen = matching[0]
    else:
        chosen = Counter(answers.values()).most_common(1)[0][0]
    for nid, a in answers.items():
        if a != chosen:
            problems[str(nid)] = f"holds another model ({a[0][:12]}..., D={a[1]})"
    return chosen[0], chosen[1], chosen[2], problems


def sample_nodes(nodes: list[int], k: int, seed: int, rnd: int) -> list[int]:
    """A reproducible uniform sample of k nodes for round `rnd` (public randomness)."""
    rng = np.random.default_rng([seed, rnd])
    ordered = sorted(nodes)
    # Sample indices, not ids: node ids are 64-bit unsigned and numpy would turn them into floats.
    return sorted(ordered[int(i)] for i in rng.choice(len(ordered), size=k, replace=False))


def run_fleet(
    grid: Grid, context: Context, *, noise_rng: np.random.Generator | None = None
) -> dict[str, Any]:
    """The whole federated run; returns the run summary (also written to run.json).

    `noise_rng` is for tests only: production leaves it None and DP noise comes from a
    CSPRNG-seeded generator.
    """
    cfg = ServerConfig.from_run_config(context.run_config)
    run_dir = Path(cfg.fleet.run_dir)
    state_dir = run_dir / "state"
    if state_dir.exists() and not cfg.fleet.resume:
        raise ValueError(
            f"{run_dir} holds a previous run; set resume=true to continue it or choose a new run-dir"
        )
    if cfg.fleet.resume and not (state_dir / "fleet-state.json").is_file():
        raise FileNotFoundError(f"resume=true but there is no run to resume in {run_dir}")
    if cfg.dp.enabled:
        # Refuse to start when even one round at sample rate 1 (the worst case) is over budget.
        probe = PrivacyLedger(
            noise_multiplier=cfg.dp.noise_multiplier,
            delta=cfg.dp.delta,
            epsilon_budget=cfg.dp.epsilon_budget,
        )
        if not probe.can_release(1.0):
            raise ValueError(
                f"dp.epsilon-budget {cfg.dp.epsilon_budget} is below the epsilon of a single "
                f"round ({probe.epsilon_after(1.0):.3f}) at noise multiplier {cfg.dp.noise_multiplier}"
            )
    recorder = RunRecorder(run_dir)
    nodes = wait_for_nodes(grid, cfg.fleet.min_nodes, cfg.fleet.wait_nodes_timeout_s)
    fingerprint, dim, steps_t, query_problems = query_model(grid, nodes, cfg)
    schema = WireSchema(dim=dim, num_buckets=cfg.puts.buckets, num_train_timesteps=steps_t)
    fleet = FleetState(
        schema,
        basis=cfg.basis,
        puts=cfg.puts,
        dp=cfg.dp,
        noise_rng=(noise_rng or secure_noise_generator()) if cfg.dp.enabled else None,
    )
    start = 1
    if cfg.fleet.resume:
        fleet.load(state_dir)
        previous = json.loads((run_dir / "run.json").read_text())
        if previous["model_fingerprint"] != fingerprint:
            raise ValueError("cannot resume: the fleet now runs another model")
        start = int(previous["completed_rounds"]) + 1
    summary: dict[str, Any] = {
        "model_fingerprint": fingerprint,
        "dim": dim,
        "num_train_timesteps": steps_t,
        "config": {k: v for k, v in sorted(context.run_config.items())},
        "query_problems": query_problems,
        "completed_rounds": start - 1,
        "stopped": None,
    }
    recorder.write("run.json", summary)

    for rnd in range(start, cfg.fleet.num_rounds + 1):
        t0 = time.monotonic()
        available = sorted(grid.get_node_ids())
        record: dict[str, Any] = {"round": rnd, "available": len(available)}
        if len(available) < cfg.fleet.min_replies:
            record.update(status="failed", reason=f"only {len(available)} nodes available")
            recorder.write_round(rnd, record)
            summary["completed_rounds"] = rnd
            recorder.write("run.json", summary)
            continue
        k = min(cfg.fleet.clients_per_round, len(available))
        sampled = sample_nodes(available, k, cfg.fleet.seed, rnd)
        sample_rate = len(sampled) / len(available)
        if fleet.ledger is not None and not fleet.ledger.can_release(sample_rate):
            summary["stopped"] = (
                f"round {rnd}: epsilon would reach {fleet.ledger.epsilon_after(sample_rate):.3f} "
                f"> budget {cfg.dp.epsilon_budget}"
            )
            log.warning("stopping: %s", summary["stopped"])
            break
        broadcast = RoundBroadcast(
            round=rnd,
            local_steps=cfg.fleet.local_steps,
            probe_steps=cfg.fleet.probe_steps,
            stat_segments=cfg.basis.segments,
            stat_source=cfg.basis.source,
            n=cfg.zo.n,
            mu=cfg.zo.mu,
            puts_low=fleet.window[0],
            puts_high=fleet.window[1],
            basis_version=fleet.basis_version,
            basis_weight=cfg.basis.weight if fleet.basis is not None else 0.0,
            model_fingerprint=fingerprint,
            dim=dim,
            num_buckets=schema.num_buckets,
            num_train_timesteps=steps_t,
            basis=fleet.basis,
        )
        record.update(
            sampled=sampled,
            sample_rate=sample_rate,
            window=list(broadcast_window(broadcast)),
            basis_version=broadcast.basis_version,
        )
        if cfg.secagg.enabled:
            sec = run_secure_round(
                grid, context, broadcast=broadcast, node_ids=sampled, schema=schema, cfg=cfg.secagg
            )
            total, contributors = sec.total, sec.contributors
            record.update(
                secure=True,
                metrics={str(n): m for n, m in sec.metrics.items()},
                rejected={str(n): r for n, r in sec.rejected.items()},
                dropped=sorted(set(sampled) - set(sec.metrics) - {int(n) for n in sec.rejected}),
            )
        else:
            total, contributors, plain = _plain_round(grid, broadcast, sampled, schema, cfg)
            record.update(secure=False, **plain)
        if total is None or contributors < cfg.fleet.min_replies:
            record.update(
                status="failed",
                reason=f"{contributors} valid replies < min-replies {cfg.fleet.min_replies}",
            )
            log.warning("round %d failed: %s", rnd, record["reason"])
        else:
            update = fleet.absorb(total, contributors=contributors, sample_rate=sample_rate)
            fleet.save(state_dir)
            record.update(status="ok", update=asdict(update))
            if cfg.fleet.eval_every and rnd % cfg.fleet.eval_every == 0:
                record["evaluation"] = _evaluate_round(grid, broadcast, sampled, cfg)
        record["wall_s"] = time.monotonic() - t0
        recorder.write_round(rnd, record)
        summary["completed_rounds"] = rnd
        summary["epsilon"] = fleet.ledger.epsilon() if fleet.ledger is not None else None
        recorder.write("run.json", summary)
        log.info("round %d: %s, %d contributors", rnd, record["status"], contributors)
    return summary


def broadcast_window(b: RoundBroadcast) -> tuple[int, int]:
    return (b.puts_low, b.puts_high)


def _plain_round(
    grid: Grid,
    broadcast: RoundBroadcast,
    sampled: list[int],
    schema: WireSchema,
    cfg: ServerConfig,
) -> tuple[np.ndarray | None, int, dict[str, Any]]:
    """Send, collect and validate individually; drop (and record) what fails the schema."""
    msgs = [
        Message(fit_content(broadcast), dst_node_id=nid, message_type=MessageType.TRAIN,
                group_id=str(broadcast.round))
        for nid in sampled
    ]
    replies = list(grid.send_and_receive(msgs, timeout=cfg.fleet.round_timeout_s))
    accepted: list[dict[str, np.ndarray]] = []
    metrics: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    rejected: dict[str, str] = {}
    replied: set[int] = set()
    for reply in replies:
        nid = reply.metadata.src_node_id
        replied.add(nid)
        if reply.has_error():
            errors[str(nid)] = f"{reply.error.code}: {reply.error.reason}"
            log.warning("round %d: node %d replied with an error: %s", broadcast.round, nid, errors[str(nid)])
            continue
        try:
            stats, m = parse_fit_reply(reply.content, schema)
        except StatisticRejected as exc:
            rejected[str(nid)] = str(exc)
            log.warning("round %d: dropped the reply of node %d: %s", broadcast.round, nid, exc)
            continue
        accepted.append(stats)
        metrics[str(nid)] = m
    total = sum_statistics(accepted, schema) if accepted else None
    dropped = sorted(set(sampled) - replied)
    if dropped:
        log.warning("round %d: no reply within %s s from nodes %s", broadcast.round, cfg.fleet.round_timeout_s, dropped)
    return total, len(accepted), {
        "metrics": metrics,
        "errors": errors,
        "rejected": rejected,
        "dropped": dropped,
    }


def _evaluate_round(
    grid: Grid, broadcast: RoundBroadcast, sampled: list[int], cfg: ServerConfig
) -> dict[str, Any]:
    """Ask the sampled devices to evaluate their own token locally; only metrics come back."""
    config = {
        "round": broadcast.round,
        "model-fingerprint": broadcast.model_fingerprint,
        "puts.low": broadcast.puts_low,
        "puts.high": broadcast.puts_high,
    }
    msgs = [
        Message(RecordDict({EVAL_CONFIG_KEY: ConfigRecord(dict(config))}), dst_node_id=nid, message_type=MessageType.EVALUATE,
                group_id=f"eval-{broadcast.round}")
        for nid in sampled
    ]
    out: dict[str, Any] = {"metrics": {}, "errors": {}}
    for reply in grid.send_and_receive(msgs, timeout=cfg.fleet.round_timeout_s):
        nid = str(reply.metadata.src_node_id)
        if reply.has_error():
            out["errors"][nid] = f"{reply.error.code}: {reply.error.reason}"
            continue
        try:
            out["metrics"][nid] = parse_eval_reply(reply.content)
        except StatisticRejected as exc:
            out["errors"][nid] = str(exc)
    losses = [m["eval-loss"] for m in out["metrics"].values() if "eval-loss" in m]
    out["mean_eval_loss"] = float(np.mean(losses)) if losses else None
    return out
