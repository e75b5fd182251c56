"""Sampling images with a personal token, through diffusers' own StableDiffusionPipeline.

The token is spliced into the prompt features by the same hooks that training uses, and the features
are handed to the pipeline as `prompt_embeds`; so the quantized UNet and text encoder of the engine
are reused as they are, and the embedding table is never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from zo_core.engine import Personalizer
    from zo_core.state import PersonalState

SCHEDULERS = ("ddim", "pndm", "euler", "dpm")


def _sampler(engine: Personalizer, name: str | None):  # type: ignore[no-untyped-def]
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    classes = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
               "dpm": DPMSolverMultistepScheduler}  # fmt: skip
    if name is None:
        # the folder's own sampler, except DDPM, which needs ~1000 steps: DDIM on the same betas instead
        if engine.info.scheduler_class == "DDPMScheduler":
            name = "ddim"
        else:
            import diffusers

            cls = getattr(diffusers, engine.info.scheduler_class, None)
            if cls is None:
                raise ValueError(f"unknown scheduler class {engine.info.scheduler_class!r} in the model folder")
            return cls.from_config(engine.scheduler.config)
    if name not in classes:
        raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, got {name!r}")
    return classes[name].from_config(engine.scheduler.config)


def _prompt_features(engine: Personalizer, state: PersonalState | None, texts: Sequence[str]) -> torch.Tensor:
    tok = engine.tokenizer
    token_ids: list[int] = []
    if state is not None:
        # Register BEFORE tokenizing: a state loaded from a file (not from `init_state`) is not in
        # the tokenizer yet, and its placeholder would be split into sub-word pieces.
        token_ids = engine.registry.register(
            [state.placeholder] + [f"{state.placeholder}_{i}" for i in range(1, state.num_vectors)]
        )
    ids = tok(list(texts), padding="max_length", truncation=True, max_length=tok.model_max_length,
              return_tensors="pt").input_ids  # fmt: skip
    if state is None:
        return engine.text_encoder(ids)[0]
    cand = state.theta[None].expand(ids.shape[0], -1, -1)
    with engine.splicer.candidates(token_ids, cand):
        return engine.text_encoder(ids)[0]


def expand_placeholder(prompt: str, placeholder: str, num_vectors: int) -> str:
    """`<tok>` -> `<tok> <tok>_1 ...` so that every vector of a multi-vector token is used."""
    if num_vectors == 1:
        return prompt
    full = " ".join([placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)])
    return prompt.replace(placeholder, full)


@torch.no_grad()
def generate_images(
    engine: Personalizer,
    state: PersonalState | None,
    prompts: Sequence[str],
    *,
    num_images: int = 1,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    scheduler: str | None = None,
) -> list[Image.Image]:
    """num_images per prompt, prompt-major order; seeded per image so a grid is reproducible."""
    from diffusers import StableDiffusionPipeline

    if num_images < 1 or steps < 1:
        raise ValueError(f"num_images and steps must be >= 1, got {num_images}, {steps}")
    if state is not None:
        missing = [p for p in prompts if state.placeholder not in p]
        if missing:
            raise ValueError(f"prompts must contain the placeholder {state.placeholder!r}; these do not: {missing}")
    pipe = StableDiffusionPipeline(
        vae=engine.vae(), text_encoder=engine.text_encoder, tokenizer=engine.tokenizer, unet=engine.unet,
        scheduler=_sampler(engine, scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    for prompt in prompts:
        text = prompt if state is None else expand_placeholder(prompt, state.placeholder, state.num_vectors)
        cond = _prompt_features(engine, state, [text] * num_images)
        uncond = _prompt_features(engine, None, [""] * num_images)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
        out = pipe(prompt_embeds=cond.to(engine.dtype), negative_prompt_embeds=uncond.to(engine.dtype),
                   num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   height=engine.info.resolution, width=engine.info.resolution, output_type="pil")  # fmt: skip
        images.extend(out.images)
    engine.free_vae()
    return images


def image_grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    """Tile images row by row into one picture."""
    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid
