"""Train the oracle's attribute classifiers on rendered images and report held-out accuracy.

Generated images are blurrier and noisier than renders (they pass through a 4x VAE and a
sampler), so training images are augmented with random blur, pixel noise and brightness jitter;
held-out accuracy is reported on clean renders and on augmented ones.

Run: ``python -m simulations.world.train_oracle`` (writes simulations/world/assets/oracle.*).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from simulations.world.oracle import ASSET_DIR, META_NAME, WEIGHTS_NAME, AttributeNet, to_tensor
from simulations.world.render import ATTRIBUTES, render_batch, sample_scene


def make_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n rendered scenes -> (images (n, 3, 64, 64) in [-1, 1], {attribute: class index (n,)})."""
    scenes = [sample_scene(rng) for _ in range(n)]
    x = to_tensor(render_batch(scenes, rng))
    y = {a: torch.tensor([vocab.index(getattr(s, a)) for s in scenes]) for a, vocab in
         ATTRIBUTES.items()}
    return x, y


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random box blur (radius 0-1 px), brightness jitter (+-0.1) and Gaussian noise (<= 0.1)."""
    n = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = torch.rand(n, 1, 1, 1, generator=gen)
    x = w * blurred + (1 - w) * x
    x = x + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.2
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.1
    return x.clamp(-1, 1)


@torch.no_grad()
def accuracy(net: AttributeNet, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-attribute accuracy of `net` on (x, y)."""
    net.eval()
    hits = {a: 0 for a in ATTRIBUTES}
    for i in range(0, len(x), 500):
        _, logits = net(x[i:i + 500])
        for a in ATTRIBUTES:
            hits[a] += int((logits[a].argmax(1) == y[a][i:i + 500]).sum())
    return {a: hits[a] / len(x) for a in ATTRIBUTES}


def train(steps: int, batch: int, seed: int, lr: float) -> tuple[AttributeNet, list[float]]:
    """Train a fresh `AttributeNet` (initialised under a forked RNG seeded by `seed`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = AttributeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        net.train()
        x, y = make_batch(np.random.default_rng([seed, 0, step]), batch)
        _, logits = net(augment(x, gen))
        loss = sum(F.cross_entropy(logits[a], y[a]) for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"[oracle] step {step + 1}/{steps} loss {float(loss):.4f}", flush=True)
    return net, losses


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m simulations.world.train_oracle",
                                description="Train the synthetic world's attribute oracle.")
    p.add_argument("--out", type=Path, default=ASSET_DIR, help="output folder (default: assets)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", type=int, default=4000, help="held-out images for accuracy")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.held_out < 1:
        p.error("--steps, --batch and --held-out must be >= 1")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    net, losses = train(args.steps, args.batch, args.seed, args.lr)
    wall = time.time() - t0
    # Held-out images come from a stream (seed, 1) that training never draws from.
    x, y = make_batch(np.random.default_rng([args.seed, 1]), args.held_out)
    acc_clean = accuracy(net, x, y)
    acc_aug = accuracy(net, augment(x, torch.Generator().manual_seed(args.seed + 1)), y)
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, args.out / WEIGHTS_NAME)
    meta = {
        "net": {"width": 32, "feature_dim": 128},
        "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        "train": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                  "wall_s": round(wall, 1), "threads": args.threads,
                  "final_loss": float(np.mean(losses[-50:]))},
        "held_out": {"images": args.held_out, "accuracy_clean": acc_clean,
                     "accuracy_augmented": acc_aug},
    }
    (args.out / META_NAME).write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta["held_out"], indent=2))


if __name__ == "__main__":
    main()
