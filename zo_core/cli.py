"""`fedzoodip` command line: personalize, generate, and the commands other packages register.

Other packages add sub-commands through the `fedzoodip.commands` entry-point group (a function that
takes the argparse sub-parsers and registers one parser whose `func` runs it), so the engine does not
import the simulation layer.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from zo_core.config import QUANT_BACKENDS, QuantConfig, TIConfig, TrainConfig, ZOConfig, default_mu


def _window(text: str) -> tuple[int, int] | None:
    if text.lower() in ("none", "full", "off"):
        return None
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--puts takes 'T_L,T_U' (e.g. 500,900) or 'off', got {text!r}") from err
    return lo, hi


def add_personalize_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d_zo, d_ti, d_tr = ZOConfig(), TIConfig(), TrainConfig()
    p = sub.add_parser(
        "personalize",
        help="learn a personal token from a folder of photos with forward passes only (ZOODiP)",
        description="Learn a textual-inversion token on a (quantized) Stable Diffusion model. Defaults are the "
        "ZOODiP paper's: RGE with n=2, mu=1e-3, Adam eps 1e-3, Subspace Gradient tau=128 (D/4 below D=512) nu=1e-3, PUTS [500,900).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, help="local SD folder (diffusers layout); default: the embedded model")
    p.add_argument("--images", required=True, help="folder of photos (jpg/png/webp); optional NAME.txt captions with {}")
    p.add_argument("--token", default=d_ti.placeholder, help="placeholder string, e.g. '<my-dog>'")
    p.add_argument("--init", default=d_ti.initializer, help="single-token initializer word, e.g. 'dog'")
    p.add_argument("--num-vectors", type=int, default=d_ti.num_vectors, help="vectors per token")
    p.add_argument("--out", required=True, help="output folder (learned_embeds.safetensors, run.json, checkpoint)")
    p.add_argument("--steps", type=int, default=d_tr.steps, help="optimizer steps (the paper used 30000 on SD1.5)")
    p.add_argument("--quant", choices=QUANT_BACKENDS, default="none", help="weight quantization backend")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="compute dtype of the model (the token and Adam state stay fp32)")
    p.add_argument("--optimizer", choices=("zo", "backprop"), default=d_tr.optimizer,
                   help="zo: forward passes only; backprop: the autograd TI baseline (same code path)")
    p.add_argument("--estimator", choices=("rge", "spsa"), default=d_zo.estimator)
    p.add_argument("--n", type=int, default=d_zo.n, help="random directions per step")
    p.add_argument("--mu", type=float, default=None,
                   help="perturbation scale; default: the paper's 1e-3, or 1e-2 with a 4-bit UNet (quanto-int4, bnb-nf4)")
    p.add_argument("--lr", type=float, default=d_zo.lr)
    p.add_argument("--sg", choices=("on", "off"), default="on", help="Subspace Gradient")
    p.add_argument("--tau", type=int, default=d_zo.tau,
                   help="SG buffer length / refresh period; default: the paper's 128, or D/4 for tokens "
                        "of D < 512 floats (a 128-row buffer would span all of a small token's space)")
    p.add_argument("--nu", type=float, default=d_zo.nu, help="SG variance share treated as noise")
    p.add_argument("--puts", type=_window, default=d_zo.puts, help="timestep window T_L,T_U or 'off' for U[0,T)")
    p.add_argument("--forwards", choices=("batched", "sequential"), default="batched",
                   help="evaluate the n+1 candidates in one batched forward or one by one (less memory)")
    p.add_argument("--seed", type=int, default=d_tr.seed)
    p.add_argument("--resolution", type=int, default=None, help="training resolution; default: the model's")
    p.add_argument("--checkpoint-every", type=int, default=d_tr.checkpoint_every)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run_personalize_cmd)


def run_personalize_cmd(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from zo_core.personalize import PersonalizeJob, run_personalize

    if args.threads:
        torch.set_num_threads(args.threads)
    job = PersonalizeJob(
        images=args.images, out=args.out, model=args.model, dtype=args.dtype,
        ti=TIConfig(placeholder=args.token, initializer=args.init, num_vectors=args.num_vectors,
                    resolution=args.resolution),
        zo=ZOConfig(estimator=args.estimator, n=args.n, mu=args.mu if args.mu is not None else default_mu(args.quant),
                    lr=args.lr, use_sg=args.sg == "on",
                    tau=args.tau, nu=args.nu, puts=args.puts, batched=args.forwards == "batched"),
        train=TrainConfig(steps=args.steps, seed=args.seed, optimizer=args.optimizer,
                          checkpoint_every=args.checkpoint_every),
        quant=QuantConfig(backend=args.quant),
    )  # fmt: skip
    bar = tqdm(total=args.steps, desc="personalize", unit="step", dynamic_ncols=True)

    def progress(step: int, total: int, loss: float, peak: float) -> None:
        if bar.n == 0 and step > 1:
            bar.update(step - 1)  # resumed run
        bar.set_postfix(loss=f"{loss:.4f}", peak=f"{peak:.0f}MiB", refresh=False)
        bar.update(1)

    t0 = time.perf_counter()
    try:
        record = run_personalize(job, resume=args.resume, progress=progress)
    finally:
        bar.close()
    out = Path(args.out)
    print(f"learned token {args.token!r}: {out / 'learned_embeds.safetensors'}  "
          f"({record['steps']} steps, {time.perf_counter() - t0:.1f} s, "
          f"train peak {record['peak_memory_mib'].get('train', float('nan')):.0f} MiB); record: {out / 'run.json'}")  # fmt: skip
    return 0


def add_generate_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from zo_core.generate import SCHEDULERS

    p = sub.add_parser("generate", help="sample an image grid with a learned token",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", default=None, help="local SD folder; default: the embedded model")
    p.add_argument("--embeds", default=None, help="learned_embeds.safetensors (omit to sample the base model)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt containing the placeholder; repeat for several rows")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt (one grid row each)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="sampler; default: the folder's own (DDIM in place of DDPM)")
    p.add_argument("--quant", choices=QUANT_BACKENDS, default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grid.png", help="PNG grid to write")
    p.set_defaults(func=run_generate_cmd)


def run_generate_cmd(args: argparse.Namespace) -> int:
    from zo_core.engine import Personalizer
    from zo_core.export import load_learned_embeds
    from zo_core.generate import image_grid
    from zo_core.state import PersonalState

    engine = Personalizer.from_pretrained(args.model, quant=QuantConfig(backend=args.quant))
    state = None
    if args.embeds:
        placeholder, theta = load_learned_embeds(args.embeds, engine.token_dim)
        state = PersonalState.fresh(placeholder, "?", theta, seed=0)
    images = engine.generate(state, args.prompt, num_images=args.num_images, steps=args.steps,
                             guidance=args.guidance, seed=args.seed, scheduler=args.scheduler)  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=args.num_images).save(out)
    print(f"wrote {out} ({len(args.prompt)} prompt(s) x {args.num_images} image(s))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedzoodip",
        description="Federated, backprop-free personalization of quantized diffusion models (ZOODiP + Flower).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_personalize_parser(sub)
    add_generate_parser(sub)
    for ep in sorted(entry_points(group="fedzoodip.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"fedzoodip {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
