"""Quantization backends on a tiny SD-shaped model built offline.

Error bounds, and why: for weights uniform in [-a, a] (PyTorch's default init, which the random
models use), symmetric absmax int8 has step a/127, so the rms weight error relative to the rms weight
is 1 / (2 * 127) = 0.0039; asymmetric min-max 4-bit (quanto int4, 15 steps over 2a) gives 1/15 =
0.067. With iid inputs a single layer's output error equals that relative weight error (checked
below within 25%). Through the tiny UNet's ~12 layers in series the errors add up to about 3.5x the
per-layer figure: measured 0.014 (int8) and 0.21 (int4) on its output, 0.003 / 0.04 for bitsandbytes
(whose Conv2d layers stay float). The pipeline bounds are about twice the measured values.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from zo_core.model_factory import build_tiny_sd
from zo_core.quantize import (
    QUANT_BACKENDS,
    QuantReport,
    bnb_quantization_config,
    component_schemes,
    quantize_module,
    quantize_pipeline_components,
    weight_bytes,
)

QUANTIZED = [b for b in QUANT_BACKENDS if b != "none"]
# Relative error bounds on (text encoder output, UNet output) vs fp32; about 2x measured (see top).
OUTPUT_BOUND = {
    "quanto-int8": (0.03, 0.03),
    "quanto-int4": (0.03, 0.4),
    "bnb-int8": (0.03, 0.01),
    "bnb-nf4": (0.03, 0.08),
}
# Cosine of the token's gradient with the fp32 one. Gradient errors run about twice the output
# errors (measured cosines: 8-bit >= 0.9997, bnb-nf4 0.99, quanto-int4 0.78 to 0.91 by model seed).
GRAD_COSINE = {"quanto-int8": 0.99, "quanto-int4": 0.6, "bnb-int8": 0.99, "bnb-nf4": 0.95}
# Bytes of a quantized layer's weight storage vs fp32, over the tiny model's layers: int8 is 4x less
# scale overhead (one fp32 per row of 32..576 weights); 4-bit is 8x less scale (+shift) overhead,
# which on rows of 32..128 inputs (one scale and shift per row) brings it down to about 5.3x.
RATIO_RANGE = {
    "quanto-int8": (3.4, 4.0),
    "quanto-int4": (5.0, 8.0),
    "bnb-int8": (3.4, 4.0),
    "bnb-nf4": (6.5, 8.0),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model", seed=3)


@pytest.fixture(scope="module")
def float_components(tiny_dir: Path) -> tuple[nn.Module, nn.Module, nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return (
        UNet2DConditionModel.from_pretrained(tiny_dir / "unet"),
        CLIPTextModel.from_pretrained(tiny_dir / "text_encoder"),
        AutoencoderKL.from_pretrained(tiny_dir / "vae"),
    )


def _fresh(float_components: tuple[nn.Module, ...]) -> tuple[nn.Module, nn.Module, nn.Module]:
    unet, text, vae = (copy.deepcopy(m) for m in float_components)
    return unet, text, vae


def _forward(
    unet: nn.Module, text: nn.Module, vae: nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text encoder -> UNet with one token row spliced in by a hook (as the engine does); backprop
    a loss to that row. Returns (text output, UNet output, token gradient, VAE latents)."""
    gen = torch.Generator().manual_seed(11)
    emb = text.get_input_embeddings()
    theta = emb.weight[ids[0, 1]].detach().clone().requires_grad_(True)

    def splice(_m: nn.Module, _i: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        return torch.cat([out[:, :1], theta.expand(out.shape[0], 1, -1), out[:, 2:]], dim=1)

    handle = emb.register_forward_hook(splice)
    try:
        cond = text(ids).last_hidden_state  # (1, 77, d)
        latents = torch.randn(1, 4, 32, 32, generator=gen)
        eps = unet(latents, 700, cond).sample  # (1, 4, 32, 32)
        eps.square().mean().backward()
    finally:
        handle.remove()
    image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        z = vae.encode(image).latent_dist.mean
    assert theta.grad is not None
    return cond.detach(), eps.detach(), theta.grad, z


def _ids(tiny_dir: Path) -> torch.Tensor:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    return tok(
        "a dog on the sofa", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_unknown_backend_names_the_choices(float_components: tuple[nn.Module, ...]) -> None:
    unet, text, vae = _fresh(float_components)
    with pytest.raises(ValueError, match=r"quanto-int8.*bnb-nf4.*got 'int3'"):
        quantize_pipeline_components(unet, text, vae, "int3")
    with pytest.raises(ValueError, match="quanto-int4"):
        component_schemes("QUANTO-INT8")
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_module(nn.Linear(4, 4), "fp8")  # type: ignore[arg-type]


def test_weight_bytes_counts_float_storage_once() -> None:
    lin = nn.Linear(16, 8)
    assert weight_bytes(lin) == (16 * 8 + 8) * 4
    tied = nn.Sequential(lin, nn.Linear(16, 8))
    tied[1].weight = lin.weight  # tied weights share storage: counted once
    assert weight_bytes(tied) == (16 * 8 + 8 + 8) * 4
    half = nn.Linear(16, 8).to(torch.float16)
    assert weight_bytes(half) == (16 * 8 + 8) * 2


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        # (256 x 128) weight; quanto adds two fp32 scalar buffers (input/output scale) per layer.
        ("quanto-int8", 128 * 256 + 128 * 4 + 128 * 4 + 2 * 4),  # int8 data + per-row scale + bias
        (
            "quanto-int4",
            128 * 256 // 2 + 2 * 128 * 2 * 4 + 128 * 4 + 2 * 4,
        ),  # packed, 2 groups of 128
        ("bnb-int8", 128 * 256 + 128 * 4 + 128 * 4),  # int8 data + per-row SCB + bias
        (
            "bnb-nf4",
            128 * 256 // 2 + 128 * 256 // 64 * 4 + 16 * 4 + 128 * 4,
        ),  # packed + absmax + code
    ],
)
def test_weight_bytes_counts_quantized_storage_exactly(scheme: str, expected: int) -> None:
    layer = nn.Sequential(nn.Linear(256, 128))
    quantize_module(layer, scheme)  # type: ignore[arg-type]
    assert weight_bytes(layer) == expected


