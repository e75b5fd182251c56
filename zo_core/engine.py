"""The device-side engine: a loaded (quantized) model that learns personal tokens with forward passes.

`Personalizer` is loaded once per process; personal data and states are separate objects, so one
process can serve many devices (the fleet simulation) or one owner (an edge box). The step itself is
Algorithm 1 of ZOODiP: draw the sample and directions, evaluate the n + 1 candidates in one forward,
estimate g, remove the low-variance subspace, Adam-update theta, push theta into the SG buffer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from zo_core import estimator as est
from zo_core.config import QuantConfig, TIConfig, ZOConfig
from zo_core.images import PrivateImages, from_memory, load_private_images, to_tensor
from zo_core.model_io import ModelInfo, fingerprint, inspect_model_dir
from zo_core.objective import Objective, Sample
from zo_core.puts import check_window, sample_timestep
from zo_core.state import PersonalState
from zo_core.subspace import low_variance_directions, project_out
from zo_core.token_splice import PlaceholderRegistry, TokenSplicer

StepCallback = Callable[[int, float], None]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step: every random draw of step s comes from (seed, s), so a resumed run
    repeats an uninterrupted one exactly, and a step can be replayed from its seed alone (as in MeZO)."""
    mixed = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(mixed & 0x7FFF_FFFF_FFFF_FFFF)


@dataclass(frozen=True)
class PrivateData:
    """Cached latents of a device's photos (and their flips) and tokenized captions. Stays on device."""

    ti: TIConfig
    latent_mean: torch.Tensor  # (N, C, h, w), scaled like the UNet's inputs
    latent_std: torch.Tensor  # (N, C, h, w)
    captions: list[torch.Tensor]  # per latent: (num_captions, L) token ids
    token_ids: list[int]

    def __len__(self) -> int:
        return int(self.latent_mean.shape[0])


@dataclass
class RoundResult:
    """What `Personalizer.train` returns; the input state is left untouched."""

    state: PersonalState
    losses: list[float] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    signal: list[float] = field(default_factory=list)
    updates: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    grads: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (steps, D), keep_grads only
    forward_passes: int = 0
    wall_s: float = 0.0


