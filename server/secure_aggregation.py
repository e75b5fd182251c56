"""One round of SecAgg+ through Flower 1.42's legacy workflow, driven from our own loop.

Flower 1.42 runs SecAgg+ only on the legacy path: a `LegacyContext` whose legacy `Strategy`
configures the round and receives the aggregate, and `SecAggPlusWorkflow` in between. We drive
the workflow one round at a time (instead of `DefaultWorkflow`'s whole run) so that sampling,
DP, the basis and the round records stay in our loop for both the plain and the secure path.

What the server code sees: `aggregate_fit` is called with every client's FitRes whose
`parameters` Flower has already replaced by the unmasked weighted MEAN; the individual masked
vectors never reach this module. Every client sends num_examples = 1 and `max_weight = 1`,
which makes the mean an exact plain mean (the weight factor is quantized, 1 is exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Grid, LegacyContext
from flwr.server import ServerConfig as LegacyServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from server.config import SecAggConfig
from server.wire import fit_instructions
from zo_core.subspace_stats import (
    ENTRY_BOUND,
    STAT_FIELDS,
    RoundBroadcast,
    StatisticRejected,
    WireSchema,
    flatten_statistic,
    validate_metrics,
)


@dataclass
class SecureRoundResult:
    """The sum (mean * contributors) and what travelled in the clear."""

    total: np.ndarray | None  # None: the protocol halted (too few survivors)
    contributors: int
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)


class _RoundStrategy(Strategy):
    """A legacy Strategy for exactly one round: fixed nodes, fixed broadcast, keeps the mean."""

    def __init__(self, broadcast: RoundBroadcast, node_ids: list[int], schema: WireSchema) -> None:
        self.broadcast = broadcast
        self.node_ids = node_ids
        self.schema = schema
        self.mean: list[np.ndarray] | None = None
        self.metrics: dict[int, dict[str, float]] = {}
        self.rejected: dict[int, str] = {}
        self.contributors = 0

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        proxies = client_manager.all()
        ins = fit_instructions(self.broadcast)
        return [(proxies[str(nid)], ins) for nid in self.node_ids if str(nid) in proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        # Every FitRes carries the same aggregated parameters (Flower put the mean there).
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        self.contributors = len(results)
        for proxy, res in results:
            try:
                validate_metrics(dict(res.metrics))
                self.metrics[int(proxy.cid)] = {k: float(v) for k, v in res.metrics.items()}  # type: ignore[arg-type]
            except StatisticRejected as exc:
                self.rejected[int(proxy.cid)] = f"metrics: {exc}"
        return results[0][1].parameters, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


def run_secure_round(
    grid: Grid,
    context: Context,
    *,
    broadcast: RoundBroadcast,
    node_ids: list[int],
    schema: WireSchema,
    cfg: SecAggConfig,
) -> SecureRoundResult:
    """Run one SecAgg+ round over `node_ids`; return the unmasked SUM of their statistics.

    The clipping range is the schema's entry bound (1.0): statistics are bounded to [-1, 1] by
    construction, so nothing is clipped for an honest client, and a dishonest one cannot push any
    entry of the sum by more than 2 (see docs/federation.md).
    """
    strategy = _RoundStrategy(broadcast, node_ids, schema)
    manager = SimpleClientManager()
    for nid in node_ids:
        manager.register(GridClientProxy(nid, grid, context.run_id))
    legacy = LegacyContext(
        context,
        config=LegacyServerConfig(num_rounds=1, round_timeout=cfg.timeout_s),
        strategy=strategy,
        client_manager=manager,
    )
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: broadcast.round}
    )
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([]), keep_input=True
    )
    workflow = SecAggPlusWorkflow(
        num_shares=cfg.num_shares,
        reconstruction_threshold=cfg.reconstruction_threshold,
        max_weight=1,
        clipping_range=ENTRY_BOUND,
        timeout=cfg.timeout_s,
    )
    workflow(grid, legacy)
    if strategy.mean is None:
        return SecureRoundResult(total=None, contributors=0, rejected=strategy.rejected)
    if len(strategy.mean) != len(STAT_FIELDS):
        raise StatisticRejected(f"secure aggregate has {len(strategy.mean)} parts, expected 3")
    parts = dict(zip(STAT_FIELDS, strategy.mean, strict=True))
    for name, shape in schema.shapes.items():
        if parts[name].shape != shape:
            raise StatisticRejected(f"secure aggregate {name} has shape {parts[name].shape}")
    total = flatten_statistic(parts) * strategy.contributors
    return SecureRoundResult(
        total=total,
        contributors=strategy.contributors,
        metrics=strategy.metrics,
        rejected=strategy.rejected,
    )
