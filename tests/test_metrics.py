"""CLIP-I / CLIP-T / DINO on tiny random CLIP and DINOv2 models built offline from configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zo_core.metrics import ClipScorer, DinoScorer, mean_pairwise_cosine
from zo_core.model_factory import save_clip_tokenizer


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    out = tmp_path_factory.mktemp("clip")
    save_clip_tokenizer(["a", "photo", "of", "red", "blue", "dog", "cat"], out)
    tok = CLIPTokenizer.from_pretrained(out)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(cfg).save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                          ).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    out = tmp_path_factory.mktemp("dino")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, image_size=32, patch_size=8)
                    ).save_pretrained(out)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                         ).save_pretrained(out)
    return out


def _images(seed: int, n: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def test_mean_pairwise_cosine_matches_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=gen), torch.randn(4, 5, generator=gen)
    expected = np.mean([[float(torch.cosine_similarity(x, y, dim=0)) for y in b] for x in a])
    assert mean_pairwise_cosine(a, b) == pytest.approx(expected, abs=1e-6)
    assert mean_pairwise_cosine(a, a * 3.0) <= 1.0
    with pytest.raises(ValueError, match="embeddings"):
        mean_pairwise_cosine(a, torch.randn(4, 6))


def test_clip_i_and_t(clip_dir: Path) -> None:
    scorer = ClipScorer.from_pretrained(clip_dir)
    imgs, others = _images(0, 3), _images(1, 2)
    assert scorer.image_embeds(imgs).shape == (3, 16)
    # An image set compared with itself scores higher than with other random images, and the
    # self score of one image is exactly 1.
    assert scorer.clip_i(imgs[:1], imgs[:1]) == pytest.approx(1.0, abs=1e-5)
    assert scorer.clip_i(imgs, others) < 1.0
    t = scorer.clip_t(imgs, ["a photo of a red dog", "a blue cat", "a photo of a cat"])
    img = torch.nn.functional.normalize(scorer.image_embeds(imgs), dim=1)
    txt = torch.nn.functional.normalize(
        scorer.text_embeds(["a photo of a red dog", "a blue cat", "a photo of a cat"]), dim=1)
    assert t == pytest.approx(float((img * txt).sum(1).mean()), abs=1e-6)
    assert -1.0 <= t <= 1.0


def test_clip_bad_inputs(clip_dir: Path, tmp_path: Path) -> None:
    scorer = ClipScorer.from_pretrained(clip_dir)
    with pytest.raises(ValueError, match="own prompt"):
        scorer.clip_t(_images(0, 2), ["one prompt"])
    with pytest.raises(ValueError, match="no images"):
        scorer.clip_i([], _images(0, 1))
    with pytest.raises(ValueError, match="PIL image"):
        scorer.image_embeds([np.zeros((4, 4, 3))])  # type: ignore[list-item]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipScorer.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ClipScorer.from_pretrained(tmp_path)


def test_dino(dino_dir: Path) -> None:
    scorer = DinoScorer.from_pretrained(dino_dir)
    imgs = _images(2, 2)
    assert scorer.image_embeds(imgs).shape == (2, 32)
    assert scorer.dino(imgs[:1], imgs[:1]) == pytest.approx(1.0, abs=1e-5)
    assert scorer.dino(imgs[:1], _images(3, 2)) < 1.0 - 1e-4
