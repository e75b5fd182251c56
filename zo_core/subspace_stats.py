"""The federated wire schema and the statistics math that client and server share.

This is the one module both `client/` and `server/` import (it has no Flower in it): the schema
of what a server broadcasts and what a client may send, the client's statistic, its validation,
and the server-side math that turns a sum of statistics into a global basis and a PUTS window.
The choice of statistic is argued in `docs/federation.md`.

Notation (method.md section 7)
------------------------------
- ``D``      dimension of the learned token, ``V * d`` (V vectors of the text encoder's width d)
- ``u_s``    the token update of local step s, ``theta_{s+1} - theta_s``, unit-normalised
- ``C``      the client's second moment ``(1/S) sum_s u_s u_s^T`` (D, D); trace 1, ||C||_F <= 1
- ``B``      number of timestep buckets (width ``T / B``)
- ``a_b``    signal share: sum of the RGE signal |L(theta + mu e) - L(theta)| / mu of the steps
             whose timestep fell in bucket b, divided by the client's total signal (sums to 1)
- ``c_b``    count share: fraction of the client's steps whose timestep fell in bucket b
- ``M``      the server's (noisy) sum of C over clients; its top-k eigenvectors are the basis

Every statistic is bounded by construction (each part has L2 norm <= 1), so that clipping is
a no-op for an honest client, the sensitivity for differential privacy is known, and the
values lie inside SecAgg+'s clipping range [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1

# Names of the statistic's parts, in the order in which they travel (SecAgg+ and Flower's
# legacy `Parameters` are ordered lists, so the order is part of the schema).
SECOND_MOMENT = "second-moment"
SIGNAL_SHARE = "signal-share"
COUNT_SHARE = "count-share"
STAT_FIELDS: tuple[str, ...] = (SECOND_MOMENT, SIGNAL_SHARE, COUNT_SHARE)

# Each part has L2 (Frobenius) norm <= 1 by construction; NORM_TOLERANCE absorbs float32 rounding.
PART_NORM_BOUND = 1.0
NORM_TOLERANCE = 1e-4
# Every entry of every part lies in [-1, 1]: SecAgg+'s clipping range can be exactly this.
ENTRY_BOUND = 1.0

# Scalar metrics a client may report in the clear (nothing else leaves the device).
METRIC_KEYS: frozenset[str] = frozenset(
    {
        "loss-first",  # mean base loss of the first 10% of local steps
        "loss-last",  # mean base loss of the last 10% of local steps
        "local-steps",  # steps actually run
        "forward-passes",  # UNet evaluations spent this round (training and probe)
        "peak-rss-mib",  # process peak resident memory
        "wall-s",  # seconds the round took on the device
        "eval-loss",  # evaluate: mean loss of the current token on fixed local draws
        "eval-draws",  # evaluate: number of (image, noise, timestep) draws behind eval-loss
    }
)
METRIC_ABS_BOUND = 1e9  # a metric beyond this is refused as nonsense


# --- record keys (the Flower layout is Flower's legacy fit layout, see docs/federation.md) ---
FIT_CONFIG_KEY = "fitins.config"
FIT_PARAMS_KEY = "fitins.parameters"
FITRES_PARAMS_KEY = "fitres.parameters"
FITRES_METRICS_KEY = "fitres.metrics"
FITRES_NUM_EXAMPLES_KEY = "fitres.num_examples"
FITRES_STATUS_KEY = "fitres.status"
EVAL_CONFIG_KEY = "eval-config"
EVAL_METRICS_KEY = "eval-metrics"
QUERY_CONFIG_KEY = "query-config"
QUERY_REPLY_KEY = "query-reply"
QUERY_FINGERPRINT = "model-fingerprint"
QUERY_TOKEN_DIM = "token-dim"
FIT_REPLY_KEYS: frozenset[str] = frozenset(
    {FITRES_PARAMS_KEY, FITRES_METRICS_KEY, FITRES_NUM_EXAMPLES_KEY, FITRES_STATUS_KEY}
)
# Every client sends num_examples = 1: SecAgg+ then returns the plain mean, and the size of the
# private photo set never leaves the device.
NUM_EXAMPLES = 1
# The broadcast's config keys (RoundBroadcast.to_config); anything else is refused by the client.
BROADCAST_KEYS: frozenset[str] = frozenset(
    {
        "schema-version", "round", "local-steps", "probe-steps", "stat.segments", "stat.source", "zo.n", "zo.mu",
        "puts.low",
        "puts.high", "basis.version", "basis.weight", "model-fingerprint", "dim", "num-buckets",
        "num-train-timesteps",
    }
)  # fmt: skip


# What the second moment is built from: the token's per-step updates (theta_{s+1} - theta_s) or
# the raw zeroth-order gradient estimates of the steps (before the Subspace Gradient projection).
STAT_SOURCES: tuple[str, ...] = ("updates", "gradients")


class StatisticRejected(ValueError):
    """A statistic or metric does not satisfy the wire schema (the reason says which rule)."""


@dataclass(frozen=True)
class WireSchema:
    """Shapes and bounds of what a client may send.

    Parameters
    ----------
    dim
        D = V * d, the flattened token dimension (read from the model, never hard-coded).
    num_buckets
        B, number of equal timestep buckets over [0, T).
    num_train_timesteps
        T of the noise schedule.
    """

    dim: int
    num_buckets: int = 10
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"schema dim must be >= 1, got {self.dim}")
        if self.num_buckets < 2:
            raise ValueError(f"schema num_buckets must be >= 2, got {self.num_buckets}")
        if self.num_train_timesteps < self.num_buckets:
            raise ValueError(
                f"num_train_timesteps ({self.num_train_timesteps}) must be >= num_buckets "
                f"({self.num_buckets})"
            )

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each part, in wire order."""
        return {
            SECOND_MOMENT: (self.dim, self.dim),
            SIGNAL_SHARE: (self.num_buckets,),
            COUNT_SHARE: (self.num_buckets,),
        }

    @property
    def flat_size(self) -> int:
        return self.dim * self.dim + 2 * self.num_buckets

    @property
    def sensitivity(self) -> float:
        """L2 bound of one client's whole statistic (each of the 3 parts is <= 1)."""
        return PART_NORM_BOUND * math.sqrt(len(STAT_FIELDS))

    def bucket_of(self, timesteps: np.ndarray) -> np.ndarray:
        """Bucket index of each timestep (int array)."""
        t = np.asarray(timesteps, dtype=np.int64)
        if t.size and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_train_timesteps}), got range "
                f"[{t.min()}, {t.max()}]"
            )
        return (t * self.num_buckets) // self.num_train_timesteps

    def bucket_edges(self) -> np.ndarray:
        """Timestep edges of the buckets, shape (B + 1,)."""
        return np.round(
            np.linspace(0, self.num_train_timesteps, self.num_buckets + 1)
        ).astype(np.int64)


