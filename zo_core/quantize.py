"""Weight quantization backends for the three Stable Diffusion components, chosen by name.

The paper (ZOODiP, CVPR 2025; notes/method.md section 1) quantizes the weights of every Linear and Conv2d of UNet,
VAE and text encoder to symmetric int8 with optimum-quanto; activations stay in floating point, and
embedding tables and norms are left alone. That is ``quanto-int8`` here. The other backends:

=============  ===================================  =================================================
backend        UNet                                 text encoder and VAE
=============  ===================================  =================================================
none           float (frozen)                       float (frozen)
quanto-int8    int8 weights, Linear + Conv2d        int8 weights, Linear + Conv2d
quanto-int4    4-bit weights (group 128 where the   int8 weights, Linear + Conv2d
               input width allows), Linear + Conv2d
bnb-int8       LLM.int8 Linear (Conv2d stays float) LLM.int8 Linear (Conv2d stays float)
bnb-nf4        NF4 Linear (Conv2d stays float)      LLM.int8 Linear (Conv2d stays float)
=============  ===================================  =================================================

Why the 4-bit backends keep the text encoder (and VAE) at 8 bits: the paper's 4-bit variant quantizes
the UNet only. The UNet holds 80% of the weights (859.5 M of 1066 M parameters at SD1.5 shapes), so
4 bits there buys almost all of the saving, while the text encoder lies on the learned token's own
path: every zeroth-order step measures a loss difference caused by a perturbation of size mu = 1e-3
on the token, and that difference travels through the text encoder first. Its int8 error (about 0.4%
per layer) is small against that signal; 4-bit error (about 7% per layer) is not. The VAE is used once
per image to cache latents, so its precision costs nothing per step; int8 keeps its memory down while
it is loaded.

bitsandbytes has no convolution layers, so its backends quantize nn.Linear only (about 31% of the
SD1.5 UNet's weights); the report shows how much stays float. LLM.int8 also quantizes activations to
int8 inside each matmul (outlier columns above the threshold stay 16-bit), unlike quanto's weight-only
scheme. On CUDA the standard bitsandbytes path is a ``quantization_config`` at load time
(:func:`bnb_quantization_config`); :func:`quantize_pipeline_components` swaps already loaded layers,
which works on CPU and CUDA alike.

All backends freeze every parameter (``requires_grad=False``): textual inversion learns only the
placeholder rows, which the engine splices into the text encoder's embedding OUTPUT with a forward
hook, so the input embedding table stays float and unquantized. Quantized layers of both libraries
pass gradients to their inputs (tested), so a backprop baseline can train the token through them.

Quantizing also copies the tensors that stay float (biases, norms, the embedding table) out of the
memory-mapped checkpoint file, so the float file is unmapped instead of staying resident beside the
quantized weights (see ``_own_float_storage``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from zo_core.config import QUANT_BACKENDS, QuantBackend

__all__ = [
    "QUANT_BACKENDS",
    "ComponentQuant",
    "QuantReport",
    "bnb_quantization_config",
    "component_schemes",
    "quantize_component",
    "quantize_module",
    "quantize_pipeline_components",
    "storage_tensors",
    "weight_bytes",
]

Scheme = Literal["float", "quanto-int8", "quanto-int4", "bnb-int8", "bnb-nf4"]
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "vae")

# LLM.int8's outlier threshold: activation columns with any |value| above it are multiplied in 16 bit.
# 6.0 is the LLM.int8() paper's choice (Dettmers et al. 2022) and transformers' default.
BNB_INT8_THRESHOLD = 6.0
# NF4 block size: one absmax scale per 64 weights, bitsandbytes' and transformers' default.
BNB_4BIT_BLOCKSIZE = 64


def component_schemes(backend: str) -> dict[str, Scheme]:
    """Map a backend name to the scheme applied to each component (see the module table).

    Raises
    ------
    ValueError
        If `backend` is not one of :data:`QUANT_BACKENDS`.
    """
    _check_backend(backend)
    eight: dict[str, Scheme] = {
        "none": "float",
        "quanto-int8": "quanto-int8",
        "quanto-int4": "quanto-int8",
        "bnb-int8": "bnb-int8",
        "bnb-nf4": "bnb-int8",
    }
    unet: dict[str, Scheme] = {
        "none": "float",
        "quanto-int8": "quanto-int8",
        "quanto-int4": "quanto-int4",
        "bnb-int8": "bnb-int8",
        "bnb-nf4": "bnb-nf4",
    }
    return {"unet": unet[backend], "text_encoder": eight[backend], "vae": eight[backend]}


def _check_backend(backend: str) -> None:
    if backend not in QUANT_BACKENDS:
        raise ValueError(
            f"quantization backend must be one of {list(QUANT_BACKENDS)}, got {backend!r}"
        )


# --------------------------------------------------------------------------------------------------
# Honest byte counting
# --------------------------------------------------------------------------------------------------


def storage_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that really hold `t`'s bytes.

    quanto's quantized weights are tensor subclasses that wrap inner tensors (int8 data + scale, or a
    PackedTensor of two 4-bit values per byte + scale + shift); their reported shape and dtype are the
    float weight's, so ``numel() * element_size()`` would count them as float. Recurse into the
    wrapped tensors instead (torch's own traceable-subclass protocol).
    """
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from storage_tensors(getattr(t, name))
    else:
        yield t


