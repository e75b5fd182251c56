"""Build Stable-Diffusion-shaped models offline, with random weights.

No model can be downloaded on our machines, in CI or in tests, so every test model, the
SD1.5-shaped benchmark models and the starting point of the embedded default are built here and
written in the diffusers folder layout, so that they load through exactly the same code path
(`zo_core.model_io.load_components`) as a real Stable Diffusion folder.

The tokenizer is a real CLIP byte-level BPE tokenizer whose merges are generated from a word list,
so that every listed word is one token (like "dog" in the real CLIP vocabulary) and any other text
still tokenizes (into byte pieces). We write our own merges because the CLIP vocabulary is not
available offline; the mechanics (byte-level BPE, `</w>` suffix) are transformers' own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _word_symbols(word: str, byte_map: dict[int, str]) -> list[str]:
    symbols = [byte_map[b] for b in word.encode("utf-8")]
    symbols[-1] = symbols[-1] + "</w>"
    return symbols


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the adjacent pair of lowest rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 60), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 60:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_clip_tokenizer_files(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) of a byte-level BPE in which every word of `words` is one token.

    Merges are added word by word; a word that earlier merges split differently gets extra merges
    appended (later ranks never change the segmentation earlier words reached first), and the whole
    list is re-checked until every word is a single token.
    """
    byte_map = _bytes_to_unicode()
    base = list(byte_map.values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    unique = sorted({w.lower() for w in words if w.strip()}, key=lambda w: (len(w), w))
    for _ in range(8):
        changed = False
        for word in unique:
            symbols = _apply_merges(_word_symbols(word, byte_map), ranks)
            while len(symbols) > 1:
                pair = (symbols[0], symbols[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                    vocab_list.append(pair[0] + pair[1])
                    changed = True
                symbols = _apply_merges(symbols, ranks)
        if not changed:
            break
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return vocab, [f"{a} {b}" for a, b in merges]


def save_clip_tokenizer(words: Iterable[str], out_dir: str | Path) -> Path:
    """Write `vocab.json` and `merges.txt` that `CLIPTokenizer.from_pretrained` reads."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_tokenizer_files(words)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(out, model_max_length=77)
    tok.save_pretrained(out)  # adds tokenizer_config.json / special tokens, as a real SD folder has
    return out


@dataclass(frozen=True)
class TinySDSpec:
    """Shape of an SD-like model. Defaults give a 64 px model that runs a ZO step in ~0.1 s."""

    resolution: int = 64
    token_dim: int = 32
    text_layers: int = 2
    text_heads: int = 2
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    attention_head_dim: int = 8
    vae_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4
    norm_num_groups: int = 32
    max_length: int = 77
    prediction_type: str = "epsilon"
    scheduler: str = "ddpm"


DEFAULT_WORDS: tuple[str, ...] = (
    "a", "photo", "of", "the", "dog", "cat", "toy", "red", "blue", "green", "on", "in", "with",
    "beach", "sofa", "rendition", "picture", "small", "big", "cup", "shape",
)  # fmt: skip


def build_tiny_sd(
    out_dir: str | Path,
    spec: TinySDSpec = TinySDSpec(),
    *,
    words: Sequence[str] = DEFAULT_WORDS,
    seed: int = 0,
) -> Path:
    """Write a random SD-shaped model (diffusers layout, safetensors) to `out_dir`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    save_clip_tokenizer(words, out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # model construction draws from the global RNG; restored below
    try:
        n_blocks = len(spec.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=spec.resolution // 2 ** (len(spec.vae_channels) - 1),
            in_channels=spec.latent_channels,
            out_channels=spec.latent_channels,
            block_out_channels=spec.unet_channels,
            layers_per_block=spec.unet_layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (n_blocks - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_blocks - 1),
            cross_attention_dim=spec.token_dim,
            attention_head_dim=spec.attention_head_dim,
            norm_num_groups=spec.norm_num_groups,
        )
        n_vae = len(spec.vae_channels)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n_vae,
            up_block_types=("UpDecoderBlock2D",) * n_vae,
            block_out_channels=spec.vae_channels,
            latent_channels=spec.latent_channels,
            norm_num_groups=spec.norm_num_groups,
            sample_size=spec.resolution,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=spec.token_dim,
                intermediate_size=spec.token_dim * 4,
                num_hidden_layers=spec.text_layers,
                num_attention_heads=spec.text_heads,
                max_position_embeddings=spec.max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=spec.token_dim,
            )
        )
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = make_scheduler(spec.scheduler, spec.prediction_type)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_scheduler(name: str, prediction_type: str = "epsilon"):  # type: ignore[no-untyped-def]
    """The SD1.5 noise schedule (scaled linear betas, T = 1000) under a chosen scheduler class."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler

    classes = {
        "ddpm": DDPMScheduler,
        "ddim": DDIMScheduler,
        "pndm": PNDMScheduler,
        "euler": EulerDiscreteScheduler,
    }
    if name not in classes:
        raise ValueError(f"scheduler must be one of {sorted(classes)}, got {name!r}")
    return classes[name](
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        **({"steps_offset": 1, "clip_sample": False} if name in ("ddpm", "ddim") else {}),
    )
