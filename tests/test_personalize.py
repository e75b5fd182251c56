"""The personalize job and CLI: outputs, exact resume, export into diffusers, and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zo_core.cli import main
from zo_core.config import TIConfig, TrainConfig, ZOConfig
from zo_core.export import load_learned_embeds
from zo_core.personalize import PersonalizeJob, run_personalize


def _job(model: Path, images: Path, out: Path, steps: int = 9, **kw) -> PersonalizeJob:  # type: ignore[no-untyped-def]
    return PersonalizeJob(images=str(images), out=str(out), model=str(model),
                          ti=TIConfig(placeholder="<tok>", initializer="dog"), zo=ZOConfig(tau=4),
                          train=TrainConfig(steps=steps, seed=11, checkpoint_every=4), **kw)  # fmt: skip


def test_run_writes_token_record_and_checkpoint(tiny_model_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    record = run_personalize(_job(tiny_model_dir, photo_dir, tmp_path / "out"))
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"learned_embeds.safetensors", "run.json", "checkpoint.safetensors"}
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk["steps"] == 9 and len(on_disk["losses"]) == 9 and on_disk["forward_passes"] == 27
    assert on_disk["peak_memory_mib"]["train"] > 0 and record["fingerprint"]
    assert on_disk["job"]["zo"]["puts"] == [500, 900]
    # tau = 4: after 8 steps the SG has refreshed twice from a 4-row buffer (rank <= 3 centred).
    sg = on_disk["subspace_gradient"]
    assert sg["token_size"] == 32 and sg["tau"] == 4 and 1 <= sg["removed_directions"] <= 3
    name, theta = load_learned_embeds(out / "learned_embeds.safetensors", 32)
    assert name == "<tok>" and theta.shape == (1, 32)


def test_killed_and_resumed_run_ends_with_the_same_token(tiny_model_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    run_personalize(_job(tiny_model_dir, photo_dir, tmp_path / "whole"))

    def crash(step: int, total: int, loss: float, peak: float) -> None:
        if step == 6:  # after the checkpoint at step 4, mid-chunk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_personalize(_job(tiny_model_dir, photo_dir, tmp_path / "killed"), progress=crash)
    assert not (tmp_path / "killed" / "learned_embeds.safetensors").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run_personalize(_job(tiny_model_dir, photo_dir, tmp_path / "killed"))
    run_personalize(_job(tiny_model_dir, photo_dir, tmp_path / "killed"), resume=True)
    _, whole = load_learned_embeds(tmp_path / "whole" / "learned_embeds.safetensors")
    _, resumed = load_learned_embeds(tmp_path / "killed" / "learned_embeds.safetensors")
    assert torch.equal(whole, resumed)
    rec = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert len(rec["losses"]) == 9


def test_resume_refuses_another_configuration_or_model(tiny_model_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    run_personalize(_job(tiny_model_dir, photo_dir, tmp_path / "o", steps=4))
    other = PersonalizeJob(**{**_job(tiny_model_dir, photo_dir, tmp_path / "o").__dict__, "zo": ZOConfig(n=3)})
    with pytest.raises(ValueError, match="different configuration"):
        run_personalize(other, resume=True)
    moved = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, moved)
    (moved / "unet" / "config.json").write_text((moved / "unet" / "config.json").read_text() + " ")
    with pytest.raises(ValueError, match="another model"):
        run_personalize(_job(moved, photo_dir, tmp_path / "o"), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_personalize(_job(tiny_model_dir, photo_dir, tmp_path / "nothing"), resume=True)


def test_export_loads_and_generates_in_diffusers(tiny_model_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    run_personalize(_job(tiny_model_dir, photo_dir, tmp_path / "o", steps=3))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True, safety_checker=None)
    pipe.load_textual_inversion(str(tmp_path / "o" / "learned_embeds.safetensors"))
    tid = pipe.tokenizer.convert_tokens_to_ids("<tok>")
    _, theta = load_learned_embeds(tmp_path / "o" / "learned_embeds.safetensors")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[tid].detach(), theta[0])
    img = pipe("a photo of <tok>", num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert img.size == (64, 64)


def test_cli_personalize_and_generate(tiny_model_dir: Path, photo_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "cli"
    rc = main(["personalize", "--model", str(tiny_model_dir), "--images", str(photo_dir), "--token", "<t>",
               "--init", "cat", "--out", str(out), "--steps", "3", "--tau", "4", "--puts", "400,800"])  # fmt: skip
    assert rc == 0 and (out / "learned_embeds.safetensors").is_file()
    grid = tmp_path / "grid.png"
    rc = main(["generate", "--model", str(tiny_model_dir), "--embeds", str(out / "learned_embeds.safetensors"),
               "--prompt", "a photo of <t>", "--prompt", "<t> on a beach", "--num-images", "2", "--steps", "2",
               "--out", str(grid)])  # fmt: skip
    assert rc == 0 and Image.open(grid).size == (128, 128)
    rc = main(["generate", "--model", str(tiny_model_dir), "--embeds", str(out / "learned_embeds.safetensors"),
               "--prompt", "a photo of a dog", "--out", str(grid)])  # fmt: skip
    assert rc == 2 and "must contain the placeholder" in capsys.readouterr().err


def test_help_explains_the_defaults(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        main(["personalize", "--help"])
    text = capsys.readouterr().out
    for flag in ("--quant", "--optimizer", "--n", "--mu", "--tau", "--nu", "--puts", "--resume", "500, 900"):
        assert flag in text


# ------------------------------------------------------------------ bad inputs
def _write(d: Path, name: str, img: Image.Image) -> None:
    img.save(d / name)


def test_bad_image_folders_fail_listing_files_and_write_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    _write(d, "ok.png", Image.new("RGB", (96, 96), "red"))
    _write(d, "tiny.png", Image.new("RGB", (20, 20), "red"))
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (d / "notes.pdf").write_bytes(b"%PDF-1.4")
    (d / "ok.txt").write_text("no placeholder here")
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        run_personalize(_job(tiny_model_dir, d, out))
    msg = str(err.value)
    for part in ("tiny.png", "too small", "broken.jpg", "unreadable", "notes.pdf", "not an image", "ok.txt"):
        assert part in msg
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        run_personalize(_job(tiny_model_dir, empty, out))
    with pytest.raises(ValueError, match="does not exist"):
        run_personalize(_job(tiny_model_dir, tmp_path / "missing", out))


def test_image_modes_are_converted(tiny_engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from zo_core.images import load_private_images

    d = tmp_path / "modes"
    d.mkdir()
    Image.new("L", (70, 90), 128).save(d / "gray.png")
    Image.new("RGBA", (70, 90), (0, 0, 255, 0)).save(d / "rgba.png")
    Image.new("CMYK", (70, 90), (0, 255, 0, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((90, 70), 40000, dtype=np.uint16)).save(d / "deep.png")
    Image.new("RGB", (70, 90), "green").save(d / "photo.webp")
    rotated = Image.new("RGB", (100, 70), "white")
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 on display
    rotated.save(d / "rotated.jpg", exif=exif)
    photos = load_private_images(d)
    assert all(img.mode == "RGB" for img in photos.images)
    sizes = dict(zip(photos.names, (img.size for img in photos.images), strict=True))
    assert sizes["rotated.jpg"] == (70, 100)
    by_name = dict(zip(photos.names, photos.images, strict=True))
    assert by_name["rgba.png"].getpixel((5, 5)) == (255, 255, 255)  # transparent -> white background
    assert by_name["deep.png"].getpixel((5, 5))[0] in range(150, 160)  # 40000 / 65535 * 255


def test_bad_model_folders_name_what_is_missing(tmp_path: Path, tiny_model_dir: Path) -> None:
    from zo_core.engine import Personalizer

    with pytest.raises(ValueError, match="does not exist"):
        Personalizer.from_pretrained(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError) as err:
        Personalizer.from_pretrained(broken)
    assert "vae/" in str(err.value) and "unet/ weights" in str(err.value)
    sdxl = tmp_path / "sdxl"
    shutil.copytree(tiny_model_dir, sdxl)
    idx = json.loads((sdxl / "model_index.json").read_text())
    idx["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (sdxl / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="SDXL"):
        Personalizer.from_pretrained(sdxl)


def test_bad_tokens_and_embeds(tiny_engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    from zo_core.token_splice import TokenError

    with pytest.raises(TokenError, match="single-token"):
        tiny_engine.init_state(TIConfig(placeholder="<x>", initializer="zebra"))
    with pytest.raises(TokenError, match="already a word"):
        tiny_engine.init_state(TIConfig(placeholder="dog</w>", initializer="dog"))
    with pytest.raises(ValueError, match="without spaces"):
        TIConfig(placeholder="<my dog>")
    save_file({"<t>": torch.full((1, 32), float("nan"))}, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="NaN"):
        load_learned_embeds(tmp_path / "nan.safetensors", 32)
    save_file({"<t>": torch.zeros(1, 768)}, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        load_learned_embeds(tmp_path / "wide.safetensors", 32)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a safetensors"):
        load_learned_embeds(tmp_path / "junk.safetensors")


def test_bad_configs_raise() -> None:
    for kwargs, match in [({"mu": 0}, "mu"), ({"n": 0}, "zo.n"), ({"puts": (900, 500)}, "puts"),
                          ({"estimator": "fd"}, "estimator"), ({"tau": 1}, "tau")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ZOConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown key .learning-rate"):
        ZOConfig.from_run_config({"zo.lr": 1e-2, "zo.learning-rate": 1})
    assert ZOConfig.from_run_config({"zo.adam-eps": 1e-4}).adam_eps == 1e-4


def test_cli_uses_the_papers_4bit_mu_and_records_quantization(tiny_model_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q4"
    rc = main(["personalize", "--model", str(tiny_model_dir), "--images", str(photo_dir), "--token", "<q>",
               "--init", "cat", "--out", str(out), "--steps", "2", "--quant", "quanto-int4"])  # fmt: skip
    assert rc == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["job"]["zo"]["mu"] == 1e-2 and rec["job"]["quant"]["backend"] == "quanto-int4"
    parts = {c["name"]: c for c in rec["quantization"]["components"]}
    assert parts["unet"]["bytes_after"] < parts["unet"]["bytes_before"] / 4


def test_a_loaded_token_conditions_the_first_prompt_too(tiny_model_dir: Path) -> None:
    """A state read from a file is not registered in the tokenizer yet; registration must happen
    before the first prompt is tokenized (it used to split the placeholder into pieces there)."""
    from zo_core.engine import Personalizer
    from zo_core.generate import _prompt_features
    from zo_core.state import PersonalState

    engine = Personalizer.from_pretrained(tiny_model_dir)
    theta = torch.randn(1, engine.token_dim, generator=torch.Generator().manual_seed(0))
    state = PersonalState.fresh("<loaded>", "?", theta, seed=0)
    first = _prompt_features(engine, state, ["a photo of <loaded>"])
    again = _prompt_features(engine, state, ["a photo of <loaded>"])
    assert torch.equal(first, again)
    other = _prompt_features(engine, state.replace(theta=theta + 1), ["a photo of <loaded>"])
    assert not torch.allclose(first, other)  # the token's row is in the features
