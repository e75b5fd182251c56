"""CLIP-I, CLIP-T and DINO: the paper's personalization metrics, for users with real encoders.

As in DreamBooth / ZOODiP (method.md section 6): CLIP-I is the mean pairwise cosine between CLIP
image embeddings of generated images and of the subject's reference photos, CLIP-T the mean cosine
between each generated image and its prompt, DINO the mean pairwise cosine of DINO (here DINOv2)
image embeddings. Paper encoders: CLIP ViT-B/32 and DINOv2-base.

Nothing can be downloaded at run time, so the encoders are read from local folders in the
Hugging Face layout (`local_files_only=True`). Images are preprocessed by the PIL image
processors of transformers (`CLIPImageProcessorPil`, `BitImageProcessorPil` - DINOv2's
processor), which need no torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image


def _check_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} folder {p} does not exist")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder {p} has no config.json (expected a Hugging Face "
                                "model folder saved with save_pretrained)")
    return p


def _check_images(images: Sequence[Image.Image], what: str) -> list[Image.Image]:
    if len(images) == 0:
        raise ValueError(f"{what}: no images given")
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise ValueError(f"{what}[{i}] is a {type(im).__name__}, expected a PIL image")
    return [im.convert("RGB") for im in images]


def _pooled(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over all pairs (i, j) of cos(a_i, b_j); a: (N, D), b: (M, D)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) embeddings, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a = torch.nn.functional.normalize(a.float(), dim=1)
    b = torch.nn.functional.normalize(b.float(), dim=1)
    return float((a @ b.T).mean())


class ClipScorer:
    """CLIP-I and CLIP-T with a local CLIP model folder (e.g. openai/clip-vit-base-patch32)."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ClipScorer:
        """Load CLIPModel, its tokenizer and `CLIPImageProcessorPil` from a local folder."""
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        p = _check_dir(path, "CLIP model")
        return cls(
            CLIPModel.from_pretrained(p, local_files_only=True),
            CLIPTokenizer.from_pretrained(p, local_files_only=True),
            CLIPImageProcessorPil.from_pretrained(p, local_files_only=True),
        )

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) projected CLIP image embeddings (not normalised)."""
        imgs = _check_images(images, "images")
        pixels = self.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) projected CLIP text embeddings (not normalised)."""
        if len(texts) == 0 or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        return _pooled(self.model.get_text_features(**enc))

    def clip_i(self, generated: Sequence[Image.Image], reference: Sequence[Image.Image]) -> float:
        """Mean pairwise cosine between generated and reference image embeddings."""
        return mean_pairwise_cosine(self.image_embeds(generated), self.image_embeds(reference))

    def clip_t(self, generated: Sequence[Image.Image], prompts: Sequence[str]) -> float:
        """Mean cosine between each generated image and its own prompt (same length lists).

        Pass the prompts with the placeholder replaced by the class word ("a photo of a dog on
        the beach"), as the DreamBooth protocol does: CLIP has never seen the placeholder.
        """
        if len(generated) != len(prompts):
            raise ValueError(f"got {len(generated)} images but {len(prompts)} prompts; "
                             "CLIP-T pairs each image with its own prompt")
        img = torch.nn.functional.normalize(self.image_embeds(generated).float(), dim=1)
        txt = torch.nn.functional.normalize(self.text_embeds(prompts).float(), dim=1)
        return float((img * txt).sum(1).mean())


class DinoScorer:
    """DINO score with a local DINOv2 folder (e.g. facebook/dinov2-base): CLS embeddings."""

    def __init__(self, model: Any, image_processor: Any) -> None:
        self.model = model.eval()
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DinoScorer:
        """Load `Dinov2Model` and its (PIL) image processor from a local folder."""
        from transformers import BitImageProcessorPil, Dinov2Model

        p = _check_dir(path, "DINOv2 model")
        return cls(
            Dinov2Model.from_pretrained(p, local_files_only=True),
            BitImageProcessorPil.from_pretrained(p, local_files_only=True),
        )

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) CLS-token embeddings after the final layer norm (the pooler output)."""
        imgs = _check_images(images, "images")
        pixels = self.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
        return self.model(pixel_values=pixels).pooler_output

    def dino(self, generated: Sequence[Image.Image], reference: Sequence[Image.Image]) -> float:
        """Mean pairwise cosine between generated and reference DINO embeddings."""
        return mean_pairwise_cosine(self.image_embeds(generated), self.image_embeds(reference))