def _bnb_extra_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Quantization state bitsandbytes keeps outside parameters and buffers."""
    weight = getattr(module, "weight", None)
    for holder in (weight, getattr(module, "state", None)):  # Int8Params / MatmulLtState
        for attr in ("CB", "SCB"):
            value = getattr(holder, attr, None)
            if isinstance(value, torch.Tensor):
                yield value
    qs = getattr(
        weight, "quant_state", None
    )  # Params4bit's QuantState (absmax, code, nested stats)
    while qs is not None:
        for attr in ("absmax", "code", "offset"):
            value = getattr(qs, attr, None)
            if isinstance(value, torch.Tensor):
                yield value
        qs = getattr(qs, "state2", None)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of storage held by `module`'s parameters, buffers and quantization state.

    Counts what is really allocated: quanto's int8 / packed int4 data and its scales and shifts,
    bitsandbytes' int8 / NF4 data and its absmax statistics; tensors shared between modules (tied
    weights, bitsandbytes' CB alias of the int8 weight) are counted once.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for sub in module.modules():
        tensors: list[torch.Tensor] = [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]
        tensors.extend(_bnb_extra_tensors(sub))
        for tensor in tensors:
            for leaf in storage_tensors(tensor):
                if leaf.device.type == "meta":
                    continue
                key = (leaf.data_ptr(), leaf.untyped_storage().nbytes())
                if key in seen:
                    continue
                seen.add(key)
                total += leaf.numel() * leaf.element_size()
    return total


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentQuant:
    """What quantization did to one component.

    Attributes
    ----------
    name : str
        ``unet``, ``text_encoder`` or ``vae``.
    scheme : str
        The scheme applied (``float`` when left unquantized).
    bytes_before, bytes_after : int
        :func:`weight_bytes` before and after.
    layers_quantized : int
        Linear / Conv2d layers whose weights are now quantized.
    layers_float : int
        Linear / Conv2d layers left in floating point (bitsandbytes cannot quantize Conv2d).
    """

    name: str
    scheme: str
    bytes_before: int
    bytes_after: int
    layers_quantized: int
    layers_float: int


@dataclass(frozen=True)
class QuantReport:
    """Per-component and total weight bytes of one quantization (see :func:`weight_bytes`)."""

    backend: str
    components: tuple[ComponentQuant, ...]

    def __post_init__(self) -> None:
        _check_backend(self.backend)
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"component names must be unique, got {names}")

    @property
    def total_before(self) -> int:
        return sum(c.bytes_before for c in self.components)

    @property
    def total_after(self) -> int:
        return sum(c.bytes_after for c in self.components)

    @property
    def layers_quantized(self) -> int:
        return sum(c.layers_quantized for c in self.components)

    def component(self, name: str) -> ComponentQuant:
        """The entry of one component; ValueError naming the known ones if absent."""
        for comp in self.components:
            if comp.name == name:
                return comp
        raise ValueError(
            f"no component {name!r} in this report; have {[c.name for c in self.components]}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for benchmark records and run logs)."""
        return {
            "backend": self.backend,
            "components": [asdict(c) for c in self.components],
            "total_before": self.total_before,
            "total_after": self.total_after,
            "layers_quantized": self.layers_quantized,
        }


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------


