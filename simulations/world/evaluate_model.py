"""Score how faithfully a world model draws its captions (prompt following), with the oracle.

Random scenes are described in full (`captions.describe`: every nameable attribute named), the
model draws one image per caption through the stock `StableDiffusionPipeline` (the path any user
of a real SD folder takes), and the oracle checks every attribute the caption names. Also writes
a sample grid PNG.

Run: ``python -m simulations.world.evaluate_model --model zo_core/assets/tinyworld``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from simulations.world.captions import describe
from simulations.world.concepts import UNNAMED
from simulations.world.oracle import Oracle
from simulations.world.render import ATTRIBUTES, Scene, sample_scene

DEFAULT_STEPS = 25  # DDIM steps: the 64 px model's samples stop changing visibly beyond ~20
DEFAULT_GUIDANCE = 7.5  # the generate command and SD default; sweep in docs/embedded-default.md


def load_pipeline(model_dir: str | Path) -> Any:
    """A StableDiffusionPipeline (fp32, DDIM sampler, no safety checker) from a diffusers folder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    d = Path(model_dir)
    if not (d / "model_index.json").is_file():
        raise FileNotFoundError(f"{d} is not a diffusers model folder (no model_index.json)")
    pipe = StableDiffusionPipeline.from_pretrained(
        d, dtype=torch.float32, safety_checker=None, requires_safety_checker=False,
        local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: Any,
    prompts: list[str],
    *,
    seed: int,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch: int = 32,
) -> list[Image.Image]:
    """One image per prompt; image i uses the generator seeded (seed, i), so batching is irrelevant."""
    images: list[Image.Image] = []
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i + j) for j in range(len(chunk))]
        out = pipe(chunk, height=size, width=size, num_inference_steps=steps,
                   guidance_scale=guidance, generator=gens, output_type="pil")
        images += out.images
    return images


def named_attributes(scene: Scene) -> list[str]:
    """Attributes a full caption of `scene` names (unnamed values are left out)."""
    return [a for a in ATTRIBUTES if getattr(scene, a) not in UNNAMED.get(a, ())]


def prompt_following(
    pipe: Any, oracle: Oracle, *, n: int, seed: int, steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
) -> tuple[dict[str, Any], list[Image.Image], list[str]]:
    """Per-attribute accuracy and all-attributes accuracy of the model on `n` full captions."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 7])
    scenes = [sample_scene(rng) for _ in range(n)]
    prompts = [describe(s) for s in scenes]
    t0 = time.time()
    images = generate(pipe, prompts, seed=seed, steps=steps, guidance=guidance)
    wall = time.time() - t0
    preds = oracle.predict(images)
    per_attr: dict[str, float] = {}
    for a in ATTRIBUTES:
        asked = [(p[a], getattr(s, a)) for p, s in zip(preds, scenes, strict=True)
                 if a in named_attributes(s)]
        per_attr[a] = float(np.mean([x == y for x, y in asked]))
    all_match = float(np.mean([all(p[a] == getattr(s, a) for a in named_attributes(s))
                               for p, s in zip(preds, scenes, strict=True)]))
    result = {"n": n, "seed": seed, "steps": steps, "guidance": guidance,
              "per_attribute": per_attr, "all_attributes": all_match,
              "generation_wall_s": round(wall, 1)}
    return result, images, prompts


@torch.no_grad()
def vae_roundtrip(vae: Any, scenes: list[Scene], rng: np.random.Generator) -> np.ndarray:
    """Render `scenes`, encode and decode them with `vae`: (N, H, W, 3) uint8, what it can draw."""
    from simulations.world.oracle import to_tensor
    from simulations.world.render import render_batch

    x = to_tensor(render_batch(scenes, rng))
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def reconstruction_accuracy(pipe: Any, oracle: Oracle, *, n: int, seed: int) -> dict[str, float]:
    """Oracle accuracy per attribute on VAE reconstructions of renders: the ceiling the VAE sets.

    The UNet can only produce what the decoder can draw; this separates VAE losses (e.g. fine
    patterns) from prompt-following losses of the UNet and text encoder.
    """
    rng = np.random.default_rng([seed, 8])
    scenes = [sample_scene(rng) for _ in range(n)]
    preds = oracle.predict(vae_roundtrip(pipe.vae, scenes, rng))
    return {a: float(np.mean([p[a] == getattr(s, a) for p, s in zip(preds, scenes, strict=True)]))
            for a in ATTRIBUTES}


def save_grid(images: list[Image.Image], path: Path, cols: int = 8, scale: int = 2) -> None:
    """Save images as one grid PNG (nearest-neighbour upscaled for legibility)."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.resize((cols * w * scale, rows * h * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m simulations.world.evaluate_model",
                                description="Oracle-scored prompt following of a world model.")
    p.add_argument("--model", type=Path, required=True, help="diffusers model folder")
    p.add_argument("--n", type=int, default=192, help="captions to draw (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--grid", type=Path, default=None, help="sample grid PNG to write")
    p.add_argument("--json", type=Path, default=None, help="results JSON to write")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    result, images, prompts = prompt_following(pipe, Oracle.load(), n=args.n, seed=args.seed,
                                               steps=args.steps, guidance=args.guidance)
    result["vae_reconstruction_accuracy"] = reconstruction_accuracy(
        pipe, Oracle.load(), n=args.n, seed=args.seed)
    if args.grid is not None:
        save_grid(images[:32], args.grid)
        args.grid.with_suffix(".txt").write_text(
            "\n".join(f"{i}: {t}" for i, t in enumerate(prompts[:32])) + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