@pytest.mark.parametrize(
    ("scheme", "per_layer"), [("quanto-int8", 1 / 254), ("quanto-int4", 1 / 15)]
)
def test_single_layer_error_matches_quantization_step(scheme: str, per_layer: float) -> None:
    gen = torch.Generator().manual_seed(5)
    lin = nn.Linear(512, 256)
    with torch.no_grad():
        lin.weight.uniform_(-0.05, 0.05, generator=gen)
    x = torch.randn(64, 512, generator=gen)
    ref = x @ lin.weight.T
    model = nn.Sequential(copy.deepcopy(lin))
    quantize_module(model, scheme)  # type: ignore[arg-type]
    with torch.no_grad():
        err = _rel(model(x) - lin.bias, ref)
    assert 0.75 * per_layer < err < 1.25 * per_layer


@pytest.mark.parametrize("backend", QUANTIZED)
def test_backend_shrinks_weights_keeps_outputs_and_passes_gradients(
    backend: str, tiny_dir: Path, float_components: tuple[nn.Module, ...]
) -> None:
    ids = _ids(tiny_dir)
    ref_cond, ref_eps, ref_grad, ref_z = _forward(*_fresh(float_components), ids)
    unet, text, vae = _fresh(float_components)
    table = text.get_input_embeddings().weight
    layers_before = {
        (comp, name): sub.weight.numel() * sub.weight.element_size()
        for comp, model in (("unet", unet), ("text_encoder", text), ("vae", vae))
        for name, sub in model.named_modules()
        if isinstance(sub, (nn.Linear, nn.Conv2d))
    }

    report = quantize_pipeline_components(unet, text, vae, backend)

    # The report is consistent with what is now in memory.
    assert isinstance(report, QuantReport) and report.backend == backend
    models = {"unet": unet, "text_encoder": text, "vae": vae}
    for comp in report.components:
        assert comp.bytes_after == weight_bytes(models[comp.name])
        assert comp.bytes_after < comp.bytes_before
        assert comp.scheme == component_schemes(backend)[comp.name]
    assert report.total_after == sum(weight_bytes(m) for m in models.values())
    # quanto quantizes every Linear and Conv2d; bitsandbytes has no Conv2d, and the report says so.
    n_conv = sum(isinstance(m, nn.Conv2d) for m in unet.modules())
    expected_float = 0 if backend.startswith("quanto") else n_conv
    assert report.component("unet").layers_float == expected_float

    # The quantized layers' weights shrink by the expected factor (bias and scalar buffers aside),
    # judged per component because the 4-bit backends keep text encoder and VAE at 8 bits.
    before = dict.fromkeys(models, 0)
    after = dict.fromkeys(models, 0)
    for (comp, name), nbytes in layers_before.items():
        layer = models[comp].get_submodule(name)
        if type(layer) in (nn.Linear, nn.Conv2d):
            continue  # left float (bitsandbytes Conv2d)
        extra = sum(b.numel() * b.element_size() for b in layer.buffers(recurse=False))
        if layer.bias is not None:
            extra += layer.bias.numel() * layer.bias.element_size()
        before[comp] += nbytes
        after[comp] += weight_bytes(layer) - extra
    for comp in models:
        lo, hi = RATIO_RANGE[component_schemes(backend)[comp]]
        assert lo < before[comp] / after[comp] < hi, comp

    # Frozen; the input embedding table is the same float, unquantized tensor.
    for model in models.values():
        assert not any(p.requires_grad for p in model.parameters())
    emb = text.get_input_embeddings()
    assert type(emb) is nn.Embedding and emb.weight is table and emb.weight.dtype == torch.float32

    # Outputs stay close to fp32, and the token still gets a useful gradient through the quantized
    # text encoder and UNet (no weight gradient is kept).
    cond, eps, grad, z = _forward(unet, text, vae, ids)
    text_bound, unet_bound = OUTPUT_BOUND[backend]
    assert 0 < _rel(cond, ref_cond) < text_bound
    assert 0 < _rel(eps, ref_eps) < unet_bound
    assert _rel(z, ref_z) < text_bound
    assert torch.isfinite(grad).all() and grad.norm() > 0
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > GRAD_COSINE[backend]
    assert all(p.grad is None for m in models.values() for p in m.parameters())