@dataclass(frozen=True)
class RoundBroadcast:
    """What the server sends to every sampled client in a round (besides the basis array).

    `basis` is (k, D) with orthonormal rows, or None before the fleet has one (version 0).
    """

    round: int
    local_steps: int
    n: int
    mu: float
    puts_low: int
    puts_high: int
    basis_version: int
    basis_weight: float
    model_fingerprint: str
    dim: int
    num_buckets: int
    num_train_timesteps: int
    probe_steps: int = 0
    stat_segments: int = 0  # 0: one unit direction per step; k: per contiguous k-th of the round
    stat_source: str = "updates"  # one of STAT_SOURCES
    basis: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.round < 1:
            raise ValueError(f"round must be >= 1, got {self.round}")
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if self.probe_steps < 0:
            raise ValueError(f"probe_steps must be >= 0, got {self.probe_steps}")
        if self.stat_segments < 0:
            raise ValueError(f"stat_segments must be >= 0, got {self.stat_segments}")
        if self.stat_source not in STAT_SOURCES:
            raise ValueError(f"stat_source must be one of {list(STAT_SOURCES)}, got {self.stat_source!r}")
        if self.n < 1 or not self.mu > 0:
            raise ValueError(f"n must be >= 1 and mu > 0, got n={self.n}, mu={self.mu}")
        if not 0 <= self.puts_low < self.puts_high <= self.num_train_timesteps:
            raise ValueError(
                f"PUTS window must satisfy 0 <= low < high <= {self.num_train_timesteps}, got "
                f"[{self.puts_low}, {self.puts_high})"
            )
        if not 0.0 <= self.basis_weight <= 1.0:
            raise ValueError(f"basis_weight must lie in [0, 1], got {self.basis_weight}")
        if not self.model_fingerprint:
            raise ValueError("model_fingerprint must not be empty")
        WireSchema(self.dim, self.num_buckets, self.num_train_timesteps)
        if self.basis is None:
            if self.basis_version != 0:
                raise ValueError(f"basis_version {self.basis_version} given without a basis")
        else:
            check_basis(self.basis, self.dim)

    @property
    def schema(self) -> WireSchema:
        return WireSchema(self.dim, self.num_buckets, self.num_train_timesteps)

    def to_config(self) -> dict[str, int | float | str]:
        """Flat scalar mapping (a Flower ConfigRecord takes it as is)."""
        return {
            "schema-version": SCHEMA_VERSION,
            "round": self.round,
            "local-steps": self.local_steps,
            "probe-steps": self.probe_steps,
            "stat.segments": self.stat_segments,
            "stat.source": self.stat_source,
            "zo.n": self.n,
            "zo.mu": float(self.mu),
            "puts.low": self.puts_low,
            "puts.high": self.puts_high,
            "basis.version": self.basis_version,
            "basis.weight": float(self.basis_weight),
            "model-fingerprint": self.model_fingerprint,
            "dim": self.dim,
            "num-buckets": self.num_buckets,
            "num-train-timesteps": self.num_train_timesteps,
        }

    @classmethod
    def from_config(
        cls, config: Mapping[str, object], basis: np.ndarray | None
    ) -> RoundBroadcast:
        """Parse and validate a broadcast; unknown or missing keys are an error."""
        expected, got = BROADCAST_KEYS, set(config)
        if got != expected:
            raise ValueError(
                f"broadcast keys differ from the schema: missing {sorted(expected - got)}, "
                f"unknown {sorted(got - expected)}"
            )
        if config["schema-version"] != SCHEMA_VERSION:
            raise ValueError(
                f"broadcast schema version {config['schema-version']} != {SCHEMA_VERSION}"
            )

        def _int(key: str) -> int:
            v = config[key]
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"broadcast {key!r} must be an int, got {v!r}")
            return v

        def _float(key: str) -> float:
            v = config[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"broadcast {key!r} must be a number, got {v!r}")
            return float(v)

        fp, source = config["model-fingerprint"], config["stat.source"]
        if not isinstance(fp, str):
            raise ValueError(f"broadcast 'model-fingerprint' must be a string, got {fp!r}")
        if not isinstance(source, str):
            raise ValueError(f"broadcast 'stat.source' must be a string, got {source!r}")
        return cls(
            round=_int("round"),
            local_steps=_int("local-steps"),
            probe_steps=_int("probe-steps"),
            stat_segments=_int("stat.segments"),
            stat_source=source,
            n=_int("zo.n"),
            mu=_float("zo.mu"),
            puts_low=_int("puts.low"),
            puts_high=_int("puts.high"),
            basis_version=_int("basis.version"),
            basis_weight=_float("basis.weight"),
            model_fingerprint=fp,
            dim=_int("dim"),
            num_buckets=_int("num-buckets"),
            num_train_timesteps=_int("num-train-timesteps"),
            basis=None if basis is None or basis.size == 0 else basis,
        )