def _is_quantized_layer(module: nn.Module) -> bool:
    from optimum.quanto.nn import QModuleMixin

    if isinstance(module, QModuleMixin):
        return module.weight_qtype is not None
    bnb = sys.modules.get("bitsandbytes")  # not imported yet: no bitsandbytes layer can exist
    if bnb is None:
        return False
    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def _count_layers(module: nn.Module) -> tuple[int, int]:
    quantized = floating = 0
    for sub in module.modules():
        if _is_quantized_layer(sub):
            quantized += 1
        elif isinstance(sub, (nn.Linear, nn.Conv2d)):
            floating += 1
    return quantized, floating


def _quanto(module: nn.Module, bits: Literal[8, 4]) -> None:
    from optimum.quanto import freeze, qint4, qint8, quantize

    # quanto maps nn.Linear -> QLinear and nn.Conv2d -> QConv2d; with weights only (no activation
    # qtype) it leaves LayerNorm, GroupNorm and nn.Embedding untouched, as the paper does.
    quantize(module, weights=qint8 if bits == 8 else qint4)
    freeze(module)  # replace the float weights by their quantized tensors (frees the float copies)


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, child)


def _bnb(module: nn.Module, kind: Literal["int8", "nf4"]) -> None:
    import bitsandbytes as bnb

    # bitsandbytes quantizes a layer when its float weight moves from CPU to a device (`.to(dev)`),
    # so each nn.Linear is rebuilt as a bnb layer on the meta device (no throw-away init), given
    # the float weight on CPU, and moved to where the original lived; that is its documented recipe
    # ("load_state_dict, then .to(device)") without a second copy of the weights.
    targets = [
        (name, sub)
        for name, sub in module.named_modules()
        if isinstance(sub, nn.Linear)
        and not isinstance(sub, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    ]
    for name, lin in targets:
        device, dtype = lin.weight.device, lin.weight.dtype
        has_bias = lin.bias is not None
        q: nn.Module
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(
                lin.in_features,
                lin.out_features,
                bias=has_bias,
                has_fp16_weights=False,
                threshold=BNB_INT8_THRESHOLD,
                device="meta",
            )
            q.weight = bnb.nn.Int8Params(
                lin.weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=False
            )
        else:
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=has_bias,
                compute_dtype=dtype,
                compress_statistics=False,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.detach().to("cpu"),
                requires_grad=False,
                blocksize=BNB_4BIT_BLOCKSIZE,
                compress_statistics=False,
                quant_type="nf4",
                module=q,
            )
            # On CPUs with AVX512-BF16, Linear4bit repacks its weight in place for a fused kernel on
            # the first eval-mode, no-grad forward. That path asserts shape divisibility (fails on
            # layers whose width is not a multiple of its block, e.g. 48 outputs) and leaves a
            # weight a later grad-enabled forward cannot use (cpu-stack.md). The plain
            # dequantize-then-matmul path works for every shape and passes input gradients.
            q.support_avx512bf16_for_cpu = False
        if has_bias:
            q.bias = nn.Parameter(lin.bias.detach().to("cpu"), requires_grad=False)
        q = q.to(device)  # quantization happens here (bitsandbytes' API)
        _set_child(module, name, q)


