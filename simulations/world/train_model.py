"""Train the embedded default model (a tiny Stable-Diffusion-shaped model) on the synthetic world.

Stages (each checkpointed, so a crash loses at most `--ckpt-every` steps):

1. tokenizer: a CLIP byte-level BPE in which every world word is one token
   (`zo_core.model_factory.save_clip_tokenizer`);
2. VAE: an `AutoencoderKL` with 4x downsampling (64 px RGB -> 16 x 16 x 4 latents), trained with
   L1 + MSE reconstruction and a small KL term; `scaling_factor` = 1 / std of the latents,
   measured on data and stored in the VAE config as Stable Diffusion does;
3. latent cache: `--num-images` rendered images encoded once (posterior means);
4. UNet + CLIP text encoder, trained jointly from scratch with epsilon prediction on the SD1.5
   noise schedule (`model_factory.make_scheduler`), captions dropped to "" with probability
   `--cfg-drop` so that classifier-free guidance works at sampling time;
5. export: a `StableDiffusionPipeline` folder (model_index.json, unet/, vae/, text_encoder/,
   tokenizer/, scheduler/) in safetensors, plus the training curve PNG and a JSON record.

Run: ``python -m simulations.world.train_model --out zo_core/assets/tinyworld``.
Deterministic for a given seed, thread count and torch build: every random draw comes from
generators derived from `--seed` (data from numpy Generators keyed by (seed, stage, step)).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from simulations.world.captions import training_caption, training_caption_named, vocabulary
from simulations.world.render import ATTRIBUTES, render_batch, sample_scene
from zo_core.model_factory import make_scheduler, save_clip_tokenizer


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained model (saved next to it)."""

    seed: int = 0
    resolution: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_groups: int = 8
    latent_channels: int = 4
    vae_steps: int = 1800
    vae_cycle: int = 900  # cosine warm restarts (SGDR) every this many VAE steps
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    num_images: int = 24_000
    token_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # Three levels (16 -> 8 -> 4 latent pixels), cross-attention at 16 and 8, the mid block at 4.
    # The two-level (48, 96) UNet drew the asked position at chance (0.36) after 3,000 steps: its
    # 8 x 8 bottleneck gives a zero-padded conv stack little absolute-position signal.
    unet_channels: tuple[int, ...] = (48, 96, 128)
    unet_heads: int = 4  # diffusers' legacy `attention_head_dim` is the number of heads
    unet_groups: int = 16
    # Also add attention-pooled text features to the timestep embedding (diffusers'
    # addition_embed_type="text"): a global conditioning path next to cross-attention. Without it
    # the 1500-step model learned almost no text conditioning (denoising MSE with the right caption
    # 0.01505 vs empty caption 0.01564) and drew captions at chance level.
    unet_text_time_embed: bool = True
    unet_steps: int = 3000
    # Cosine warm restarts every this many UNet steps. One cycle (1500 steps) drew the asked shape
    # in 0.48 of images; a second cycle, restarted from that settled model, in 0.90
    # (simulations/world/evaluate_model.py, 192 captions, guidance 4).
    unet_cycle: int = 1500
    text_steps: int = 600  # text-encoder pretraining (stage 3b)
    text_batch: int = 128
    text_lr: float = 2e-3
    text_lr_scale: float = 0.1  # text encoder lr during UNet training, relative to unet_lr
    unet_batch: int = 48
    unet_lr: float = 1e-3
    warmup: int = 50
    cfg_drop: float = 0.1
    caption_drop: float = 0.3
    ckpt_every: int = 100

    def __post_init__(self) -> None:
        for name in ("vae_steps", "vae_batch", "num_images", "unet_steps", "unet_batch",
                     "ckpt_every", "token_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 16 != 0:
            raise ValueError(f"resolution must be a multiple of 16, got {self.resolution}")
        if len(self.vae_channels) != 3:
            raise ValueError("vae_channels must have 3 entries (4x downsampling), "
                             f"got {self.vae_channels}")
        if self.vae_cycle <= self.warmup or self.unet_cycle <= self.warmup:
            raise ValueError(f"vae_cycle ({self.vae_cycle}) and unet_cycle ({self.unet_cycle}) "
                             f"must exceed warmup ({self.warmup})")
        if not 0 <= self.cfg_drop < 1 or not 0 <= self.caption_drop < 1:
            raise ValueError("cfg_drop and caption_drop must be in [0, 1)")
        if self.token_dim % self.text_heads != 0:
            raise ValueError(f"token_dim {self.token_dim} not divisible by text_heads "
                             f"{self.text_heads}")


def build_models(cfg: TrainConfig, tokenizer_dir: Path) -> dict[str, Any]:
    """Fresh VAE, UNet and text encoder (weights drawn from a generator seeded by cfg.seed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    # Module constructors draw from torch's global RNG; fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=cfg.vae_channels, layers_per_block=1,
            latent_channels=cfg.latent_channels, norm_num_groups=cfg.vae_groups,
            sample_size=cfg.resolution,
        )
        # Start the posterior's log-variance at -8 (std 0.02): with the default 0 the decoder
        # first sees latents drowned in unit noise and learns only colour blobs for hundreds of
        # steps; SD's own VAE ends with tiny posterior std anyway, so `.sample()` and `.mode()`
        # give almost the same latents, as engines that call either expect.
        with torch.no_grad():
            vae.quant_conv.bias[cfg.latent_channels:] = -8.0
        n = len(cfg.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=cfg.resolution // 4,
            in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
            block_out_channels=cfg.unet_channels, layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            cross_attention_dim=cfg.token_dim, attention_head_dim=cfg.unet_heads,
            norm_num_groups=cfg.unet_groups,
            addition_embed_type="text" if cfg.unet_text_time_embed else None,
            addition_embed_type_num_heads=cfg.text_heads,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.token_dim,
            intermediate_size=cfg.token_dim * 4, num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, projection_dim=cfg.token_dim,
        ))
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer}


def _images(rng: np.random.Generator, n: int, resolution: int) -> tuple[torch.Tensor, list]:
    scenes = [sample_scene(rng) for _ in range(n)]
    pixels = torch.from_numpy(render_batch(scenes, rng, resolution)).permute(0, 3, 1, 2)
    return pixels.float() / 127.5 - 1.0, scenes  # (n, 3, H, W) in [-1, 1], SD's convention


def _lr(step: int, total: int, base: float, warmup: int, cycle: int | None = None) -> float:
    """Linear warmup then cosine decay to 5% (short runs need the decay to settle).

    With `cycle`, the cosine restarts every `cycle` steps (SGDR, Loshchilov & Hutter 2017): the
    VAE is still improving when one decay ends, and a restart resumes the climb from a settled
    point instead of a fresh schedule.
    """
    if cycle is not None:
        step, total = step % cycle, cycle
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class Checkpointer:
    """One file per stage in the work dir; written atomically (tmp + rename)."""

    def __init__(self, work: Path) -> None:
        self.work = work

    def path(self, stage: str) -> Path:
        return self.work / f"{stage}.ckpt.pt"

    def save(self, stage: str, state: dict[str, Any]) -> None:
        tmp = self.path(stage).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path(stage))

    def load(self, stage: str) -> dict[str, Any] | None:
        p = self.path(stage)
        return torch.load(p, weights_only=False) if p.exists() else None


def _log(log_file: Path, record: dict[str, Any]) -> None:
    with log_file.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def train_vae(cfg: TrainConfig, vae: torch.nn.Module, ck: Checkpointer, log_file: Path) -> None:
    """Stage 2: reconstruction training of the autoencoder."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = 0
    if (state := ck.load("vae")) is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    vae.train()
    t0 = time.time()
    for step in range(start, cfg.vae_steps):
        rng = np.random.default_rng([cfg.seed, 1, step])
        x, _ = _images(rng, cfg.vae_batch, cfg.resolution)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen)
        rec = vae.decode(z).sample
        loss_rec = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = loss_rec + cfg.vae_kl * posterior.kl().mean()
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup, cfg.vae_cycle)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        _log(log_file, {"stage": "vae", "step": step, "loss": loss_rec.item(),
                        "elapsed_s": time.time() - t0})
        if step % 20 == 0 or step == cfg.vae_steps - 1:
            print(f"[vae] step {step + 1}/{cfg.vae_steps} rec {loss_rec.item():.4f}", flush=True)
        if (step + 1) % cfg.ckpt_every == 0 or step == cfg.vae_steps - 1:
            ck.save("vae", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})


