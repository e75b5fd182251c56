"""The world's documentation figures: random training scenes, every concept's private photos, and
the README's base-vs-token comparison.

Run: ``python -m simulations.world.figures --out docs/img`` (seeded; no model needed). The README
figure composes two `fedzoodip generate` grids (same prompts and seed; the class word vs the
learned token): ``python -m simulations.world.figures --compare lagoon base.png token.png``.
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


def compare_grids(concept: str, base_grid: Path, token_grid: Path, out: Path, *, seed: int = 0) -> Path:
    """The concept's private photos on top, then the base grid (left) beside the token grid."""
    from PIL import Image

    photos = get_concept(concept).private_photos(seed)
    base, token = Image.open(base_grid).convert("RGB"), Image.open(token_grid).convert("RGB")
    if base.size != token.size:
        raise ValueError(f"grids differ in size: {base.size} vs {token.size}")
    side, pad = photos[0].size[1], 4
    canvas = Image.new("RGB", (2 * base.size[0] + pad, side + pad + base.size[1]), "white")
    for i, photo in enumerate(photos):
        canvas.paste(photo, (i * photo.size[0], 0))
    canvas.paste(base, (0, side + pad))
    canvas.paste(token, (base.size[0] + pad, side + pad))
    path = out / f"readme-{concept}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.resize((canvas.size[0] * 2, canvas.size[1] * 2), Image.NEAREST).save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m simulations.world.figures", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs=3, metavar=("CONCEPT", "BASE_GRID", "TOKEN_GRID"),
                   help="only write readme-CONCEPT.png from two generate grids")
    args = p.parse_args(argv)
    if args.compare:
        name, base, token = args.compare
        print(compare_grids(name, Path(base), Path(token), args.out, seed=args.seed))
        return
    for path in (world_samples(args.out, seed=args.seed), concept_photos(args.out, seed=args.seed)):
        print(path)


if __name__ == "__main__":
    main()