def check_basis(basis: np.ndarray, dim: int, *, atol: float = 1e-3) -> None:
    """Raise ValueError unless `basis` is (k, dim), finite, with orthonormal rows, 1 <= k < dim."""
    if basis.ndim != 2 or basis.shape[1] != dim or not 1 <= basis.shape[0] <= dim:
        raise ValueError(f"basis must have shape (k, {dim}) with 1 <= k <= {dim}, got {basis.shape}")
    if not np.all(np.isfinite(basis)):
        raise ValueError("basis contains non-finite values")
    gram = basis.astype(np.float64) @ basis.astype(np.float64).T
    err = float(np.abs(gram - np.eye(basis.shape[0])).max())
    if err > atol:
        raise ValueError(f"basis rows are not orthonormal (max |B B^T - I| = {err:.3g})")


# --- the client's statistic ------------------------------------------------------------------


def client_statistic(
    updates: np.ndarray,
    timesteps: Sequence[int] | np.ndarray,
    signal: Sequence[float] | np.ndarray,
    schema: WireSchema,
    *,
    segments: int = 0,
) -> dict[str, np.ndarray]:
    """Summarise one local round into the fixed-shape, bounded statistic.

    Parameters
    ----------
    updates
        (S, D) per-step vectors of the round's training steps: the token updates
        ``theta_{s+1} - theta_s`` (source "updates"), or the raw ZO gradient estimates (source
        "gradients"; see `docs/federation.md` for why they may transfer across concepts better).
    timesteps, signal
        Per evaluated step (training and probe steps alike): the timestep t and the RGE signal
        mean_i |L(theta + mu e_i) - L(theta)| / mu. Same length.
    schema
        The wire schema the statistic must satisfy.
    segments
        0: one unit direction per step (``u_s``). k >= 1: split the round into k contiguous
        segments and use each segment's total displacement instead. A ZO step's update is
        dominated by its random directions; summing steps averages that noise out (it grows like
        sqrt(steps), the drift like steps), so displacements carry the directions the token
        actually travels. The bounds are the same (trace 1, PSD).

    Returns
    -------
    dict
        ``{SECOND_MOMENT: (D, D), SIGNAL_SHARE: (B,), COUNT_SHARE: (B,)}``, float32, each part
        with L2 norm <= 1. Zero updates (a step that did not move theta) are skipped; a round
        without any movement gives a zero second moment.
    """
    upd = np.asarray(updates, dtype=np.float64)
    if upd.ndim != 2 or upd.shape[1] != schema.dim:
        raise ValueError(f"updates must have shape (S, {schema.dim}), got {upd.shape}")
    if not np.all(np.isfinite(upd)):
        raise ValueError("updates contain non-finite values")
    ts = np.asarray(timesteps, dtype=np.int64)
    sig = np.asarray(signal, dtype=np.float64)
    if ts.shape != sig.shape or ts.ndim != 1:
        raise ValueError(f"timesteps and signal must be 1-d of equal length, got {ts.shape}, {sig.shape}")
    if not np.all(np.isfinite(sig)) or (sig.size and sig.min() < 0):
        raise ValueError("signal values must be finite and >= 0")

    if segments < 0:
        raise ValueError(f"segments must be >= 0, got {segments}")
    if segments and upd.shape[0]:
        upd = np.stack([chunk.sum(axis=0) for chunk in np.array_split(upd, min(segments, upd.shape[0]))])
    norms = np.linalg.norm(upd, axis=1)
    moving = norms > 0
    second = np.zeros((schema.dim, schema.dim), dtype=np.float64)
    if moving.any():
        unit = upd[moving] / norms[moving, None]
        second = unit.T @ unit / unit.shape[0]  # trace 1, PSD => ||C||_F <= 1

    buckets = schema.bucket_of(ts)
    counts = np.bincount(buckets, minlength=schema.num_buckets).astype(np.float64)
    sums = np.bincount(buckets, weights=sig, minlength=schema.num_buckets)
    count_share = counts / counts.sum() if counts.sum() > 0 else counts
    signal_share = sums / sums.sum() if sums.sum() > 0 else sums
    stats = {
        SECOND_MOMENT: second.astype(np.float32),
        SIGNAL_SHARE: signal_share.astype(np.float32),
        COUNT_SHARE: count_share.astype(np.float32),
    }
    # float32 rounding can lift a norm a hair above 1; scale it back so that the bound is exact.
    return {k: clip_l2(v, PART_NORM_BOUND) for k, v in stats.items()}


