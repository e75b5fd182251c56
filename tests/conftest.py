"""Shared fixtures: tiny SD-shaped models built offline (nothing is ever downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 64 px SD-shaped model (token width 32) in diffusers layout."""
    from zo_core.model_factory import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"), seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from zo_core.engine import Personalizer

    return Personalizer.from_pretrained(tiny_model_dir)


def random_photos(n: int, size: tuple[int, int] = (80, 72), seed: int = 0) -> list[Image.Image]:
    """Smooth random colour blobs: cheap stand-ins for a device owner's photos."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize(size, Image.BILINEAR))
    return out


@pytest.fixture()
def photo_dir(tmp_path: Path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for i, img in enumerate(random_photos(3)):
        img.save(d / f"img{i}.png")
    return d
