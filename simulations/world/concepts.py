"""Personal concepts: objects the embedded model can draw but has no word for.

A concept is an identity (shape, colour, pattern). Two kinds of namelessness are used, both of
which textual inversion must overcome:

* an attribute value that is rendered in training images but never named in any caption
  (`UNNAMED`: the colour "teal" and the pattern "checkered"); the model draws it only when the
  caption leaves that attribute open;
* a combination of named values that never appears named together in a training caption
  (whenever such an object is rendered, its caption drops the colour or the pattern).

A concept's "private photos" vary what is not its identity - size, position, background - like a
user's photos of one object taken on different days.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from simulations.world.render import ATTRIBUTES, Scene, render_image, sample_scene

UNNAMED: dict[str, tuple[str, ...]] = {"colour": ("teal",), "pattern": ("checkered",)}
IDENTITY: tuple[str, ...] = ("shape", "colour", "pattern")
DEFAULT_NUM_PHOTOS = 5


@dataclass(frozen=True)
class Concept:
    """A personal concept: identity attributes, the word textual inversion starts from."""

    name: str
    shape: str
    colour: str
    pattern: str
    initializer: str
    num_photos: int = DEFAULT_NUM_PHOTOS

    def __post_init__(self) -> None:
        for attr in IDENTITY:
            value = getattr(self, attr)
            if value not in ATTRIBUTES[attr]:
                raise ValueError(f"concept {self.name!r}: {attr} must be one of "
                                 f"{list(ATTRIBUTES[attr])}, got {value!r}")
        if not 4 <= self.num_photos <= 6:
            raise ValueError(f"concept {self.name!r}: num_photos must be in [4, 6], "
                             f"got {self.num_photos}")
        if not self.initializer or " " in self.initializer:
            raise ValueError(f"concept {self.name!r}: initializer must be one word, "
                             f"got {self.initializer!r}")

    @property
    def attributes(self) -> dict[str, str]:
        """Identity attributes: name -> word (what the oracle checks in generated images)."""
        return {"shape": self.shape, "colour": self.colour, "pattern": self.pattern}

    @property
    def placeholder(self) -> str:
        """The conventional placeholder token, e.g. ``<mosaic>``."""
        return f"<{self.name}>"

    def scenes(self, seed: int) -> list[Scene]:
        """The scenes of the private photos: identity fixed, the rest varied without repeats."""
        rng = np.random.default_rng([seed, _stable_id(self.name)])
        out: list[Scene] = []
        seen: set[tuple[str, str, str]] = set()
        while len(out) < self.num_photos:
            scene = sample_scene(rng, fixed=self.attributes)
            key = (scene.size, scene.position, scene.background)
            if key not in seen:  # varied pose: no two photos share size, place and background
                seen.add(key)
                out.append(scene)
        return out

    def private_photos(self, seed: int = 0, resolution: int = 64) -> list[Image.Image]:
        """`num_photos` RGB photos of the concept (deterministic in `seed`)."""
        rng = np.random.default_rng([seed, _stable_id(self.name), 1])
        return [render_image(s, rng, resolution) for s in self.scenes(seed)]

    def write_photos(self, out_dir: str | Path, seed: int = 0, resolution: int = 64) -> list[Path]:
        """Write the private photos as ``{name}_{i}.png`` into `out_dir` (created if missing)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, img in enumerate(self.private_photos(seed, resolution)):
            path = out / f"{self.name}_{i}.png"
            img.save(path)
            paths.append(path)
        return paths


def _stable_id(name: str) -> int:
    """A process-independent integer from a name (Python's hash() is salted per process)."""
    return int.from_bytes(name.encode("utf-8"), "little") % (2**63)


_CONCEPTS: tuple[Concept, ...] = (
    Concept("mosaic", shape="diamond", colour="teal", pattern="checkered", initializer="diamond"),
    Concept("lagoon", shape="circle", colour="teal", pattern="plain", initializer="circle"),
    Concept("chessboard", shape="square", colour="red", pattern="checkered", initializer="square"),
    Concept("harlequin", shape="triangle", colour="green", pattern="checkered",
            initializer="triangle"),
    Concept("ember", shape="triangle", colour="orange", pattern="striped", initializer="triangle"),
    Concept("grape", shape="cross", colour="purple", pattern="dotted", initializer="cross"),
    Concept("tidepool", shape="square", colour="teal", pattern="striped", initializer="square"),
    Concept("verdigris", shape="triangle", colour="teal", pattern="dotted",
            initializer="triangle"),
    Concept("glacier", shape="diamond", colour="teal", pattern="plain", initializer="diamond"),
)

# The (shape, colour, pattern) triples the embedded model's training captions never name in full.
# This set is part of the model's training recipe, not derived from the concept list: a new
# hidden-combination concept needs a retrained model (the old one has seen its name), while a
# concept with an unnamed value (teal, checkered) needs no hiding - no caption can name it.
TRAINING_HIDDEN: frozenset[tuple[str, str, str]] = frozenset({
    ("diamond", "teal", "checkered"), ("circle", "teal", "plain"),
    ("square", "red", "checkered"), ("triangle", "green", "checkered"),
    ("triangle", "orange", "striped"), ("cross", "purple", "dotted"),
})


def list_concepts() -> list[str]:
    """Names of the built-in concepts."""
    return [c.name for c in _CONCEPTS]


def get_concept(name: str) -> Concept:
    """The built-in concept called `name` (a leading '<' and trailing '>' are ignored)."""
    key = name.strip().removeprefix("<").removesuffix(">")
    for concept in _CONCEPTS:
        if concept.name == key:
            return concept
    raise ValueError(f"unknown concept {name!r}; known concepts: {list_concepts()}")


def hidden_combinations() -> set[tuple[str, str, str]]:
    """(shape, colour, pattern) triples that no training caption may name in full."""
    return set(TRAINING_HIDDEN)


def is_nameless(concept: Concept) -> bool:
    """True when the embedded model has no words for the concept's identity.

    Either one of its values is never written in any caption, or its triple is one the training
    captions hide. A concept failing this is not personal: the model was taught its name.
    """
    unnamed = any(getattr(concept, a) in UNNAMED.get(a, ()) for a in IDENTITY)
    return unnamed or (concept.shape, concept.colour, concept.pattern) in TRAINING_HIDDEN
