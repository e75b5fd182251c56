"""The oracle: attribute classifiers that score generated images of the synthetic world exactly.

CLIP-I / CLIP-T / DINO need real pretrained encoders, which cannot be downloaded here; in the
synthetic world we know what every image should contain, so quality is measured by a small CNN
trained on rendered images (`simulations.world.train_oracle`) with one head per attribute:

* concept fidelity (the CLIP-I / DINO analogue): the fraction of generated images that carry all
  of the concept's identity attributes (shape, colour, pattern), per-attribute rates, and the mean
  cosine between the oracle's penultimate features of generated images and of the private photos
  (mean pairwise cosine, the same statistic the paper computes with CLIP and DINO);
* prompt fidelity (the CLIP-T analogue): the fraction of images that honour the context the
  prompt asks for (background, position, size), with the concept token in the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from simulations.world.concepts import IDENTITY, Concept
from simulations.world.render import ATTRIBUTES

ASSET_DIR = Path(__file__).resolve().parent / "assets"
WEIGHTS_NAME, META_NAME = "oracle.safetensors", "oracle.json"


class AttributeNet(nn.Module):
    """A small CNN: 4 conv stages (64 -> 4 px), a shared 128-d feature, one linear head per attribute.

    Flattening the 4 x 4 map (instead of global pooling) keeps where the object is, which the
    position head needs.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        chans = [3, width // 2, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                       nn.MaxPool2d(2)]
        self.trunk = nn.Sequential(*layers)
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * 16, feature_dim),
                                     nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(feature_dim, len(v)) for a, v in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x: (B, 3, 64, 64) in [-1, 1] -> (features (B, F), {attribute: logits (B, classes)})."""
        f = self.feature(self.trunk(x))
        return f, {a: head(f) for a, head in self.heads.items()}


def to_tensor(images: Sequence[Image.Image] | np.ndarray, resolution: int = 64) -> torch.Tensor:
    """PIL images or a (N, H, W, 3) uint8 array -> (N, 3, 64, 64) float in [-1, 1]."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected a (N, H, W, 3) array, got shape {images.shape}")
        arr = images
    else:
        if len(images) == 0:
            raise ValueError("no images given")
        arr = np.stack([
            np.asarray(im.convert("RGB").resize((resolution, resolution), Image.BILINEAR))
            if im.size != (resolution, resolution) else np.asarray(im.convert("RGB"))
            for im in images
        ])
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@dataclass(frozen=True)
class PromptSpec:
    """A prompt with a placeholder slot and the context attributes it asks for.

    `template` contains one "{}" where the concept token goes, e.g.
    ``"a photo of {} on a green background"`` with ``context={"background": "green"}``.
    """

    template: str
    context: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.template.count("{}") != 1:
            raise ValueError(f"template must contain exactly one '{{}}', got {self.template!r}")
        for attr, value in self.context.items():
            if attr not in ATTRIBUTES or attr in IDENTITY:
                raise ValueError(f"context attribute must be one of "
                                 f"{[a for a in ATTRIBUTES if a not in IDENTITY]}, got {attr!r}")
            if value not in ATTRIBUTES[attr]:
                raise ValueError(f"context {attr} must be one of {list(ATTRIBUTES[attr])}, "
                                 f"got {value!r}")

    def prompt(self, token: str) -> str:
        """The prompt with `token` in the slot."""
        return self.template.format(token)


def context_prompts(concept: Concept | None = None) -> list[PromptSpec]:
    """The standard context prompts (the benchmark's analogue of the paper's 25 prompts).

    Backgrounds that equal the concept's colour are left out (the world never renders them).
    """
    specs = [PromptSpec(f"a photo of {{}} on a {bg} background", {"background": bg})
             for bg in ATTRIBUTES["background"] if concept is None or bg != concept.colour]
    specs += [PromptSpec("a photo of {} on the left", {"position": "left"}),
              PromptSpec("a photo of {} on the right", {"position": "right"}),
              PromptSpec("a photo of a small {}", {"size": "small"}),
              PromptSpec("a photo of a big {}", {"size": "big"})]
    return specs


