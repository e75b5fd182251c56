"""Flower records <-> the wire schema of `zo_core.subspace_stats`, on the server side.

The layout is Flower's legacy fit layout (`fitins.*` / `fitres.*`) because SecAgg+ in Flower
1.42 only masks that layout; the plain path uses the same one, so a client answers both alike.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import Code, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from zo_core.subspace_stats import (
    EVAL_METRICS_KEY,
    FIT_REPLY_KEYS,
    NUM_EXAMPLES,
    QUERY_FINGERPRINT,
    QUERY_REPLY_KEY,
    QUERY_TOKEN_DIM,
    STAT_FIELDS,
    RoundBroadcast,
    StatisticRejected,
    WireSchema,
    validate_metrics,
    validate_statistic,
)


def fit_instructions(broadcast: RoundBroadcast) -> FitIns:
    """The legacy FitIns of a round: the basis (or nothing) as parameters, the rest as config."""
    arrays = [] if broadcast.basis is None else [broadcast.basis.astype(np.float32)]
    return FitIns(parameters=ndarrays_to_parameters(arrays), config=broadcast.to_config())  # type: ignore[arg-type]


def fit_content(broadcast: RoundBroadcast) -> RecordDict:
    return compat.fitins_to_recorddict(fit_instructions(broadcast), keep_input=True)


def parse_fit_reply(
    content: RecordDict, schema: WireSchema
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Validate a client's fit reply against the schema; StatisticRejected says why not."""
    keys = set(content.keys())
    if keys != FIT_REPLY_KEYS:
        raise StatisticRejected(
            f"reply records {sorted(keys)} != allowlisted {sorted(FIT_REPLY_KEYS)}"
        )
    try:
        fitres = compat.recorddict_to_fitres(content, keep_input=True)
        arrays = parameters_to_ndarrays(fitres.parameters)
    except Exception as exc:  # malformed bytes from a hostile client: a rejection, not a crash
        raise StatisticRejected(f"unparseable reply: {type(exc).__name__}: {exc}") from exc
    if fitres.status.code != Code.OK:
        raise StatisticRejected(f"reply status {fitres.status.code}")
    if fitres.num_examples != NUM_EXAMPLES:
        raise StatisticRejected(f"num_examples {fitres.num_examples} != {NUM_EXAMPLES}")
    if len(arrays) != len(STAT_FIELDS):
        raise StatisticRejected(f"{len(arrays)} arrays != {len(STAT_FIELDS)} schema parts")
    stats = dict(zip(STAT_FIELDS, arrays, strict=True))
    validate_statistic(stats, schema)
    metrics = dict(fitres.metrics)
    validate_metrics(metrics)
    return stats, {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]


def parse_eval_reply(content: RecordDict) -> dict[str, float]:
    if set(content.keys()) != {EVAL_METRICS_KEY}:
        raise StatisticRejected(f"evaluate reply records {sorted(content.keys())} not allowlisted")
    metrics = dict(content.metric_records[EVAL_METRICS_KEY])
    validate_metrics(metrics)
    return {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]


def parse_query_reply(msg: Message) -> tuple[str, int, int]:
    """(model fingerprint, D, T) a node reports about its local model."""
    content = msg.content
    if set(content.keys()) != {QUERY_REPLY_KEY}:
        raise StatisticRejected(f"query reply records {sorted(content.keys())} not allowlisted")
    rec: ConfigRecord = content.config_records[QUERY_REPLY_KEY]
    fp, dim, steps = rec.get(QUERY_FINGERPRINT), rec.get(QUERY_TOKEN_DIM), rec.get("num-train-timesteps")
    if not isinstance(fp, str) or not isinstance(dim, int) or not isinstance(steps, int):
        raise StatisticRejected("query reply must carry fingerprint (str), dim and T (int)")
    return fp, dim, steps
