"""A device owner's private photos: read, normalise, caption. Nothing here leaves the device.

Every file is checked before anything is written or encoded, so a folder with one bad file fails as a
whole with the list of offending files (a half-trained token from part of the photos is worse than a
clear error).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# Textual Inversion's classic caption templates (our own wording of the idea); `{}` is the token.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of the {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a clean photo of the {}",
    "a photo of a nice {}",
    "a small {}",
    "a photo of my {}",
)


class ImageFolderError(ValueError):
    """Private images cannot be used; the message lists the files and why."""


@dataclass(frozen=True)
class PrivateImages:
    """Photos as RGB images, each with its own caption templates (`{}` marks the token)."""

    images: list[Image.Image]
    captions: list[list[str]]
    names: list[str]


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation; convert grayscale, palette, RGBA (onto white), CMYK and 16-bit to 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _read_caption(path: Path) -> list[str] | None:
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    lines = [ln.strip() for ln in sidecar.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines or any("{}" not in ln for ln in lines):
        raise ImageFolderError(f"caption file {sidecar.name}: every line must contain {{}} where the token goes")
    return lines


def load_private_images(folder: str | Path, *, min_side: int = 64) -> PrivateImages:
    """Read every image of `folder`; raise one error naming every bad file, having changed nothing."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ImageFolderError(f"image folder {root} does not exist or is not a folder")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    candidates = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    unknown = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES + (".txt",)]
    problems = [f"{name}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})" for name in unknown]
    images: list[Image.Image] = []
    captions: list[list[str]] = []
    for path in candidates:
        try:
            with Image.open(path) as raw:
                raw.load()
                img = to_rgb(raw)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            problems.append(f"{path.name}: unreadable ({type(err).__name__}: {err})")
            continue
        if min(img.size) < min_side:
            problems.append(f"{path.name}: too small ({img.size[0]}x{img.size[1]} px, need >= {min_side} px a side)")
            continue
        try:
            caption = _read_caption(path)
        except ImageFolderError as err:
            problems.append(str(err))
            continue
        images.append(img)
        captions.append(caption if caption is not None else list(TEMPLATES))
    if problems:
        raise ImageFolderError(f"cannot use the images in {root}:\n  " + "\n  ".join(problems))
    if not images:
        raise ImageFolderError(f"no images in {root} (expected {', '.join(IMAGE_SUFFIXES)})")
    return PrivateImages(images=images, captions=captions, names=[p.name for p in candidates])


def from_memory(
    images: Sequence[Image.Image], captions: Sequence[str | None] | None = None, *, min_side: int = 64
) -> PrivateImages:
    """The same checks for images already in memory (simulations, tests)."""
    if not images:
        raise ImageFolderError("no images given")
    caps = list(captions) if captions is not None else [None] * len(images)
    if len(caps) != len(images):
        raise ImageFolderError(f"{len(images)} images but {len(caps)} captions")
    out_imgs, out_caps, problems = [], [], []
    for i, (img, cap) in enumerate(zip(images, caps, strict=True)):
        rgb = to_rgb(img)
        if min(rgb.size) < min_side:
            problems.append(f"image {i}: too small ({rgb.size[0]}x{rgb.size[1]} px, need >= {min_side} px a side)")
        if cap is not None and "{}" not in cap:
            problems.append(f"image {i}: caption {cap!r} has no {{}} for the token")
        out_imgs.append(rgb)
        out_caps.append([cap] if cap is not None else list(TEMPLATES))
    if problems:
        raise ImageFolderError("cannot use the images:\n  " + "\n  ".join(problems))
    return PrivateImages(images=out_imgs, captions=out_caps, names=[f"image-{i}" for i in range(len(images))])


def to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, centre-crop, scale to [-1, 1]. Returns (3, R, R)."""
    w, h = img.size
    scale = resolution / min(w, h)
    resized = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    left = (resized.size[0] - resolution) // 2
    top = (resized.size[1] - resolution) // 2
    crop = resized.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
