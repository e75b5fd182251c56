"""The device's outgoing allowlist: a Flower mod that lets only schema-conforming replies leave.

Every reply the ClientApp produces passes `allowlist_mod`: a train reply must be exactly the
wire schema's statistic (names, float32, shapes, finite, bounded norms) plus allowlisted scalar
metrics; an evaluate reply only allowlisted metrics; a query reply only the model facts. Anything
else - an extra record, a wrong shape, a NaN, an over-norm statistic, another message type - is
refused ON THE DEVICE and logged (the reason only, never the content); the server gets an error
reply instead. Under SecAgg+ the mod runs twice: inside `secaggplus_mod` (the statistic before it
is masked) and outside it (the protocol's own key, share and masked-vector messages).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SAKey
from flwr.compat.common import recorddict_compat as compat

from zo_core.subspace_stats import (
    EVAL_METRICS_KEY,
    FIT_CONFIG_KEY,
    FIT_REPLY_KEYS,
    FITRES_PARAMS_KEY,
    NUM_EXAMPLES,
    QUERY_FINGERPRINT,
    QUERY_REPLY_KEY,
    QUERY_TOKEN_DIM,
    STAT_FIELDS,
    StatisticRejected,
    WireSchema,
    validate_metrics,
    validate_statistic,
)

log = logging.getLogger("fedzoodip.client.allowlist")

# What each SecAgg+ stage may send back (Flower's own protocol messages).
_SECAGG_REPLY_KEYS: frozenset[str] = frozenset(
    {
        SAKey.PUBLIC_KEY_1,
        SAKey.PUBLIC_KEY_2,
        SAKey.DESTINATION_LIST,
        SAKey.CIPHERTEXT_LIST,
        SAKey.MASKED_PARAMETERS,
        SAKey.NODE_ID_LIST,
        SAKey.SHARE_LIST,
    }
)
_QUERY_REPLY_FIELDS: frozenset[str] = frozenset(
    {QUERY_FINGERPRINT, QUERY_TOKEN_DIM, "num-train-timesteps"}
)
MAX_ERROR_REASON = 300


class OutgoingRefused(StatisticRejected):
    """A reply that is not allowed to leave the device."""


def _schema_of(incoming: Message) -> WireSchema:
    cfg = incoming.content.config_records.get(FIT_CONFIG_KEY)
    if cfg is None:
        raise OutgoingRefused("train reply to a message without a broadcast config")
    return WireSchema(
        dim=int(cfg["dim"]),  # type: ignore[arg-type]
        num_buckets=int(cfg["num-buckets"]),  # type: ignore[arg-type]
        num_train_timesteps=int(cfg["num-train-timesteps"]),  # type: ignore[arg-type]
    )


def check_fit_reply(content: RecordDict, schema: WireSchema, *, masked: bool) -> None:
    """Raise OutgoingRefused unless `content` is exactly an allowlisted fit reply.

    `masked`: the SecAgg+ mod has already taken the statistic out of the record (it travels
    inside the masked vector), so `fitres.parameters` must be empty.
    """
    extra = set(content.keys()) - FIT_REPLY_KEYS - ({RECORD_KEY_CONFIGS} if masked else set())
    missing = FIT_REPLY_KEYS - set(content.keys())
    if extra or missing:
        raise OutgoingRefused(f"fit reply records: unknown {sorted(extra)}, missing {sorted(missing)}")
    fitres = compat.recorddict_to_fitres(content, keep_input=True)
    if fitres.status.code != Code.OK:
        raise OutgoingRefused(f"fit reply status {fitres.status.code}")
    if fitres.num_examples != NUM_EXAMPLES:
        raise OutgoingRefused(f"num_examples must be {NUM_EXAMPLES}, got {fitres.num_examples}")
    validate_metrics(dict(fitres.metrics))
    if masked:
        if len(content.array_records[FITRES_PARAMS_KEY]) != 0:
            raise OutgoingRefused("masked fit reply still carries plain arrays")
        return
    arrays = parameters_to_ndarrays(fitres.parameters)
    if len(arrays) != len(STAT_FIELDS):
        raise OutgoingRefused(f"{len(arrays)} arrays != {len(STAT_FIELDS)} schema parts")
    validate_statistic(dict(zip(STAT_FIELDS, arrays, strict=True)), schema)


def _check_secagg_reply(content: RecordDict, incoming: Message) -> None:
    rec = content.config_records[RECORD_KEY_CONFIGS]
    unknown = set(rec.keys()) - _SECAGG_REPLY_KEYS
    if unknown:
        raise OutgoingRefused(f"secure-aggregation reply carries unknown keys {sorted(unknown)}")
    if SAKey.MASKED_PARAMETERS in rec:
        check_fit_reply(content, _schema_of(incoming), masked=True)
    elif set(content.keys()) != {RECORD_KEY_CONFIGS}:
        raise OutgoingRefused(f"secure-aggregation reply carries records {sorted(content.keys())}")


def check_outgoing(reply: Message, incoming: Message) -> None:
    """Raise OutgoingRefused unless `reply` (to `incoming`) may leave the device."""
    content = reply.content
    mtype = incoming.metadata.message_type
    if mtype == MessageType.TRAIN:
        if RECORD_KEY_CONFIGS in content.config_records:
            _check_secagg_reply(content, incoming)
        else:
            check_fit_reply(content, _schema_of(incoming), masked=False)
    elif mtype == MessageType.EVALUATE:
        if set(content.keys()) != {EVAL_METRICS_KEY}:
            raise OutgoingRefused(f"evaluate reply records {sorted(content.keys())} not allowlisted")
        validate_metrics(dict(content.metric_records[EVAL_METRICS_KEY]))
    elif mtype == MessageType.QUERY:
        if set(content.keys()) != {QUERY_REPLY_KEY}:
            raise OutgoingRefused(f"query reply records {sorted(content.keys())} not allowlisted")
        rec: ConfigRecord = content.config_records[QUERY_REPLY_KEY]
        if set(rec.keys()) != _QUERY_REPLY_FIELDS:
            raise OutgoingRefused(f"query reply fields {sorted(rec.keys())} not allowlisted")
        fp = rec[QUERY_FINGERPRINT]
        if not isinstance(fp, str) or len(fp) > 128 or not all(c in "0123456789abcdef" for c in fp):
            raise OutgoingRefused("query reply fingerprint must be a hex digest")
        for key in (QUERY_TOKEN_DIM, "num-train-timesteps"):
            if isinstance(rec[key], bool) or not isinstance(rec[key], int):
                raise OutgoingRefused(f"query reply {key} must be an int")
    else:
        raise OutgoingRefused(f"replies to {mtype!r} messages are not allowlisted")


def _refusal(incoming: Message, reason: str) -> Message:
    return Message(
        Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason[:MAX_ERROR_REASON]),
        reply_to=incoming,
    )


def allowlist_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: run the app, then let the reply out only if the allowlist accepts it.

    An exception inside the app becomes an error reply whose reason is the exception's type and
    first 300 characters (logged in full on the device only).
    """
    try:
        reply = call_next(msg, ctx)
    except Exception as exc:  # the device logs the detail; the server gets a short reason
        log.exception("the ClientApp raised while handling a %s message", msg.metadata.message_type)
        return _refusal(msg, f"{type(exc).__name__}: {exc}")
    if reply.has_error():
        return _refusal(msg, reply.error.reason or f"error code {reply.error.code}")
    try:
        check_outgoing(reply, msg)
    except (StatisticRejected, KeyError, TypeError, ValueError) as exc:
        log.warning("allowlist refused an outgoing %s reply: %s", msg.metadata.message_type, exc)
        return _refusal(msg, f"allowlist refused the reply: {exc}")
    return reply


def fit_arrays_for(stats: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The statistic as the ordered list Flower's legacy Parameters carry."""
    return [np.ascontiguousarray(stats[k], dtype=np.float32) for k in STAT_FIELDS]
