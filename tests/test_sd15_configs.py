"""SD1.5 component configs give SD1.5's parameter counts; the random-model writer writes a folder
diffusers and transformers load, with the padded vocabulary, the asked dtype and seeded weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from zo_core.sd15_configs import SD15_PARAM_COUNTS, build_random_sd, sd15_configs


def test_sd15_configs_have_the_published_parameter_counts() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = sd15_configs()
    with torch.device("meta"):  # shapes only: no 4 GB allocation
        models = {
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "vae": AutoencoderKL(**cfg["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        }
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert counts == SD15_PARAM_COUNTS
    assert round(counts["unet"] / 1e6, 1) == 859.5
    assert round(counts["vae"] / 1e6, 1) == 83.7
    assert round(counts["text_encoder"] / 1e6, 1) == 123.1
    assert (
        cfg["text_encoder"]["hidden_act"] == "quick_gelu"
        and cfg["vae"]["scaling_factor"] == 0.18215
    )


def _small_configs(vocab: int) -> dict[str, dict[str, Any]]:
    """SD1.5's structure (same block types and config keys) at toy widths."""
    cfg = sd15_configs()
    cfg["unet"].update(
        block_out_channels=[32, 32, 64, 64],
        cross_attention_dim=32,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=8,
    )
    cfg["vae"].update(
        block_out_channels=[8, 8, 16, 16], norm_num_groups=8, layers_per_block=1, sample_size=64
    )
    cfg["text_encoder"].update(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        projection_dim=32,
        vocab_size=vocab,
    )
    return cfg


def test_random_sd_folder_loads_padded_typed_and_seeded(tmp_path: Path) -> None:
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    rng_before = torch.random.get_rng_state()
    a = build_random_sd(tmp_path / "a", **_small_configs(1000), dtype=torch.float16, seed=4)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    tok = CLIPTokenizer.from_pretrained(a / "tokenizer")
    text = CLIPTextModel.from_pretrained(a / "text_encoder")
    emb = text.get_input_embeddings().weight
    assert emb.shape == (1000, 32) and len(tok) == 1000  # both padded to the configured vocabulary
    assert (tok.bos_token_id, tok.eos_token_id) == (998, 999)  # special tokens last, as in CLIP
    words = tok("a photo of the dog", add_special_tokens=False).input_ids
    assert len(words) == 5 and max(words) < 600  # words are single tokens; fillers never produced
    assert emb.dtype == torch.float16
    assert text.config.eos_token_id == tok.eos_token_id
    assert isinstance(PNDMScheduler.from_pretrained(a / "scheduler"), PNDMScheduler)
    index = json.loads((a / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)

    b = build_random_sd(tmp_path / "b", **_small_configs(1000), dtype=torch.float16, seed=4)
    c = build_random_sd(tmp_path / "c", **_small_configs(1000), dtype=torch.float16, seed=5)
    ua, ub, uc = (UNet2DConditionModel.from_pretrained(p / "unet") for p in (a, b, c))
    wa, wb, wc = (u.conv_in.weight for u in (ua, ub, uc))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_random_sd_rejects_bad_vocab_and_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size 10 is smaller than the tokenizer"):
        build_random_sd(tmp_path / "x", **_small_configs(10))
    with pytest.raises(ValueError, match="dtype must be"):
        build_random_sd(tmp_path / "y", **_small_configs(1000), dtype=torch.int8)


def test_engine_loads_the_padded_model_and_registers_a_placeholder(tmp_path: Path) -> None:
    from zo_core.config import TIConfig
    from zo_core.engine import Personalizer

    folder = build_random_sd(tmp_path / "m", **_small_configs(1000), seed=1)
    model = Personalizer.from_pretrained(folder)
    state = model.init_state(TIConfig(placeholder="<thing>", initializer="dog"), seed=0)
    assert state.theta.shape == (1, 32) and model.token_dim == 32
    assert model.registry.ids["<thing>"] >= 1000  # outside the (padded) embedding table
