"""The world's documentation figures: random training scenes and every concept's private photos.

Run: ``python -m simulations.world.figures --out docs/img`` (seeded; no model needed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from simulations.world.concepts import get_concept, list_concepts
from simulations.world.evaluate_model import save_grid
from simulations.world.render import render_image, sample_scene


def world_samples(out: Path, *, n: int = 32, seed: int = 0) -> Path:
    """`n` random scenes of the world, 8 per row."""
    rng = np.random.default_rng([seed, 11])
    images = [render_image(sample_scene(rng), rng) for _ in range(n)]
    path = out / "tinyworld-world.png"
    save_grid(images, path, cols=8)
    return path


def concept_photos(out: Path, *, seed: int = 0) -> Path:
    """One row per concept (in `list_concepts()` order): its private photos of `seed`."""
    images, cols = [], 0
    for name in list_concepts():
        photos = get_concept(name).private_photos(seed)
        cols = max(cols, len(photos))
        images.append(photos)
    from PIL import Image

    blank = Image.new("RGB", images[0][0].size, "white")
    flat = [row[i] if i < len(row) else blank for row in images for i in range(cols)]
    path = out / "tinyworld-concepts.png"
    save_grid(flat, path, cols=cols)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m simulations.world.figures", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for path in (world_samples(args.out, seed=args.seed), concept_photos(args.out, seed=args.seed)):
        print(path)


if __name__ == "__main__":
    main()