@pytest.mark.parametrize("backend", ["bnb-int8", "bnb-nf4"])
def test_bnb_on_cpu_runs_no_grad_then_grad(backend: str) -> None:
    """The ZO engine runs eval-mode no-grad forwards; a backprop baseline then needs grad-enabled
    ones in the same process (bitsandbytes' CPU 4-bit repacking would break the second)."""
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(96, 48), nn.GELU(), nn.Linear(48, 40)).eval()
    ref = copy.deepcopy(model)
    quantize_module(model, backend)  # type: ignore[arg-type]
    x = torch.randn(3, 96, generator=gen)
    with torch.no_grad():
        assert _rel(model(x), ref(x)) < 0.15
    xg = x.clone().requires_grad_(True)
    model(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    ref(xr).sum().backward()
    assert xg.grad is not None and xr.grad is not None
    assert _rel(xg.grad, xr.grad) < 0.2


def test_backend_none_freezes_and_keeps_bytes(float_components: tuple[nn.Module, ...]) -> None:
    unet, text, _vae = _fresh(float_components)
    report = quantize_pipeline_components(unet, text, None, "none")
    assert [c.name for c in report.components] == ["unet", "text_encoder"]
    assert report.total_after == report.total_before == weight_bytes(unet) + weight_bytes(text)
    assert report.layers_quantized == 0
    assert not any(p.requires_grad for p in [*unet.parameters(), *text.parameters()])
    assert report.to_dict()["components"][0]["scheme"] == "float"
    with pytest.raises(ValueError, match="no component 'vae'"):
        report.component("vae")


def test_bnb_load_time_config_for_cuda() -> None:
    cfg = bnb_quantization_config("bnb-nf4", "unet", "diffusers")
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4"
    cfg = bnb_quantization_config("bnb-nf4", "text_encoder", "transformers")
    assert cfg.load_in_8bit and not cfg.load_in_4bit and cfg.llm_int8_threshold == 6.0
    with pytest.raises(ValueError, match="bitsandbytes backend"):
        bnb_quantization_config("quanto-int8", "unet", "diffusers")
    with pytest.raises(ValueError, match="component must be one of"):
        bnb_quantization_config("bnb-int8", "tokenizer", "diffusers")


def _mapped_ranges(folder: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if str(folder) in line:
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.parametrize("backend", ["quanto-int8", "bnb-nf4"])
def test_quantizing_releases_the_memory_mapped_float_file(backend: str, tmp_path: Path) -> None:
    """A float bias left as a view into the mapped safetensors file would keep the whole float file
    resident next to the quantized weights; quantization must copy what stays float and let go."""
    import gc

    from diffusers import UNet2DConditionModel

    folder = build_tiny_sd(tmp_path / "m", seed=1) / "unet"
    unet = UNet2DConditionModel.from_pretrained(folder)
    mapped = _mapped_ranges(folder)
    assert mapped and all(any(a <= p.data_ptr() < b for a, b in mapped) for p in unet.parameters())
    quantize_pipeline_components(unet, nn.Linear(1, 1), None, backend)
    gc.collect()
    assert _mapped_ranges(folder) == []
