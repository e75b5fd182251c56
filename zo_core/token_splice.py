"""The placeholder token: registration in the tokenizer, and splicing candidate vectors into the text encoder.

The embedding table is NEVER written. Placeholder ids are mapped to a harmless id before the lookup
(forward pre-hook) and the looked-up rows at those positions are replaced by candidate vectors
(forward hook). So (a) the frozen - possibly quantized - table stays bit-identical, (b) n + 1 different
tokens can be evaluated in one batch, one candidate per batch row, and (c) perturbations are never
"applied and undone" in low precision (the MeZO drift problem). Notation: V vectors of width d per token,
B candidates per batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class TokenError(ValueError):
    """A placeholder or initializer word that cannot be used."""


class PlaceholderRegistry:
    """Placeholder strings -> token ids, added to the tokenizer without resizing the embedding table."""

    def __init__(self, tokenizer, base_vocab_size: int) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer = tokenizer
        self.base_vocab_size = base_vocab_size  # ids >= this are ours, never looked up in the table
        self.ids: dict[str, int] = {}

    def register(self, token_strings: Sequence[str]) -> list[int]:
        """Add tokens (idempotent for our own); refuse strings the base vocabulary already has."""
        ids: list[int] = []
        for s in token_strings:
            if s in self.ids:
                ids.append(self.ids[s])
                continue
            if s in self.tokenizer.get_vocab():
                raise TokenError(f"placeholder {s!r} is already a word of the model's vocabulary; pick another")
            self.tokenizer.add_tokens([s])
            tid = int(self.tokenizer.convert_tokens_to_ids(s))
            if tid < self.base_vocab_size:
                raise TokenError(f"tokenizer gave placeholder {s!r} id {tid} inside the base vocabulary")
            self.ids[s] = tid
            ids.append(tid)
        return ids

    def initializer_id(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise TokenError(
                f"initializer {word!r} is {len(ids)} tokens for this tokenizer ({pieces}); use a single-token word"
            )
        if ids[0] >= self.base_vocab_size:
            raise TokenError(f"initializer {word!r} is a placeholder, not a word of the model")
        return int(ids[0])


class TokenSplicer:
    """Hooks on the text encoder's input embedding that put candidate vectors at placeholder positions."""

    def __init__(self, embedding: nn.Embedding, registry: PlaceholderRegistry) -> None:
        self.embedding = embedding
        self.registry = registry
        self._slots: torch.Tensor | None = None  # (B, L) index of the vector at each position, -1 elsewhere
        self._candidates: torch.Tensor | None = None  # (B, V, d)
        self._handles = [
            embedding.register_forward_pre_hook(self._pre_hook),
            embedding.register_forward_hook(self._post_hook),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _pre_hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]):  # type: ignore[no-untyped-def]
        if self._candidates is None:
            return None
        (input_ids,) = args
        slots = torch.full_like(input_ids, -1)
        for j, tid in enumerate(self._token_ids):
            slots[input_ids == tid] = j
        self._slots = slots
        # any id of ours would index past the table: look up id 0 there instead, then overwrite
        return (torch.where(input_ids >= self.registry.base_vocab_size, torch.zeros_like(input_ids), input_ids),)

    def _post_hook(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor | None:  # type: ignore[no-untyped-def]
        if self._candidates is None or self._slots is None:
            return None
        cand, slots = self._candidates, self._slots  # (B, V, d), (B, L)
        if cand.shape[0] != slots.shape[0]:
            raise RuntimeError(f"{cand.shape[0]} candidates for a batch of {slots.shape[0]} prompts")
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
        gathered = cand[rows, slots.clamp(min=0)]  # (B, L, d)
        return torch.where((slots >= 0)[..., None], gathered.to(out.dtype), out)

    @contextmanager
    def candidates(self, token_ids: Sequence[int], cand: torch.Tensor) -> Iterator[None]:
        """Within the block, prompt b sees candidate `cand[b]` (V, d) at the placeholder positions."""
        if cand.dim() != 3 or cand.shape[1] != len(token_ids) or cand.shape[2] != self.embedding.embedding_dim:
            raise ValueError(
                f"candidates must be (B, {len(token_ids)}, {self.embedding.embedding_dim}), got {tuple(cand.shape)}"
            )
        self._token_ids = list(token_ids)
        self._candidates = cand
        try:
            yield
        finally:
            self._candidates = None
            self._slots = None