class Personalizer:
    """A frozen Stable Diffusion model (UNet + text encoder, optionally quantized) that learns tokens."""

    def __init__(self, info: ModelInfo, tokenizer, text_encoder, unet, scheduler, quant: QuantConfig,  # type: ignore[no-untyped-def]
                 dtype: torch.dtype, quant_report: object | None = None) -> None:  # fmt: skip
        self.info = info
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.scheduler = scheduler
        self.quant = quant
        self.dtype = dtype
        self.quant_report = quant_report
        self.registry = PlaceholderRegistry(tokenizer, text_encoder.get_input_embeddings().num_embeddings)
        self.splicer = TokenSplicer(text_encoder.get_input_embeddings(), self.registry)
        self.fingerprint = fingerprint(info.root)  # of the base weights; quantization is per device
        self._vae = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path | None = None,
        *,
        quant: QuantConfig = QuantConfig(),
        dtype: torch.dtype = torch.float32,
    ) -> Personalizer:
        """Load a local SD folder (diffusers layout; `None`: the embedded default), freeze and quantize it."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        info = inspect_model_dir(model_dir)
        tokenizer = CLIPTokenizer.from_pretrained(info.root / "tokenizer", local_files_only=True)
        # training needs only the noise schedule: DDPM's add_noise / get_velocity on the folder's betas
        scheduler = DDPMScheduler.from_pretrained(info.root / "scheduler", local_files_only=True)
        # each model is quantized as soon as it is loaded, so two float models are never resident at once
        unet = UNet2DConditionModel.from_pretrained(info.root / "unet", local_files_only=True, torch_dtype=dtype)
        parts = [_freeze_and_quantize("unet", unet, quant)]
        text_encoder = CLIPTextModel.from_pretrained(info.root / "text_encoder", local_files_only=True, dtype=dtype)
        parts.append(_freeze_and_quantize("text_encoder", text_encoder, quant))
        report = None
        if quant.backend != "none":
            from zo_core.quantize import QuantReport

            report = QuantReport(backend=quant.backend, components=tuple(p for p in parts if p is not None))
        return cls(info, tokenizer, text_encoder, unet, scheduler, quant, dtype, report)

    @property
    def token_dim(self) -> int:
        return self.info.token_dim

    @property
    def num_train_timesteps(self) -> int:
        return self.info.num_train_timesteps

    def vae(self):  # type: ignore[no-untyped-def]
        """The VAE, loaded on demand: it is needed once per image and for decoding, not for training."""
        if self._vae is None:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(self.info.root / "vae", local_files_only=True, torch_dtype=self.dtype)
            _freeze_and_quantize("vae", vae, self.quant)
            self._vae = vae
        return self._vae

    def free_vae(self) -> None:
        self._vae = None

    # ---------------------------------------------------------------- data and state
    def prepare_data(self, images_dir: str | Path, ti: TIConfig) -> PrivateData:
        """Validate the photos and encode them (and their flips) to latents ONCE; the VAE is freed after."""
        return self._encode(load_private_images(images_dir, min_side=ti.min_image_side), ti)

    def prepare_data_from_images(
        self, images: Sequence[Image.Image], ti: TIConfig, captions: Sequence[str | None] | None = None
    ) -> PrivateData:
        return self._encode(from_memory(images, captions, min_side=ti.min_image_side), ti)

    @torch.no_grad()
    def _encode(self, photos: PrivateImages, ti: TIConfig) -> PrivateData:
        token_ids = self.registry.register(ti.token_strings)
        self.registry.initializer_id(ti.initializer)  # fail now, not after encoding
        res = ti.resolution or self.info.resolution
        if res % self.info.vae_scale_factor:
            raise ValueError(f"resolution {res} is not a multiple of the VAE factor {self.info.vae_scale_factor}")
        pixels = torch.stack([to_tensor(img, res) for img in photos.images])  # (N, 3, R, R)
        captions = [self._tokenize(caps, ti) for caps in photos.captions]
        if ti.flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
            captions = captions + captions
        vae = self.vae()
        scale = float(vae.config.scaling_factor)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        means, stds = [], []
        for px in pixels.split(1):  # one image at a time: the encoder's activations dominate this phase
            dist = vae.encode(px.to(self.dtype)).latent_dist
            means.append((dist.mean.float() - shift) * scale)
            stds.append(dist.std.float() * scale)
        mean, std = torch.cat(means).contiguous(), torch.cat(stds).contiguous()
        self.free_vae()
        return PrivateData(ti=ti, latent_mean=mean, latent_std=std, captions=captions, token_ids=token_ids)

    def _tokenize(self, templates: Sequence[str], ti: TIConfig) -> torch.Tensor:
        texts = [t.format(ti.prompt_text) for t in templates]
        ids = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
        return ids

    def init_state(self, ti: TIConfig, seed: int = 0) -> PersonalState:
        """theta = V copies of the initializer word's embedding (fp32)."""
        self.registry.register(ti.token_strings)
        init_id = self.registry.initializer_id(ti.initializer)
        row = self.text_encoder.get_input_embeddings().weight[init_id].detach().float()
        return PersonalState.fresh(ti.placeholder, ti.initializer, row.repeat(ti.num_vectors, 1), seed)

    # ---------------------------------------------------------------- training
    def _draw_sample(self, data: PrivateData, gen: torch.Generator, window: tuple[int, int]) -> Sample:
        i = int(torch.randint(len(data), (1,), generator=gen).item())
        caps = data.captions[i]
        c = int(torch.randint(caps.shape[0], (1,), generator=gen).item())
        mean, std = data.latent_mean[i : i + 1], data.latent_std[i : i + 1]
        latent = mean + std * torch.randn(mean.shape, generator=gen)
        noise = torch.randn(mean.shape, generator=gen)
        return Sample(latent=latent, noise=noise, timestep=sample_timestep(gen, window), input_ids=caps[c : c + 1])

    @torch.no_grad()
    def evaluate(self, data: PrivateData, state: PersonalState, *, window: tuple[int, int] | None,
                 draws: int, seed: int) -> float:  # fmt: skip
        """Mean loss of the state's token on `draws` draws fixed by `seed` (not the training stream),
        so that losses of two rounds or two tokens compare on the same samples."""
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        window = check_window(window, self.num_train_timesteps)
        objective = Objective(self.text_encoder, self.unet, self.scheduler, self.splicer, data.token_ids)
        total = 0.0
        for i in range(draws):
            sample = self._draw_sample(data, step_generator(seed, i), window)
            total += float(objective.losses(sample, state.theta[None])[0])
        return total / draws

    def train(
        self,
        data: PrivateData,
        state: PersonalState,
        zo: ZOConfig,
        steps: int,
        *,
        optimizer: str = "zo",
        basis: torch.Tensor | None = None,
        basis_weight: float = 0.0,
        on_step: StepCallback | None = None,
        keep_grads: bool = False,
    ) -> RoundResult:
        """Run `steps` optimizer steps from `state`; returns the new state and the round's traces.

        `keep_grads` also returns every step's raw gradient estimate (the fleet's "gradients"
        statistic needs them); off by default, since a long run would hold steps x D floats.
        """
        if optimizer not in ("zo", "backprop"):
            raise ValueError(f"optimizer must be 'zo' or 'backprop', got {optimizer!r}")
        if state.placeholder != data.ti.placeholder or state.num_vectors != data.ti.num_vectors:
            raise ValueError(
                f"state is for {state.placeholder!r} x{state.num_vectors}, data for "
                f"{data.ti.placeholder!r} x{data.ti.num_vectors}"
            )
        window = check_window(zo.puts, self.num_train_timesteps)
        objective = Objective(self.text_encoder, self.unet, self.scheduler, self.splicer, data.token_ids)
        shape = state.theta.shape
        theta = state.theta.clone()
        m, v = state.exp_avg.clone(), state.exp_avg_sq.clone()
        buffer, dirs = state.sg_buffer.clone(), state.sg_dirs.clone()
        tau = zo.sg_tau(theta.numel())
        result = RoundResult(state=state)
        updates: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        start = time.perf_counter()
        step = state.step
        for _ in range(steps):
            gen = step_generator(state.seed, step)
            sample = self._draw_sample(data, gen, window)
            if optimizer == "zo":
                g, loss, signal = self._zo_grad(objective, sample, theta, zo, gen, basis, basis_weight)
                raw = g  # the estimate before the Subspace Gradient projection
                if zo.use_sg:
                    g = project_out(g, dirs)
                result.forward_passes += zo.forwards_per_step
                result.signal.append(signal)
            else:
                g, loss = self._backprop_grad(objective, sample, theta)
                raw = g
                result.forward_passes += 1
            if keep_grads:
                grads.append(raw.flatten())
            if not np.isfinite(loss) or not torch.isfinite(g).all():
                raise FloatingPointError(f"non-finite loss or gradient at step {step} (loss {loss})")
            new_theta = _adam_step(theta, g.view(shape), m, v, step + 1, zo)
            updates.append((new_theta - theta).flatten())
            theta = new_theta
            step += 1
            if zo.use_sg and optimizer == "zo":
                buffer = torch.cat([buffer, theta.flatten()[None]])[-tau:]
                if step % tau == 0 and buffer.shape[0] == tau:
                    dirs = low_variance_directions(buffer, zo.nu)
            result.losses.append(loss)
            result.timesteps.append(sample.timestep)
            if on_step is not None:
                on_step(step, loss)
        result.wall_s = time.perf_counter() - start
        result.updates = torch.stack(updates) if updates else torch.zeros(0, theta.numel())
        result.grads = torch.stack(grads) if grads else torch.zeros(0, theta.numel())
        result.state = state.replace(theta=theta, exp_avg=m, exp_avg_sq=v, step=step, sg_buffer=buffer, sg_dirs=dirs)
        return result

    @torch.no_grad()
    def _zo_grad(self, objective: Objective, sample: Sample, theta: torch.Tensor, zo: ZOConfig,
                 gen: torch.Generator, basis: torch.Tensor | None, basis_weight: float) -> tuple[torch.Tensor, float, float]:  # fmt: skip
        shape = theta.shape

        def loss_fn(cands: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B,)
            return objective.losses(sample, cands.view(-1, *shape), batched=zo.batched)

        directions = est.draw_directions(gen, zo.n, theta.numel(), basis, basis_weight)
        fn = est.rge if zo.estimator == "rge" else est.spsa
        e = fn(loss_fn, theta.flatten(), directions, zo.mu)
        return e.grad, e.loss, e.signal

    def _backprop_grad(self, objective: Objective, sample: Sample, theta: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The backprop textual-inversion baseline: autograd through the frozen model to theta only."""
        leaf = theta.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = objective.losses(sample, leaf[None])[0]
            (grad,) = torch.autograd.grad(loss, leaf)
        return grad.flatten().float(), float(loss.detach())

    # ---------------------------------------------------------------- output
    def export(self, state: PersonalState, path: str | Path) -> Path:
        """`learned_embeds.safetensors`: {placeholder: (V, d)}, the format diffusers' load_textual_inversion reads."""
        from zo_core.export import save_learned_embeds

        return save_learned_embeds(state.placeholder, state.theta, path)

    def generate(self, state: PersonalState | None, prompts: Sequence[str], **options: Any) -> list[Image.Image]:
        """Images for prompts containing the state's placeholder; options as `zo_core.generate.generate_images`."""
        from zo_core.generate import generate_images

        return generate_images(self, state, prompts, **options)


def _freeze_and_quantize(name: str, module: torch.nn.Module, quant: QuantConfig):  # type: ignore[no-untyped-def]
    """Freeze a loaded component and quantize it with the engine's backend (None when unquantized)."""
    module.requires_grad_(False).eval()
    if quant.backend == "none":
        return None
    from zo_core.quantize import quantize_component

    return quantize_component(name, module, quant.backend)


def _adam_step(theta: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, zo: ZOConfig) -> torch.Tensor:
    """Adam on the (estimated) gradient with fp32 moments, updated in place; returns the new theta.

    torch.optim's functional `adam` does the same arithmetic; we call it so the update is the library's.
    """
    from torch.optim.adam import adam

    new = theta.clone()
    adam([new], [g.float()], [m], [v], [], [torch.tensor(float(t - 1))], foreach=False, capturable=False,
         differentiable=False, fused=None, grad_scale=None, found_inf=None, has_complex=False, amsgrad=False,
         beta1=zo.beta1, beta2=zo.beta2, lr=zo.lr, weight_decay=0.0, eps=zo.adam_eps, maximize=False)  # fmt: skip
    return new
