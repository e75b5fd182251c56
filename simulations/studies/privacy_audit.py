"""Privacy audit: how well can an honest-but-curious server estimate a device's token?

The server never receives a token; it receives each round's statistic (the second moment C of
the device's unit-normalised token updates, plus timestep shares). Its best use of C for
guessing the token's displacement from the initializer is the top eigenvector v of what it sees:
the direction the device moved along most. We measure, for every device and round:

- ``direction |cos|``: |cos(v, theta - theta_init)|, the alignment of the server's direction
  estimate with the device's true displacement (sign is unknowable from a second moment);
- ``token cos (upper bound)``: max over t of cos(theta_init + t v, theta), the best token estimate
  the line through the initializer along v can give (an upper bound: the server cannot pick t);

under four server views of the same replies:

1. ``individual``: no secure aggregation - the server sees every device's C;
2. ``individual + central DP``: the same, since central DP adds noise to the *sum* - without
   secure aggregation the server still holds each reply (DP protects the released basis, not
   the raw replies from the server);
3. ``secagg sum``: only the round's sum of C over the contributors;
4. ``secagg sum + DP``: the sum plus the Gaussian noise of the DP mechanism
   (std = noise multiplier x sensitivity per entry, `server.privacy.add_gaussian_noise`).

The baseline is a server that knows nothing but the initializer word: its token estimate is
theta_init (``token cos`` = cos(theta_init, theta)) and its direction estimate is a random one
(``direction |cos|`` of a random unit vector, measured with the same devices).

Usage: ``python -m simulations.studies.privacy_audit --out runs/study-privacy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.privacy import add_gaussian_noise
from simulations.fleet.backend import TaskResult
from simulations.fleet.fleet_server import SimulatedServer
from simulations.fleet.runner import Device
from simulations.studies.common import (
    common_overrides,
    load_study_scenario,
    run_variants,
    study_parser,
    write_study,
)
from zo_core.subspace_stats import SECOND_MOMENT

VIEWS = ("individual", "individual + central DP", "secagg sum", "secagg sum + DP", "initializer only")
AUDIT_STREAM = 0xA0D17


def top_direction(matrix: np.ndarray) -> np.ndarray:
    """Unit top eigenvector of the symmetric part of `matrix`."""
    sym = 0.5 * (matrix + matrix.T)
    _, vecs = np.linalg.eigh(sym)
    return vecs[:, -1]


def abs_cos(a: np.ndarray, b: np.ndarray) -> float:
    """|cos| of two vectors (0 when either is zero)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(abs(a @ b) / (na * nb))


def best_line_cos(theta_init: np.ndarray, v: np.ndarray, theta: np.ndarray) -> float:
    """max over real t of cos(theta_init + t v, theta), for unit v.

    With p = a.b, q = v.b, A = |a|^2, c = a.v, the derivative of (p + t q) / |a + t v| vanishes at
    t* = (p c - q A) / (q c - p); the maximum is at t*, t = 0, or in the limit t -> +-inf (+-q / |b|).
    """
    a, b = theta_init.astype(np.float64), theta.astype(np.float64)
    v = v.astype(np.float64) / np.linalg.norm(v)
    nb = np.linalg.norm(b)
    p, q, big_a, c = a @ b, v @ b, a @ a, a @ v

    def cos_at(t: float) -> float:
        x = a + t * v
        return float(x @ b / (np.linalg.norm(x) * nb))

    candidates = [cos_at(0.0), abs(q) / nb]
    denom = q * c - p
    if abs(denom) > 1e-15:
        candidates.append(cos_at((p * c - q * big_a) / denom))
    return max(candidates)


@dataclass
class TokenAudit:
    """A round hook that scores every arrived device under the four server views."""

    noise_multiplier: float
    seed: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, round_num: int, server: SimulatedServer, arrived: list[tuple[Device, TaskResult]]) -> None:
        if not arrived:
            return
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, AUDIT_STREAM, round_num]))
        moments = [np.asarray(res.reply[SECOND_MOMENT], dtype=np.float64) for _, res in arrived]
        total = np.sum(moments, axis=0)
        std_noise = add_gaussian_noise(np.zeros(total.size), noise_multiplier=self.noise_multiplier,
                                       sensitivity=server.schema.sensitivity, rng=rng).reshape(total.shape)
        sum_dir = top_direction(total)
        noisy_dir = top_direction(total + std_noise)
        for (dev, res), moment in zip(arrived, moments, strict=True):
            audit = res.extra.get("audit")
            if audit is None:
                raise ValueError("the privacy audit needs fleet.audit = true (tokens returned to the harness)")
            theta, init = audit["theta"], audit["theta_init"]
            delta = theta - init
            own = top_direction(moment)
            random_dir = rng.standard_normal(theta.size)
            random_dir /= np.linalg.norm(random_dir)
            views = {"individual": own, "individual + central DP": own, "secagg sum": sum_dir,
                     "secagg sum + DP": noisy_dir}
            for view, v in views.items():
                self.rows.append({"round": round_num, "device": dev.id, "view": view, "contributors": len(arrived),
                                  "direction_cos": abs_cos(v, delta), "token_cos": best_line_cos(init, v, theta)})
            self.rows.append({"round": round_num, "device": dev.id, "view": "initializer only",
                              "contributors": len(arrived), "direction_cos": abs_cos(random_dir, delta),
                              "token_cos": float(init @ theta / (np.linalg.norm(init) * np.linalg.norm(theta)))})

    def summary(self) -> list[dict[str, Any]]:
        """Mean and 90th percentile of both scores per view (over devices and rounds)."""
        out = []
        for view in VIEWS:
            rows = [r for r in self.rows if r["view"] == view]
            if not rows:
                continue
            d = np.array([r["direction_cos"] for r in rows])
            t = np.array([r["token_cos"] for r in rows])
            out.append({"server view": view, "device rounds": len(rows), "direction |cos| mean": float(d.mean()),
                        "direction |cos| p90": float(np.quantile(d, 0.9)), "token cos mean": float(t.mean()),
                        "token cos p90": float(np.quantile(t, 0.9))})
        return out


NOTES = """Scores per device and round, averaged over every device round that reached the server.
`direction |cos|` compares the server's direction estimate with the device's true displacement
theta - theta_init (a random guess scores about sqrt(2 / (pi D))); `token cos` is the best cosine
with the token that the initializer plus a step along the estimate could reach (an upper bound on
what the server could do with it). Central DP noise is added to the sum, so without secure
aggregation it changes nothing the server sees; with secure aggregation the device's direction is
mixed with the other contributors', and DP noise blurs it further. Tokens are read from the device
states by the harness only to score the estimates; they never travel."""


def main(argv: list[str] | None = None) -> int:
    args = study_parser("Privacy audit: the server's best estimate of a device's token").parse_args(argv)
    base = load_study_scenario("privacy_audit")
    overrides = common_overrides(args)
    audits: dict[str, TokenAudit] = {}

    def hook(name: str) -> TokenAudit:
        data = {**base.get("dp", {}), **{k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("dp.")}}
        audits[name] = TokenAudit(noise_multiplier=float(data.get("noise-multiplier", 1.0)),
                                  seed=int(base["fleet"].get("seed", 0)))
        return audits[name]

    run_variants(base, {"audit": {}}, args.out, common={**overrides, "fleet.audit": True}, hook_factory=hook)
    rows = audits["audit"].summary()
    path = write_study(args.out, "privacy_audit", "Privacy audit: what an honest-but-curious server can infer",
                       rows, NOTES, overrides)
    print(f"study: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
