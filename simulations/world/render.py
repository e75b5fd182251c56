"""Procedural world: one object (shape, colour, pattern, size, position) on a plain background.

Why a procedural world: no Stable Diffusion weights or photo datasets may be downloaded, so the
embedded default model is trained on images whose every attribute is known exactly. That makes
the quality of a learned token measurable by an oracle (attribute classifiers), which CLIP/DINO
cannot give us offline.

Rendering is vectorised numpy on a 64 x 64 grid (a few hundred microseconds per image). Every
draw comes from a caller-owned `numpy.random.Generator`, so a seed fixes the images bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

# Attribute vocabularies. Order matters: class indices of the oracle follow it.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "teal")
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
SIZES: tuple[str, ...] = ("small", "big")
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "blue", "green")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "pattern": PATTERNS,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 200),
    "orange": (250, 140, 20),
    "teal": (0, 190, 190),
}
# Backgrounds are pale tints or neutrals so that an object never blends into them.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (15, 15, 15),
    "gray": (125, 125, 125),
    "blue": (150, 170, 235),
    "green": (160, 215, 160),
}
# Object radius in pixels per size word, and centre x per position word, for a 64 px canvas;
# scaled linearly for other resolutions.
_RADIUS = {"small": 9.0, "big": 16.0}
_CENTRE_X = {"left": 17.0, "middle": 32.0, "right": 47.0}
_PATTERN_PERIOD = 8.0  # pixels at 64 px; the 4x-downsampling VAE must still resolve it
_DARK = 0.4  # the second tone of a pattern is the object colour times this


@dataclass(frozen=True)
class Scene:
    """Attributes of one rendered image; every field is a word of its vocabulary in `ATTRIBUTES`."""

    shape: str
    colour: str
    pattern: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value not in ATTRIBUTES[f.name]:
                raise ValueError(
                    f"scene {f.name} must be one of {list(ATTRIBUTES[f.name])}, got {value!r}"
                )

    def as_dict(self) -> dict[str, str]:
        """Attribute name -> word."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of `shape` of radius `r` with pixel offsets (dx, dy) from its centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        half = 0.82 * r  # same area feel as the circle
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # Upward isosceles triangle: apex at -r, base at +0.8 r.
        top, bottom = -r, 0.8 * r
        inside_y = (dy >= top) & (dy <= bottom)
        half_width = (dy - top) / (bottom - top) * r
        return inside_y & (np.abs(dx) <= half_width)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "cross":
        arm = 0.36 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}")


def _pattern_mask(pattern: str, x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    """True where the pattern's dark tone is drawn (pixel coordinates x, y)."""
    if pattern == "plain":
        return np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
    if pattern == "striped":  # horizontal bands
        return np.broadcast_to((y % period) >= period / 2, np.broadcast_shapes(x.shape, y.shape))
    if pattern == "dotted":
        cx = (x % period) - period / 2
        cy = (y % period) - period / 2
        return cx * cx + cy * cy <= (period * 0.3) ** 2
    if pattern == "checkered":
        return ((x // (period / 2)) + (y // (period / 2))) % 2 == 1
    raise ValueError(f"pattern must be one of {list(PATTERNS)}, got {pattern!r}")


def render(scene: Scene, rng: np.random.Generator, resolution: int = 64) -> np.ndarray:
    """Render `scene` as a (resolution, resolution, 3) uint8 array.

    Size and position carry small random jitter (drawn from `rng`) so that one scene description
    covers many images, as a caption covers many photos.
    """
    if resolution < 32 or resolution % 16 != 0:
        raise ValueError(f"resolution must be a multiple of 16 and >= 32, got {resolution}")
    s = resolution / 64.0
    r = (_RADIUS[scene.size] + rng.uniform(-1.0, 1.0)) * s
    cx = (_CENTRE_X[scene.position] + rng.uniform(-2.5, 2.5)) * s
    cy = (32.0 + rng.uniform(-6.0, 6.0)) * s
    phase_x, phase_y = rng.uniform(0.0, _PATTERN_PERIOD * s, size=2)
    y, x = np.mgrid[0:resolution, 0:resolution].astype(np.float32)
    x += 0.5
    y += 0.5
    obj = _shape_mask(scene.shape, x - cx, y - cy, r)
    dark = _pattern_mask(scene.pattern, x + phase_x, y + phase_y, _PATTERN_PERIOD * s)
    img = np.empty((resolution, resolution, 3), dtype=np.uint8)
    img[:] = BACKGROUND_RGB[scene.background]
    colour = np.asarray(COLOUR_RGB[scene.colour], dtype=np.float32)
    img[obj & ~dark] = colour.astype(np.uint8)
    img[obj & dark] = (colour * _DARK).astype(np.uint8)
    return img


def render_image(scene: Scene, rng: np.random.Generator, resolution: int = 64) -> Image.Image:
    """`render` as a PIL RGB image."""
    return Image.fromarray(render(scene, rng, resolution), mode="RGB")


def sample_scene(
    rng: np.random.Generator,
    *,
    fixed: dict[str, str] | None = None,
) -> Scene:
    """Draw a scene uniformly over the world, with some attributes optionally fixed.

    The background is redrawn until its colour name differs from the object's, so that "a blue
    object on a blue background" (hard to see, ambiguous to classify) never occurs.
    """
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown scene attributes {sorted(unknown)}; known: {list(ATTRIBUTES)}")
    values = {
        name: fixed[name] if name in fixed else vocab[int(rng.integers(len(vocab)))]
        for name, vocab in ATTRIBUTES.items()
    }
    if values["background"] == values["colour"]:
        if "background" in fixed and "colour" in fixed:
            raise ValueError(
                f"colour and background are both {values['colour']!r}: the object would be "
                "invisible; choose different ones"
            )
        if "background" in fixed:
            choices = [c for c in COLOURS if c != values["background"]]
            values["colour"] = choices[int(rng.integers(len(choices)))]
        else:
            choices = [b for b in BACKGROUNDS if b != values["colour"]]
            values["background"] = choices[int(rng.integers(len(choices)))]
    return Scene(**values)


def render_batch(scenes: list[Scene], rng: np.random.Generator, resolution: int = 64) -> np.ndarray:
    """Render many scenes into one (N, resolution, resolution, 3) uint8 array."""
    out = np.empty((len(scenes), resolution, resolution, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = render(scene, rng, resolution)
    return out
