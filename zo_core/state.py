"""A device's personal state: the token and everything needed to continue learning it exactly.

All tensors are fp32 (even when the model runs in 16 bits: 16-bit perturbations do not restore
exactly and a ZO run drifts). `to_tensors` / `from_tensors` give a flat name -> tensor map that
safetensors (and the client's encrypted store) can hold.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


def _encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _decode(t: torch.Tensor) -> str:
    return bytes(t.to(torch.uint8).tolist()).decode("utf-8")


@dataclass(frozen=True)
class PersonalState:
    """Token theta (V, d), Adam moments, SG buffer and projector, step counter and seed."""

    placeholder: str
    initializer: str
    theta: torch.Tensor  # (V, d) fp32
    exp_avg: torch.Tensor  # (V, d) Adam first moment
    exp_avg_sq: torch.Tensor  # (V, d) Adam second moment
    step: int  # optimizer steps taken so far (also the index of the next step's random draws)
    seed: int  # the run's seed: step s draws from a generator seeded by (seed, s)
    sg_buffer: torch.Tensor  # (filled <= tau, D): last tokens, oldest first
    sg_dirs: torch.Tensor  # (r, D): directions the Subspace Gradient removes

    @classmethod
    def fresh(cls, placeholder: str, initializer: str, theta: torch.Tensor, seed: int) -> PersonalState:
        theta = theta.detach().float().clone()
        dim = theta.numel()
        return cls(
            placeholder=placeholder,
            initializer=initializer,
            theta=theta,
            exp_avg=torch.zeros_like(theta),
            exp_avg_sq=torch.zeros_like(theta),
            step=0,
            seed=int(seed),
            sg_buffer=torch.zeros(0, dim),
            sg_dirs=torch.zeros(0, dim),
        )

    @property
    def num_vectors(self) -> int:
        return int(self.theta.shape[0])

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "theta": self.theta.contiguous(),
            "exp_avg": self.exp_avg.contiguous(),
            "exp_avg_sq": self.exp_avg_sq.contiguous(),
            "step": torch.tensor([self.step], dtype=torch.int64),
            "seed": torch.tensor([self.seed], dtype=torch.int64),
            "sg_buffer": self.sg_buffer.contiguous(),
            "sg_dirs": self.sg_dirs.contiguous(),
            "placeholder": _encode(self.placeholder),
            "initializer": _encode(self.initializer),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> PersonalState:
        missing = {"theta", "exp_avg", "exp_avg_sq", "step", "seed", "sg_buffer", "sg_dirs", "placeholder",
                   "initializer"} - set(t)  # fmt: skip
        if missing:
            raise ValueError(f"personal state is missing {sorted(missing)}")
        theta = t["theta"].float()
        if theta.dim() != 2 or t["exp_avg"].shape != theta.shape or t["exp_avg_sq"].shape != theta.shape:
            raise ValueError("personal state tensors have inconsistent shapes")
        if not torch.isfinite(theta).all():
            raise ValueError("personal state holds a non-finite token")
        return cls(
            placeholder=_decode(t["placeholder"]),
            initializer=_decode(t["initializer"]),
            theta=theta,
            exp_avg=t["exp_avg"].float(),
            exp_avg_sq=t["exp_avg_sq"].float(),
            step=int(t["step"].item()),
            seed=int(t["seed"].item()),
            sg_buffer=t["sg_buffer"].float().reshape(-1, theta.numel()),
            sg_dirs=t["sg_dirs"].float().reshape(-1, theta.numel()),
        )

    def replace(self, **changes: object) -> PersonalState:
        return replace(self, **changes)  # type: ignore[arg-type]
