"""Captions of world scenes, and the word list of the embedded model's tokenizer.

Training captions name each non-shape attribute with probability `1 - drop` (the shape is always
named), so the model learns to draw from partial descriptions and fills unnamed attributes from
the world's distribution - which is what lets it draw things it has no word for. Words in
`concepts.UNNAMED` are never written; concept combinations are never named in full.
"""

from __future__ import annotations

import numpy as np

from simulations.world.concepts import UNNAMED, hidden_combinations
from simulations.world.render import ATTRIBUTES, Scene

PREFIXES: tuple[str, ...] = ("", "a photo of ", "a picture of ", "an image of ")
_POSITION_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
TEMPLATE_WORDS: tuple[str, ...] = (
    "a", "an", "photo", "picture", "image", "of", "on", "in", "the", "background", "rendition",
    "object", "thing", "my", "with",
)  # fmt: skip


def vocabulary() -> list[str]:
    """Every word the tokenizer must keep whole: attribute words (named or not) and glue words."""
    words = [w for vocab in ATTRIBUTES.values() for w in vocab]
    return sorted(set(words) | set(TEMPLATE_WORDS))


def describe(
    scene: Scene,
    *,
    named: set[str] | None = None,
    prefix: str = "",
) -> str:
    """The caption of `scene` naming only the attributes in `named` (default: all nameable).

    Example: ``"a small red striped triangle on the left, on a blue background"``.
    """
    names = set(ATTRIBUTES) - {"shape"} if named is None else set(named)
    for attr, words in UNNAMED.items():
        if getattr(scene, attr) in words:
            names.discard(attr)
    adjectives = [getattr(scene, a) for a in ("size", "colour", "pattern") if a in names]
    text = prefix + "a " + " ".join([*adjectives, scene.shape])
    if "position" in names:
        text += " " + _POSITION_PHRASE[scene.position]
    if "background" in names:
        text += f", on a {scene.background} background"
    return text


def training_caption(scene: Scene, rng: np.random.Generator, drop: float = 0.3) -> str:
    """A random partial caption for training (see module docstring)."""
    return training_caption_named(scene, rng, drop)[0]


def training_caption_named(
    scene: Scene, rng: np.random.Generator, drop: float = 0.3
) -> tuple[str, set[str]]:
    """`training_caption` and the set of attributes it actually names (for text pretraining)."""
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    named = {a for a in ATTRIBUTES if a != "shape" and rng.random() >= drop}
    if (scene.shape, scene.colour, scene.pattern) in hidden_combinations():
        if {"colour", "pattern"} <= named:
            named.discard("colour" if rng.random() < 0.5 else "pattern")
    prefix = PREFIXES[int(rng.integers(len(PREFIXES)))]
    for attr, words in UNNAMED.items():
        if getattr(scene, attr) in words:
            named.discard(attr)
    return describe(scene, named=named, prefix=prefix), named | {"shape"}
