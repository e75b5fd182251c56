"""The device's ClientApp: parse the message, call client/task.py, wrap the reply.

Mods: `allowlist_mod` outermost (nothing leaves unchecked), then `secure_aggregation_mod`
(SecAgg+ when the server runs it), then `allowlist_mod` again so the statistic is checked before
it is masked. The train handler speaks Flower's legacy fit layout because SecAgg+ requires it.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.allowlist import allowlist_mod, fit_arrays_for
from client.state_store import EncryptedStateStore
from client.task import DeviceConfig, FingerprintMismatch, ModelCache, evaluate_state, load_state, run_fit_round
from zo_core.subspace_stats import (
    EVAL_CONFIG_KEY,
    EVAL_METRICS_KEY,
    NUM_EXAMPLES,
    QUERY_FINGERPRINT,
    QUERY_REPLY_KEY,
    QUERY_TOKEN_DIM,
    RoundBroadcast,
)

log = logging.getLogger("fedzoodip.client")

# One per process (a Ray actor or a SuperNode's app process): see ModelCache.
MODELS = ModelCache()


def secure_aggregation_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ for the rounds the server runs securely; plain rounds pass straight through.

    Flower's `secaggplus_mod` expects every train message to be part of the protocol, while our
    server runs either; the presence of the protocol's config record tells them apart.
    """
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctx, call_next)
    return call_next(msg, ctx)


def train(msg: Message, context: Context) -> Message:
    """One local round: refuse a foreign model, train, persist, reply with the statistic."""
    device = DeviceConfig.from_context(context.node_config, context.run_config)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    basis_arrays = parameters_to_ndarrays(fitins.parameters)
    broadcast = RoundBroadcast.from_config(fitins.config, basis_arrays[0] if basis_arrays else None)
    model = MODELS.model(device.model_dir, device.quant)
    if broadcast.model_fingerprint != model.fingerprint:  # before touching any private data
        raise FingerprintMismatch(
            f"round {broadcast.round} is for model {broadcast.model_fingerprint[:12]}..., this "
            f"device holds {model.fingerprint[:12]}...; refusing the round"
        )
    store = EncryptedStateStore(device.state_dir, device.key_file)
    stats, metrics = run_fit_round(model, MODELS.data(model, device), store, device, broadcast)
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(fit_arrays_for(stats)),
        num_examples=NUM_EXAMPLES,
        metrics=metrics,  # type: ignore[arg-type]
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Score the device's current token locally; only the loss and the draw count leave."""
    device = DeviceConfig.from_context(context.node_config, context.run_config)
    cfg = msg.content.config_records[EVAL_CONFIG_KEY]
    model = MODELS.model(device.model_dir, device.quant)
    if cfg["model-fingerprint"] != model.fingerprint:
        raise FingerprintMismatch("evaluation requested for another model; refusing")
    data = MODELS.data(model, device)
    state = load_state(EncryptedStateStore(device.state_dir, device.key_file), model, device)
    window = (int(cfg["puts.low"]), int(cfg["puts.high"]))  # type: ignore[call-overload]
    loss = evaluate_state(model, data, state, window, device.eval_draws)
    metrics = MetricRecord({"eval-loss": loss, "eval-draws": float(device.eval_draws)})
    return Message(RecordDict({EVAL_METRICS_KEY: metrics}), reply_to=msg)


def query(msg: Message, context: Context) -> Message:
    """Public facts about the local model: its fingerprint, D and T (nothing personal)."""
    device = DeviceConfig.from_context(context.node_config, context.run_config)
    model = MODELS.model(device.model_dir, device.quant)
    reply = ConfigRecord(
        {
            QUERY_FINGERPRINT: model.fingerprint,
            QUERY_TOKEN_DIM: int(model.token_dim * device.num_vectors),
            "num-train-timesteps": int(model.num_train_timesteps),
        }
    )
    return Message(RecordDict({QUERY_REPLY_KEY: reply}), reply_to=msg)


def build_client_app(extra_outer_mods: list[Mod] | None = None) -> ClientApp:
    """The ClientApp; tests add an outermost capture mod to see exactly what a device sends.

    The handlers are module-level functions so that Ray ships them to its actors by reference
    (a closure would drag the process-level model cache, and its lock, into the pickle).
    """
    app = ClientApp(mods=[*(extra_outer_mods or []), allowlist_mod, secure_aggregation_mod, allowlist_mod])
    app.train()(train)
    app.evaluate()(evaluate)
    app.query()(query)
    return app


app = build_client_app()

__all__ = ["MODELS", "app", "build_client_app", "secure_aggregation_mod"]