class Oracle:
    """Loaded attribute classifier; see the module docstring for the metrics it gives."""

    def __init__(self, net: AttributeNet, meta: dict) -> None:
        self.net = net.eval()
        self.meta = meta

    @classmethod
    def load(cls, directory: str | Path | None = None) -> Oracle:
        """Load the shipped oracle (or one from `directory` holding oracle.safetensors + .json)."""
        from safetensors.torch import load_file

        d = Path(directory) if directory is not None else ASSET_DIR
        weights, meta_file = d / WEIGHTS_NAME, d / META_NAME
        for f in (weights, meta_file):
            if not f.is_file():
                raise FileNotFoundError(f"oracle file {f} is missing; train it with "
                                        "`python -m simulations.world.train_oracle`")
        meta = json.loads(meta_file.read_text())
        if meta.get("attributes") != {k: list(v) for k, v in ATTRIBUTES.items()}:
            raise ValueError(f"oracle in {d} was trained on other attribute vocabularies; retrain it")
        net = AttributeNet(**meta["net"])
        net.load_state_dict(load_file(weights))
        return cls(net, meta)

    @torch.no_grad()
    def _run(self, images: Sequence[Image.Image] | np.ndarray) -> tuple[torch.Tensor, dict]:
        feats, logits = [], {a: [] for a in ATTRIBUTES}
        x = to_tensor(images)
        for i in range(0, len(x), 256):
            f, lg = self.net(x[i:i + 256])
            feats.append(f)
            for a in ATTRIBUTES:
                logits[a].append(lg[a])
        return torch.cat(feats), {a: torch.cat(v) for a, v in logits.items()}

    def predict(self, images: Sequence[Image.Image] | np.ndarray) -> list[dict[str, str]]:
        """The predicted word of every attribute, one dict per image."""
        _, logits = self._run(images)
        idx = {a: lg.argmax(1).tolist() for a, lg in logits.items()}
        return [{a: ATTRIBUTES[a][idx[a][i]] for a in ATTRIBUTES} for i in range(len(idx["shape"]))]

    def features(self, images: Sequence[Image.Image] | np.ndarray) -> torch.Tensor:
        """(N, F) unit-norm penultimate features (the oracle's analogue of a DINO embedding)."""
        f, _ = self._run(images)
        return torch.nn.functional.normalize(f, dim=1)

    def concept_fidelity(
        self,
        images: Sequence[Image.Image],
        concept: Concept,
        *,
        reference: Sequence[Image.Image] | None = None,
        photos_seed: int = 0,
    ) -> dict[str, float]:
        """How well `images` show `concept`.

        Returns ``match`` (fraction carrying all identity attributes), ``<attr>`` per identity
        attribute, and ``feature_cosine`` (mean pairwise cosine of oracle features between the
        images and `reference`, default the concept's private photos of `photos_seed`).
        """
        preds = self.predict(images)
        out = {a: float(np.mean([p[a] == concept.attributes[a] for p in preds])) for a in IDENTITY}
        out["match"] = float(np.mean([all(p[a] == concept.attributes[a] for a in IDENTITY)
                                      for p in preds]))
        ref = list(reference) if reference is not None else concept.private_photos(photos_seed)
        out["feature_cosine"] = float((self.features(images) @ self.features(ref).T).mean())
        out["n"] = float(len(preds))
        return out

    def prompt_fidelity(
        self,
        images: Sequence[Image.Image],
        prompt_spec: PromptSpec,
        concept: Concept | None = None,
    ) -> dict[str, float]:
        """How often `images` (generated from `prompt_spec`) honour the asked context.

        Returns ``match`` (all context attributes right), ``<attr>`` per context attribute and,
        when `concept` is given, ``concept_match`` (identity kept while the context changes).
        """
        if not prompt_spec.context:
            raise ValueError(f"prompt spec {prompt_spec.template!r} asks for no context")
        preds = self.predict(images)
        ctx = prompt_spec.context
        out = {a: float(np.mean([p[a] == v for p in preds])) for a, v in ctx.items()}
        out["match"] = float(np.mean([all(p[a] == v for a, v in ctx.items()) for p in preds]))
        if concept is not None:
            out["concept_match"] = float(np.mean([
                all(p[a] == concept.attributes[a] for a in IDENTITY) for p in preds]))
        out["n"] = float(len(preds))
        return out
