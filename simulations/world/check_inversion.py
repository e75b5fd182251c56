"""Check that the world's concepts are learnable by textual inversion (plain backprop).

The quality benchmark compares ZO methods by how well their tokens express a concept; that is
only meaningful if a token *can* express it in the shipped model. This script optimises one token
row by backprop (the classic textual inversion of Gal et al., every weight frozen) on a concept's
private photos and reports the oracle's concept fidelity of "a photo of <concept>" at step 0 (the
initializer word's embedding) and after training.

Written here (rather than through zo_core's engine) so that the embedded model can be validated on
its own; the splice of the token row is a forward hook on the input embeddings, so the embedding
table itself is never modified during training.

Run: ``python -m simulations.world.check_inversion --model zo_core/assets/tinyworld``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from simulations.world.concepts import Concept, get_concept, list_concepts
from simulations.world.evaluate_model import generate, load_pipeline
from simulations.world.oracle import Oracle, to_tensor

TEMPLATES: tuple[str, ...] = ("a photo of {}", "a picture of {}", "an image of {}", "{}")


def add_placeholder(pipe: Any, concept: Concept) -> tuple[int, torch.Tensor]:
    """Add the concept's placeholder to the tokenizer; return (its id, the initializer's row)."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    init_ids = tok(concept.initializer, add_special_tokens=False).input_ids
    if len(init_ids) != 1:
        raise ValueError(f"initializer {concept.initializer!r} is {len(init_ids)} tokens, need 1")
    if tok.add_tokens([concept.placeholder]) != 1:
        raise ValueError(f"placeholder {concept.placeholder} already in the tokenizer")
    te.resize_token_embeddings(len(tok), mean_resizing=False)  # the row is set explicitly
    pid = tok.convert_tokens_to_ids(concept.placeholder)
    return pid, te.get_input_embeddings().weight[init_ids[0]].detach().clone()


def fidelity(pipe: Any, oracle: Oracle, concept: Concept, pid: int, theta: torch.Tensor,
             n: int, seed: int) -> dict[str, float]:
    """Oracle concept fidelity of n images of "a photo of <concept>" with row `pid` = theta."""
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[pid] = theta
    images = generate(pipe, [f"a photo of {concept.placeholder}"] * n, seed=seed)
    return oracle.concept_fidelity(images, concept)


def invert(pipe: Any, concept: Concept, pid: int, theta0: torch.Tensor, *, steps: int,
           lr: float, seed: int, window: tuple[int, int]) -> tuple[torch.Tensor, list[float]]:
    """Backprop textual inversion of one token row; returns (theta, per-step losses)."""
    te, unet, vae, tok = pipe.text_encoder, pipe.unet, pipe.vae, pipe.tokenizer
    for m in (te, unet, vae):
        m.requires_grad_(False)
    photos = concept.private_photos(seed)
    x = to_tensor(photos)
    x = torch.cat([x, x.flip(-1)])  # flips: position is not part of the identity
    with torch.no_grad():
        z0 = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor  # (2P, 4, 16, 16)
    theta = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.Adam([theta], lr=lr)
    emb = te.get_input_embeddings()

    def splice(_m: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        mask = (inputs[0] == pid).unsqueeze(-1)  # (B, L, 1)
        return torch.where(mask, theta.to(out.dtype), out)

    hook = emb.register_forward_hook(splice)
    abar = pipe.scheduler.alphas_cumprod.float()
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    losses = []
    try:
        for _ in range(steps):
            caps = [TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(concept.placeholder)
                    for _ in range(len(z0))]
            ids = tok(caps, padding="max_length", max_length=tok.model_max_length,
                      return_tensors="pt").input_ids
            t = torch.randint(window[0], window[1], (len(z0),), generator=gen)
            eps = torch.randn(z0.shape, generator=gen)
            a = abar[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
            loss = F.mse_loss(unet(zt, t, te(ids)[0]).sample, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        hook.remove()
    return theta.detach(), losses


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m simulations.world.check_inversion",
                                description="Backprop textual inversion check on world concepts.")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--concepts", nargs="+", default=list_concepts(), choices=list_concepts())
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--window", type=int, nargs=2, default=(0, 1000), metavar=("T_L", "T_U"))
    p.add_argument("--n", type=int, default=32, help="images generated per evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not 0 <= args.window[0] < args.window[1] <= 1000:
        p.error(f"--window must satisfy 0 <= T_L < T_U <= 1000, got {args.window}")
    torch.set_num_threads(args.threads)
    oracle = Oracle.load()
    results = {}
    for name in args.concepts:
        concept = get_concept(name)
        pipe = load_pipeline(args.model)
        pid, theta0 = add_placeholder(pipe, concept)
        before = fidelity(pipe, oracle, concept, pid, theta0, args.n, args.seed + 1)
        t0 = time.time()
        theta, losses = invert(pipe, concept, pid, theta0, steps=args.steps, lr=args.lr,
                               seed=args.seed, window=tuple(args.window))
        wall = time.time() - t0
        after = fidelity(pipe, oracle, concept, pid, theta, args.n, args.seed + 1)
        results[name] = {"initializer": concept.initializer, "before": before, "after": after,
                         "loss_first_20": float(np.mean(losses[:20])),
                         "loss_last_20": float(np.mean(losses[-20:])), "train_wall_s": round(wall, 1)}
        print(name, json.dumps(results[name]), flush=True)
    record = {"steps": args.steps, "lr": args.lr, "window": list(args.window), "n": args.n,
              "seed": args.seed, "concepts": results}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
