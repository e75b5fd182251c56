"""The textual-inversion objective, evaluated for B token candidates under common random numbers.

    L(theta) = || target - eps_phi(z_t, t, c(y*; theta)) ||^2,   z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps

target = eps (epsilon prediction), the velocity (v-prediction) or z (sample prediction), as the
model's scheduler config says. All B candidates share the latent z, caption y, noise eps and timestep t
(common random numbers): their losses differ only through the token, which is what makes the finite
differences of the ZO estimator meaningful at mu = 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zo_core.token_splice import TokenSplicer


@dataclass(frozen=True)
class Sample:
    """One training draw shared by every candidate of a step."""

    latent: torch.Tensor  # (1, C, h, w), already scaled by the VAE scaling factor
    noise: torch.Tensor  # (1, C, h, w)
    timestep: int
    input_ids: torch.Tensor  # (1, L) caption with the placeholder tokens


class Objective:
    """Loss of candidate tokens for one sample; the model's weights are frozen and never written."""

    def __init__(self, text_encoder, unet, scheduler, splicer: TokenSplicer, token_ids: list[int]) -> None:  # type: ignore[no-untyped-def]
        self.text_encoder = text_encoder
        self.unet = unet
        self.scheduler = scheduler
        self.splicer = splicer
        self.token_ids = token_ids
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.unet.parameters() if p.is_floating_point()).dtype

    def encode_prompt(self, input_ids: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Text features (B, L, d) of the caption with candidate b spliced into row b."""
        ids = input_ids.expand(cand.shape[0], -1)
        with self.splicer.candidates(self.token_ids, cand):
            return self.text_encoder(ids)[0]

    def losses(self, sample: Sample, cand: torch.Tensor, *, batched: bool = True) -> torch.Tensor:
        """Per-candidate loss (B,) for candidates `cand` (B, V, d); one forward, or B forwards if not batched."""
        if not batched:
            return torch.cat([self.losses(sample, cand[b : b + 1]) for b in range(cand.shape[0])])
        B = cand.shape[0]
        t = torch.tensor([sample.timestep], dtype=torch.long, device=sample.latent.device)
        noisy = self.scheduler.add_noise(sample.latent, sample.noise, t)
        if self.prediction_type == "epsilon":
            target = sample.noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(sample.latent, sample.noise, t)
        else:
            target = sample.latent
        text = self.encode_prompt(sample.input_ids, cand)
        dtype = self.dtype
        pred = self.unet(noisy.expand(B, -1, -1, -1).to(dtype), t.expand(B), text.to(dtype)).sample
        return F.mse_loss(pred.float(), target.expand(B, -1, -1, -1).float(), reduction="none").mean(dim=(1, 2, 3))