@torch.no_grad()
def cache_latents(cfg: TrainConfig, vae: Any, ck: Checkpointer) -> tuple[torch.Tensor, list]:
    """Stage 3: render `num_images` scenes, encode them once; returns (latents, scenes)."""
    if (state := ck.load("latents")) is not None:
        return state["latents"], state["scenes"]
    vae.eval()
    rng = np.random.default_rng([cfg.seed, 2])
    chunks, scenes = [], []
    for i in range(0, cfg.num_images, 256):
        x, sc = _images(rng, min(256, cfg.num_images - i), cfg.resolution)
        chunks.append(vae.encode(x).latent_dist.mode())
        scenes += sc
        print(f"[latents] {i + len(sc)}/{cfg.num_images}", flush=True)
    latents = torch.cat(chunks)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    ck.save("latents", {"latents": latents, "scenes": scenes, "scaling": scaling})
    return latents, scenes


def pretrain_text(
    cfg: TrainConfig, models: dict[str, Any], scenes: list, ck: Checkpointer, log_file: Path,
) -> None:
    """Stage 3b: teach the text encoder to encode every caption attribute (or its absence).

    Stable Diffusion starts from a pretrained CLIP text encoder; ours starts from scratch, and
    trained jointly with the UNet alone it learned almost no conditioning within our CPU budget
    (right vs empty caption denoising MSE 0.01505 vs 0.01564; prompt following at chance). So the
    text encoder first learns, from text alone (cheap: no images), to predict each attribute
    word - or "not named" - from the mean of its output sequence; the UNet then only has to learn
    to read features that already carry the caption.
    """
    te, tok = models["text_encoder"], models["tokenizer"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        heads = torch.nn.ModuleDict({a: torch.nn.Linear(cfg.token_dim, len(v) + 1)
                                     for a, v in ATTRIBUTES.items()})  # last class: not named
    params = list(te.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.text_lr, weight_decay=1e-2)
    if (state := ck.load("text")) is not None and state["step"] >= cfg.text_steps:
        te.load_state_dict(state["text_encoder"])
        return
    te.train()
    t0 = time.time()
    for step in range(cfg.text_steps):
        rng = np.random.default_rng([cfg.seed, 4, step])
        idx = rng.integers(len(scenes), size=cfg.text_batch)
        captions, labels = [], {a: [] for a in ATTRIBUTES}
        for i in idx:
            if rng.random() < cfg.cfg_drop:
                text, named = "", set()
            else:
                text, named = training_caption_named(scenes[i], rng, cfg.caption_drop)
            captions.append(text)
            for a, vocab in ATTRIBUTES.items():
                labels[a].append(vocab.index(getattr(scenes[i], a)) if a in named else len(vocab))
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        pooled = te(ids)[0].mean(1)  # (B, token_dim): every position must help carry the caption
        loss = sum(F.cross_entropy(heads[a](pooled), torch.tensor(labels[a])) for a in ATTRIBUTES)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.text_steps, cfg.text_lr, cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _log(log_file, {"stage": "text", "step": step, "loss": loss.item(),
                        "elapsed_s": time.time() - t0})
        if step % 50 == 0 or step == cfg.text_steps - 1:
            print(f"[text] step {step + 1}/{cfg.text_steps} loss {loss.item():.4f}", flush=True)
    ck.save("text", {"text_encoder": te.state_dict(), "step": cfg.text_steps})


def train_unet(
    cfg: TrainConfig, models: dict[str, Any], latents: torch.Tensor, scenes: list,
    ck: Checkpointer, log_file: Path,
) -> None:
    """Stage 4: joint UNet + text encoder denoising training with caption dropout."""
    unet, text_encoder, tokenizer = models["unet"], models["text_encoder"], models["tokenizer"]
    scheduler = make_scheduler("ddpm")
    abar = scheduler.alphas_cumprod.float()
    scaling = models["vae"].config.scaling_factor
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr_scale": 1.0},
        {"params": list(text_encoder.parameters()), "lr_scale": cfg.text_lr_scale},
    ], lr=cfg.unet_lr, weight_decay=1e-2)
    start = 0
    if (state := ck.load("unet")) is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    unet.train()
    text_encoder.train()
    t0 = time.time()
    for step in range(start, cfg.unet_steps):
        rng = np.random.default_rng([cfg.seed, 3, step])
        idx = rng.integers(len(scenes), size=cfg.unet_batch)
        captions = [
            "" if rng.random() < cfg.cfg_drop else training_caption(scenes[i], rng, cfg.caption_drop)
            for i in idx
        ]
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        z0 = latents[torch.from_numpy(idx)] * scaling  # (B, 4, 16, 16)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps  # forward diffusion q(z_t | z_0)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        cond = text_encoder(ids)[0]  # (B, 77, token_dim): last hidden state, as SD uses
        loss = F.mse_loss(unet(zt, t, cond).sample, eps)
        for g in opt.param_groups:
            g["lr"] = g["lr_scale"] * _lr(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup,
                                          cfg.unet_cycle)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _log(log_file, {"stage": "unet", "step": step, "loss": loss.item(),
                        "elapsed_s": time.time() - t0})
        if step % 10 == 0 or step == cfg.unet_steps - 1:
            rate = (step + 1 - start) / max(1e-9, time.time() - t0)
            eta = (cfg.unet_steps - step - 1) / max(rate, 1e-9)
            print(f"[unet] step {step + 1}/{cfg.unet_steps} loss {loss.item():.4f} "
                  f"({rate:.2f} it/s, eta {eta / 60:.1f} min)", flush=True)
        if (step + 1) % cfg.ckpt_every == 0 or step == cfg.unet_steps - 1:
            ck.save("unet", {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                             "opt": opt.state_dict(), "step": step + 1})