def _own_float_storage(module: nn.Module) -> None:
    """Copy the tensors quantization left in float (biases, norms, embeddings) into own memory.

    diffusers and transformers load safetensors through a memory map; a float tensor from it is a
    view into the whole file's mapping, and the mapping stays (with every page quantization read
    still resident) as long as ANY such view lives. Without this copy, a quantized SD1.5 UNet keeps
    its 3.3 GiB float file resident beside its 0.8 GiB of int8 weights (measured: RSS 4.6 GiB vs
    1.4 GiB after the copy). Copying the small float remainder releases the file.
    """
    seen: set[int] = set()
    for tensor in [*module.parameters(), *module.buffers()]:
        # plain float / int tensors only: quantized ones (tensor subclasses) are fresh allocations
        if type(tensor) in (nn.Parameter, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            tensor.data = tensor.data.clone()  # same object (hooks, identity kept), own storage


def quantize_module(module: nn.Module, scheme: Scheme) -> tuple[int, int]:
    """Quantize one model in place with `scheme` and freeze all its parameters.

    Parameters
    ----------
    module : nn.Module
        A UNet, VAE or text encoder (any nn.Module).
    scheme : str
        ``float``, ``quanto-int8``, ``quanto-int4``, ``bnb-int8`` or ``bnb-nf4``.

    Returns
    -------
    tuple of int
        (layers quantized, Linear/Conv2d layers left float).
    """
    if scheme == "quanto-int8":
        _quanto(module, 8)
    elif scheme == "quanto-int4":
        _quanto(module, 4)
    elif scheme == "bnb-int8":
        _bnb(module, "int8")
    elif scheme == "bnb-nf4":
        _bnb(module, "nf4")
    elif scheme != "float":
        raise ValueError(
            f"scheme must be one of ['float', 'quanto-int8', 'quanto-int4', 'bnb-int8', 'bnb-nf4'], got {scheme!r}"
        )
    if scheme != "float":
        _own_float_storage(module)
    # Freeze everything: quanto's freeze() wraps quantized weights in fresh nn.Parameters, which
    # default to requires_grad=True and would make autograd keep weight gradients it never needs.
    for param in module.parameters():
        param.requires_grad_(False)
    return _count_layers(module)


def quantize_component(name: str, module: nn.Module, backend: QuantBackend | str) -> ComponentQuant:
    """Quantize one named component (``unet``, ``text_encoder`` or ``vae``) with the backend's scheme.

    Lets a caller quantize each model as soon as it is loaded, so two float models are never
    resident at once (the load peak of SD1.5 is the float UNet plus the float text encoder otherwise).
    """
    schemes = component_schemes(backend)
    if name not in schemes:
        raise ValueError(f"component must be one of {list(schemes)}, got {name!r}")
    before = weight_bytes(module)
    quantized, floating = quantize_module(module, schemes[name])
    return ComponentQuant(
        name=name,
        scheme=schemes[name],
        bytes_before=before,
        bytes_after=weight_bytes(module),
        layers_quantized=quantized,
        layers_float=floating,
    )


def quantize_pipeline_components(
    unet: nn.Module, text_encoder: nn.Module, vae: nn.Module | None, backend: QuantBackend | str
) -> QuantReport:
    """Quantize the loaded components in place with the named backend; freeze every weight.

    Parameters
    ----------
    unet, text_encoder : nn.Module
        The diffusers UNet and the transformers text encoder.
    vae : nn.Module or None
        The VAE; None when the engine has already cached latents and dropped it.
    backend : str
        One of :data:`QUANT_BACKENDS` (see the module docstring for what each does).

    Returns
    -------
    QuantReport
        Weight bytes before and after per component, and layer counts.

    Raises
    ------
    ValueError
        On an unknown backend name (the message lists the choices).
    """
    schemes = component_schemes(backend)
    embedding = (
        text_encoder.get_input_embeddings()
        if hasattr(text_encoder, "get_input_embeddings")
        else None
    )
    parts = [
        quantize_component(name, module, backend)
        for name, module in (("unet", unet), ("text_encoder", text_encoder), ("vae", vae))
        if module is not None
    ]
    if embedding is not None and embedding is not text_encoder.get_input_embeddings():
        raise RuntimeError(
            "quantization replaced the text encoder's input embedding table; it must stay float"
        )
    return QuantReport(backend=backend, components=tuple(parts))


def bnb_quantization_config(
    backend: QuantBackend | str,
    component: str,
    library: Literal["diffusers", "transformers"],
    compute_dtype: torch.dtype = torch.float16,
) -> Any:
    """The bitsandbytes ``quantization_config`` to pass to ``from_pretrained`` on CUDA.

    Loading with this config is the standard, memory-lean path on a GPU (the float weights never
    sit in GPU memory). diffusers refuses it without a GPU, so on CPU use
    :func:`quantize_pipeline_components` instead.

    Parameters
    ----------
    backend : str
        ``bnb-int8`` or ``bnb-nf4``.
    component : str
        ``unet``, ``text_encoder`` or ``vae`` (decides int8 vs NF4 as in the module table).
    library : str
        ``diffusers`` for UNet / VAE, ``transformers`` for the text encoder.
    compute_dtype : torch.dtype
        NF4 matmul dtype.
    """
    _check_backend(backend)
    if not backend.startswith("bnb-"):
        raise ValueError(
            f"bnb_quantization_config needs a bitsandbytes backend (bnb-int8, bnb-nf4), got {backend!r}"
        )
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {list(COMPONENTS)}, got {component!r}")
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig
    elif library == "transformers":
        from transformers import BitsAndBytesConfig  # type: ignore[assignment]
    else:
        raise ValueError(f"library must be 'diffusers' or 'transformers', got {library!r}")
    if component_schemes(backend)[component] == "bnb-nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=BNB_INT8_THRESHOLD)
