"""Stable Diffusion 1.5 component shapes, and a random-weight SD1.5 folder for benchmarks.

Memory and speed of a forward or backward pass depend on the shapes, not on the weight values, so
the memory benchmark runs on an SD1.5-shaped model with random weights (no checkpoint can be
downloaded here or in CI). The dicts below are the public component configs of Stable Diffusion
1.5 (``unet/``, ``vae/``, ``text_encoder/`` and ``scheduler/`` config.json of the released model;
the text encoder is the text tower of OpenAI CLIP ViT-L/14). Parameter counts they give: UNet
859,520,964, VAE 83,653,863, text encoder 123,060,480 (tested on the meta device).

The folder is written in diffusers layout, so the engine loads it through its normal path. Its
tokenizer is the offline word-list BPE of :mod:`zo_core.model_factory` (the real CLIP vocabulary
is not available offline), padded to the text encoder's 49,408 entries with unreachable filler
tokens and with ``<|startoftext|>`` / ``<|endoftext|>`` last (ids 49406 / 49407), as in CLIP's own
vocabulary. Padding the tokenizer too (not only the embedding table) matters: the engine gives
placeholders the ids after the tokenizer's vocabulary and requires them to lie outside the table.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zo_core.model_factory import BOS, DEFAULT_WORDS, EOS, build_clip_tokenizer_files

__all__ = [
    "SD15_PARAM_COUNTS",
    "SD15_SCHEDULER",
    "SD15_TEXT_ENCODER",
    "SD15_UNET",
    "SD15_VAE",
    "build_random_sd",
    "build_sd15_random",
    "save_padded_clip_tokenizer",
    "sd15_configs",
]

SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

SD15_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD15_TEXT_ENCODER: dict[str, Any] = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-5,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# The released file also lists "clip_sample": false, a key PNDMScheduler does not take (diffusers
# drops it when it reads the file); it is left out here because the constructor rejects it.
SD15_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}

SD15_PARAM_COUNTS: dict[str, int] = {
    "unet": 859_520_964,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
}


def sd15_configs() -> dict[str, dict[str, Any]]:
    """Deep copies of the SD1.5 component configs (callers may edit them freely)."""
    return {
        "unet": copy.deepcopy(SD15_UNET),
        "vae": copy.deepcopy(SD15_VAE),
        "text_encoder": copy.deepcopy(SD15_TEXT_ENCODER),
        "scheduler": copy.deepcopy(SD15_SCHEDULER),
    }


def save_padded_clip_tokenizer(words: Sequence[str], out_dir: str | Path, vocab_size: int) -> Path:
    """Write a word-list CLIP BPE tokenizer with exactly `vocab_size` entries.

    The word-list vocabulary (:func:`zo_core.model_factory.build_clip_tokenizer_files`) is filled up
    with ``<|unused-N|>`` entries that no merge produces, so text tokenizes exactly as without them;
    the special tokens come last, where CLIP has them.

    Raises
    ------
    ValueError
        If the word-list vocabulary alone is larger than `vocab_size`.
    """
    from transformers import CLIPTokenizer

    vocab, merges = build_clip_tokenizer_files(words)
    if len(vocab) > vocab_size:
        raise ValueError(
            f"text_encoder vocab_size {vocab_size} is smaller than the tokenizer's {len(vocab)} tokens"
        )
    tokens = [t for t in sorted(vocab, key=vocab.__getitem__) if t not in (BOS, EOS)]
    tokens += [f"<|unused-{i}|>" for i in range(vocab_size - len(tokens) - 2)] + [BOS, EOS]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False)
    )
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    CLIPTokenizer.from_pretrained(out, model_max_length=77).save_pretrained(
        out
    )  # + tokenizer_config.json
    return out


def build_random_sd(
    out_dir: str | Path,
    *,
    unet: dict[str, Any],
    vae: dict[str, Any],
    text_encoder: dict[str, Any],
    scheduler: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    words: Sequence[str] = DEFAULT_WORDS,
    seed: int = 0,
) -> Path:
    """Write a random-weight Stable Diffusion folder (diffusers layout, safetensors) from configs.

    Parameters
    ----------
    out_dir : path
        Destination; created if missing.
    unet, vae, text_encoder, scheduler : dict
        Component configs (diffusers UNet2DConditionModel / AutoencoderKL, transformers
        CLIPTextConfig, diffusers PNDMScheduler). The tokenizer is padded to the text encoder's
        ``vocab_size`` (see :func:`save_padded_clip_tokenizer`).
    dtype : torch.dtype
        Storage dtype of the weights (float32, float16 or bfloat16).
    words : sequence of str
        Words the offline tokenizer keeps as single tokens.
    seed : int
        Seeds weight initialisation; the same seed writes the same weights.
    """
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    out = Path(out_dir)
    save_padded_clip_tokenizer(words, out / "tokenizer", int(text_encoder.get("vocab_size", 0)))
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    text_cfg = CLIPTextConfig(
        **text_encoder,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # diffusers and transformers initialise weights from the global RNG inside their constructors
    # and take no generator; fork_rng scopes the seed to this block and restores the caller's state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_model = UNet2DConditionModel(**unet)
        vae_model = AutoencoderKL(**vae)
        text_model = CLIPTextModel(text_cfg)
    if dtype != torch.float32:  # constructors build float32; cast only when asked (diffusers warns)
        unet_model, vae_model, text_model = (
            m.to(dtype) for m in (unet_model, vae_model, text_model)
        )
    pipe = StableDiffusionPipeline(
        vae=vae_model,
        text_encoder=text_model,
        tokenizer=tokenizer,
        unet=unet_model,
        scheduler=PNDMScheduler(**scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_sd15_random(
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    words: Sequence[str] = DEFAULT_WORDS,
    seed: int = 0,
) -> Path:
    """Write an SD1.5-shaped model with random weights (about 4.3 GB in float32, 2.1 GB in float16).

    See :func:`build_random_sd`; the configs are :func:`sd15_configs`.
    """
    return build_random_sd(out_dir, **sd15_configs(), dtype=dtype, words=words, seed=seed)