def clip_l2(x: np.ndarray, bound: float) -> np.ndarray:
    """Scale `x` down to L2 norm `bound` if it is larger (float32 in, float32 out)."""
    norm = float(np.linalg.norm(x.astype(np.float64)))
    if norm <= bound:
        return x
    return (x.astype(np.float64) * (bound / norm)).astype(x.dtype)


def validate_statistic(stats: Mapping[str, np.ndarray], schema: WireSchema) -> None:
    """Raise StatisticRejected unless `stats` is exactly the schema's statistic.

    Rules: exactly the schema's names; float32; exact shapes; finite; every entry in
    [-1, 1] (shares in [0, 1]); each part's L2 norm <= 1 (+ float tolerance); the second
    moment symmetric.
    """
    names = list(stats)
    if names != list(STAT_FIELDS):
        raise StatisticRejected(f"statistic names {names} != schema {list(STAT_FIELDS)}")
    for name, shape in schema.shapes.items():
        arr = stats[name]
        if not isinstance(arr, np.ndarray):
            raise StatisticRejected(f"{name}: expected a numpy array, got {type(arr).__name__}")
        if arr.dtype != np.float32:
            raise StatisticRejected(f"{name}: dtype {arr.dtype} != float32")
        if arr.shape != shape:
            raise StatisticRejected(f"{name}: shape {arr.shape} != {shape}")
        if not np.all(np.isfinite(arr)):
            raise StatisticRejected(f"{name}: non-finite values")
        if np.abs(arr).max(initial=0.0) > ENTRY_BOUND:
            raise StatisticRejected(f"{name}: an entry lies outside [-{ENTRY_BOUND}, {ENTRY_BOUND}]")
        norm = float(np.linalg.norm(arr.astype(np.float64)))
        if norm > PART_NORM_BOUND + NORM_TOLERANCE:
            raise StatisticRejected(f"{name}: L2 norm {norm:.6g} exceeds {PART_NORM_BOUND}")
    if np.any(stats[SIGNAL_SHARE] < 0) or np.any(stats[COUNT_SHARE] < 0):
        raise StatisticRejected("shares must be >= 0")
    sm = stats[SECOND_MOMENT]
    if float(np.abs(sm - sm.T).max(initial=0.0)) > 1e-5:
        raise StatisticRejected(f"{SECOND_MOMENT}: not symmetric")


def validate_metrics(metrics: Mapping[str, object]) -> None:
    """Raise StatisticRejected unless every metric is allowlisted and a finite, bounded number."""
    unknown = sorted(set(metrics) - METRIC_KEYS)
    if unknown:
        raise StatisticRejected(f"metrics {unknown} are not in the allowlist {sorted(METRIC_KEYS)}")
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StatisticRejected(f"metric {key!r} must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or abs(value) > METRIC_ABS_BOUND:
            raise StatisticRejected(f"metric {key!r} is not finite or out of bounds: {value!r}")


def flatten_statistic(stats: Mapping[str, np.ndarray]) -> np.ndarray:
    """Concatenate the parts in wire order into one float64 vector."""
    return np.concatenate([np.asarray(stats[k], dtype=np.float64).ravel() for k in STAT_FIELDS])


def unflatten_statistic(vec: np.ndarray, schema: WireSchema) -> dict[str, np.ndarray]:
    """Inverse of `flatten_statistic` (float64 parts)."""
    if vec.shape != (schema.flat_size,):
        raise ValueError(f"vector must have shape ({schema.flat_size},), got {vec.shape}")
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, shape in schema.shapes.items():
        size = int(np.prod(shape))
        out[name] = vec[start : start + size].reshape(shape)
        start += size
    return out


# --- server-side math -------------------------------------------------------------------------


def basis_from_second_moment(moment: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-`rank` eigenvectors of a (noisy) second-moment sum.

    The matrix is symmetrised first (DP noise is added entrywise, so it is not symmetric).
    Returns (basis (rank, D) float32 with orthonormal rows, eigenvalues (D,) descending).
    """
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1]:
        raise ValueError(f"moment must be square, got {moment.shape}")
    if not 1 <= rank < moment.shape[0]:
        raise ValueError(f"rank must be in [1, {moment.shape[0] - 1}], got {rank}")
    if not np.all(np.isfinite(moment)):
        raise ValueError("moment contains non-finite values")
    sym = 0.5 * (moment + moment.T)
    evals, evecs = np.linalg.eigh(sym)  # ascending
    order = np.argsort(evals)[::-1]
    top = evecs[:, order[:rank]].T
    # Orthonormal already (eigh); re-orthonormalise in float64 before the float32 cast.
    q, _ = np.linalg.qr(top.T)
    basis = (q.T * np.sign(np.sum(q.T * top, axis=1, keepdims=True) + 1e-30)).astype(np.float32)
    return basis, evals[order]


def choose_window(
    signal_share_sum: np.ndarray,
    count_share_sum: np.ndarray,
    schema: WireSchema,
    *,
    width_buckets: int,
    current: tuple[int, int],
    min_count_share: float,
) -> tuple[tuple[int, int], np.ndarray]:
    """Pick the next PUTS window: the contiguous `width_buckets` buckets of highest signal density.

    The density of bucket b is ``sum_clients a_b / sum_clients c_b`` (signal per step, relative
    to each client's own scale). A bucket whose summed count share is below `min_count_share`
    (no or too little data, or only DP noise) is treated as average: the search neither
    prefers nor avoids what it has not seen. Ties keep the current window (stability).

    Returns ((T_L, T_U), density (B,)), with NaN density where a bucket had too little data.
    """
    if not 1 <= width_buckets <= schema.num_buckets:
        raise ValueError(f"width_buckets must be in [1, {schema.num_buckets}], got {width_buckets}")
    a = np.asarray(signal_share_sum, dtype=np.float64)
    c = np.asarray(count_share_sum, dtype=np.float64)
    if a.shape != (schema.num_buckets,) or c.shape != (schema.num_buckets,):
        raise ValueError("share sums must have shape (num_buckets,)")
    known = c >= min_count_share
    density = np.full(schema.num_buckets, np.nan)
    density[known] = np.maximum(a[known], 0.0) / c[known]
    if not known.any():
        return current, density
    filled = np.where(known, density, np.nanmean(density))
    edges = schema.bucket_edges()
    scores = np.array(
        [filled[i : i + width_buckets].sum() for i in range(schema.num_buckets - width_buckets + 1)]
    )
    best = float(scores.max())
    cur_start = int(np.searchsorted(edges, current[0]))
    if (
        0 <= cur_start < scores.size
        and edges[cur_start] == current[0]
        and edges[cur_start + width_buckets] == current[1]
        and scores[cur_start] >= best - 1e-12
    ):
        return current, density
    start = int(np.argmax(scores))
    return (int(edges[start]), int(edges[start + width_buckets])), density
