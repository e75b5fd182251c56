"""Frozen, validated configs of the engine (one per component).

Defaults are the paper's (ZOODiP, CVPR 2025, section 4 and the reference script): n = 2 directions,
mu = 1e-3, Adam(0.9, 0.999, eps 1e-3), tau = 128, nu = 1e-3, PUTS window [500, 900) of T = 1000.
The learning rate is 5e-3 as in the paper's text (the reference script uses 1e-2). One deviation,
for small tokens only: the SG buffer length defaults to min(128, D // 4) (`ZOConfig.sg_tau`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

Estimator = Literal["rge", "spsa"]
Optimizer = Literal["zo", "backprop"]
QuantBackend = Literal["none", "quanto-int8", "quanto-int4", "bnb-int8", "bnb-nf4"]
QUANT_BACKENDS: tuple[str, ...] = ("none", "quanto-int8", "quanto-int4", "bnb-int8", "bnb-nf4")

C = TypeVar("C")


def default_mu(backend: str) -> float:
    """The paper's perturbation scale: 1e-3, raised to 1e-2 for 4-bit UNets (4-bit rounding noise
    swamps finite differences at 1e-3; ZOODiP section 5, 4-bit experiment)."""
    return 1e-2 if backend in ("quanto-int4", "bnb-nf4") else 1e-3


def config_kwargs(cls: type, table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Map a table's kebab-case keys onto a dataclass's snake_case fields; unknown keys are an error.

    The one place where TOML / run-config tables become config keyword arguments: a misspelt key
    must fail loudly instead of silently leaving a default in place (Flower issue #4317).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in names:
            allowed = ", ".join(sorted(n.replace("_", "-") for n in names))
            raise ValueError(f"{where}: unknown key {key!r}; allowed keys: {allowed}")
        out[name] = value
    return out


def _from_mapping(cls: type[C], values: Mapping[str, Any], prefix: str) -> C:
    """Build a config from `prefix`-ed kebab- or snake-case keys."""
    table = {key.removeprefix(prefix): value for key, value in values.items()}
    return cls(**config_kwargs(cls, table, f"{prefix.rstrip('.')} config"))


@dataclass(frozen=True)
class ZOConfig:
    """Zeroth-order optimisation of the token (RGE / SPSA + Adam + Subspace Gradient + PUTS)."""

    estimator: Estimator = "rge"
    n: int = 2  # directions per step; RGE costs n + 1 forwards, SPSA 2n
    mu: float = 1e-3  # perturbation scale
    lr: float = 5e-3
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-3
    use_sg: bool = True  # Subspace Gradient (method.md section 4)
    tau: int | None = None  # SG buffer length and refresh period; None: sg_tau's token-size rule
    nu: float = 1e-3  # SG: variance fraction treated as noise
    puts: tuple[int, int] | None = (500, 900)  # [T_L, T_U); None = uniform over [0, T)
    batched: bool = True  # the n + 1 candidates in ONE forward (False: one forward each)

    def __post_init__(self) -> None:
        if self.estimator not in ("rge", "spsa"):
            raise ValueError(f"zo.estimator must be 'rge' or 'spsa', got {self.estimator!r}")
        if self.n < 1:
            raise ValueError(f"zo.n must be >= 1, got {self.n}")
        for name in ("mu", "lr", "adam_eps", "nu"):
            if not getattr(self, name) > 0:
                raise ValueError(f"zo.{name} must be > 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"zo.beta1/beta2 must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if self.tau is not None and self.tau < 2:
            raise ValueError(f"zo.tau must be >= 2, got {self.tau}")
        if self.nu >= 1:
            raise ValueError(f"zo.nu must be < 1, got {self.nu}")
        if self.puts is not None:
            lo, hi = self.puts
            if not (0 <= lo < hi):
                raise ValueError(f"zo.puts must be a window 0 <= T_L < T_U, got {self.puts}")
            object.__setattr__(self, "puts", (int(lo), int(hi)))

    def sg_tau(self, token_size: int) -> int:
        """The SG buffer length for a token of `token_size` (D) floats: `tau` if set, else
        min(128, D // 4), at least 2.

        The paper's tau = 128 was tuned at D = 768, where a centred 128-row buffer spans at most
        127 of 768 directions, so SG can remove at most 17% of token space. At D <= 128 the buffer
        spans all of it: on the embedded model (D = 64) tau = 128 removed 57 of 64 directions and
        ZOODiP's final concept match fell to 0.17, against 0.49 with tau = 16 and 0.54 without SG
        (lagoon and glacier, 3 seeds; benchmarks/results/quality-notes.md). D // 4 keeps the
        buffer well inside token space and gives the paper's 128 from D = 512 up.
        """
        if self.tau is not None:
            return self.tau
        return max(2, min(128, token_size // 4))

    @property
    def forwards_per_step(self) -> int:
        return 2 * self.n if self.estimator == "spsa" else self.n + 1

    @classmethod
    def from_run_config(cls, values: Mapping[str, Any]) -> ZOConfig:
        return _from_mapping(cls, values, "zo.")


@dataclass(frozen=True)
class TIConfig:
    """What is learned: the placeholder, its initializer word and how it is captioned."""

    placeholder: str = "<my-token>"
    initializer: str = "object"
    num_vectors: int = 1
    resolution: int | None = None  # None: the model's native resolution
    flip: bool = True  # also cache horizontally flipped latents
    min_image_side: int = 64  # images smaller than this (pixels) are rejected

    def __post_init__(self) -> None:
        if not self.placeholder or any(c.isspace() for c in self.placeholder):
            raise ValueError(f"placeholder must be a non-empty string without spaces, got {self.placeholder!r}")
        if not self.initializer.strip():
            raise ValueError("initializer word must not be empty")
        if not 1 <= self.num_vectors <= 16:
            raise ValueError(f"num_vectors must be in 1..16, got {self.num_vectors}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a multiple of 8 and >= 8, got {self.resolution}")
        if self.min_image_side < 1:
            raise ValueError(f"min_image_side must be >= 1, got {self.min_image_side}")

    @property
    def token_strings(self) -> list[str]:
        """The tokenizer tokens of the placeholder: `<tok>`, `<tok>_1`, ... (one per vector)."""
        return [self.placeholder] + [f"{self.placeholder}_{i}" for i in range(1, self.num_vectors)]

    @property
    def prompt_text(self) -> str:
        """What replaces the placeholder in a caption so that every vector is used."""
        return " ".join(self.token_strings)


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantization backend applied once, at load."""

    backend: QuantBackend = "none"

    def __post_init__(self) -> None:
        if self.backend not in QUANT_BACKENDS:
            raise ValueError(f"quant backend must be one of {list(QUANT_BACKENDS)}, got {self.backend!r}")


@dataclass(frozen=True)
class TrainConfig:
    """One personalization run (the `personalize` command)."""

    steps: int = 3000
    seed: int = 0
    optimizer: Optimizer = "zo"
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.optimizer not in ("zo", "backprop"):
            raise ValueError(f"optimizer must be 'zo' or 'backprop', got {self.optimizer!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