def plot_curve(log_file: Path, png: Path) -> None:
    """Training curves of both stages (moving average over 20 steps) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    stages = (("vae", "VAE reconstruction (L1 + MSE)"),
              ("text", "text encoder pretraining (sum of CE)"),
              ("unet", "UNet denoising MSE (epsilon)"))
    for ax, (stage, label) in zip(axes, stages, strict=True):
        rec = {r["step"]: r for r in records if r["stage"] == stage}  # resumed runs: last wins
        steps = sorted(rec)
        loss = np.array([rec[s]["loss"] for s in steps])
        k = min(20, max(1, len(loss)))
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps, loss, alpha=0.3, label="per step")
        ax.plot(steps[k - 1:], smooth, label=f"mean of {k}")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def export(models: dict[str, Any], out: Path, dtype: torch.dtype, tokenizer_dir: Path) -> None:
    """Stage 5: write the diffusers folder that `StableDiffusionPipeline` and zo_core load."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=models["vae"].eval(), text_encoder=models["text_encoder"].eval(),
        tokenizer=models["tokenizer"], unet=models["unet"].eval(),
        scheduler=make_scheduler("ddpm"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    # A real SD folder carries the slow-tokenizer files too; keep them for tools that need them.
    for name in ("vocab.json", "merges.txt"):
        (out / "tokenizer" / name).write_bytes((tokenizer_dir / name).read_bytes())


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m simulations.world.train_model",
        description="Train the embedded tinyworld text-to-image model (VAE, then UNet + CLIP "
                    "text encoder) on the synthetic world and write it in diffusers layout.",
    )
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--work-dir", type=Path, default=Path("runs/tinyworld-train"),
                   help="checkpoints and the loss log (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in --work-dir (required if any exist)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on 2 shared cores it ran 2x faster than 2)")
    p.add_argument("--curve-png", type=Path, default=None,
                   help="where to write the training curve (default: <work-dir>/curve.png)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the exported weights (default float16: half the size)")
    defaults = TrainConfig()
    for name in ("seed", "vae_steps", "text_steps", "unet_steps", "unet_cycle", "num_images",
                 "unet_batch", "ckpt_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name),
                       help=f"(default {getattr(defaults, name)})")
    args = p.parse_args(argv)
    cfg = TrainConfig(seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                      unet_cycle=args.unet_cycle, text_steps=args.text_steps,
                      num_images=args.num_images, unet_batch=args.unet_batch,
                      ckpt_every=args.ckpt_every)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)

    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    ck = Checkpointer(work)
    cfg_file, log_file = work / "train_config.json", work / "loss.jsonl"
    if any(work.glob("*.ckpt.pt")) or log_file.exists():
        if not args.resume:
            raise SystemExit(f"{work} already holds a run; pass --resume to continue it "
                             "or choose another --work-dir")
        saved = json.loads(cfg_file.read_text())
        if saved != json.loads(json.dumps(asdict(cfg))):
            raise SystemExit(f"--resume with a different config than the one in {cfg_file}")
    elif args.resume:
        raise SystemExit(f"--resume given but {work} holds no checkpoint")
    cfg_file.write_text(json.dumps(asdict(cfg), indent=2))

    t_start = time.time()
    save_clip_tokenizer(vocabulary(), work / "tokenizer")
    models = build_models(cfg, work / "tokenizer")
    train_vae(cfg, models["vae"], ck, log_file)
    t_vae = time.time()
    latents, scenes = cache_latents(cfg, models["vae"], ck)
    models["vae"].register_to_config(scaling_factor=float(1.0 / latents.std()))
    pretrain_text(cfg, models, scenes, ck, log_file)
    t_lat = time.time()
    train_unet(cfg, models, latents, scenes, ck, log_file)
    t_unet = time.time()
    export(models, args.out, getattr(torch, args.dtype), work / "tokenizer")
    curve = args.curve_png or work / "curve.png"
    plot_curve(log_file, curve)
    record = {
        "config": asdict(cfg), "threads": args.threads, "torch": torch.__version__,
        "dtype": args.dtype,
        "wall_s_this_invocation": {"vae": t_vae - t_start, "latents": t_lat - t_vae,
                                   "unet": t_unet - t_lat, "total": time.time() - t_start},
        "final_vae_loss": None, "final_unet_loss": None,
        "scaling_factor": models["vae"].config.scaling_factor,
        "params": {k: sum(p.numel() for p in models[k].parameters())
                   for k in ("vae", "unet", "text_encoder")},
    }
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    for stage in ("vae", "text", "unet"):
        tail = [r["loss"] for r in records if r["stage"] == stage][-50:]
        record[f"final_{stage}_loss"] = float(np.mean(tail)) if tail else None
    (Path(args.out) / "training.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record["wall_s_this_invocation"]), flush=True)


if __name__ == "__main__":
    main()
