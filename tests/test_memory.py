"""The memory meter: phase peaks see a 200 MiB allocation, reset works, fallback is flagged.

Allocations are made with torch.ones (which writes every page, so it is resident) and are 200 MiB,
far above glibc's largest dynamic mmap threshold (32 MiB), so malloc serves them by mmap and
returns them to the system when freed: the tests do not depend on MALLOC_MMAP_THRESHOLD_.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from zo_core.memory import MemoryMeter, PhaseMemory, materialize
from zo_core.quantize import quantize_module

ALLOC_MIB = 200
# Allowance for the allocator's bookkeeping and pages other threads touch meanwhile.
TOLERANCE_MIB = 25


def _alloc(mib: int) -> torch.Tensor:
    return torch.ones(mib * 1024 * 1024 // 4, dtype=torch.float32)


def test_phase_peak_sees_the_allocation_and_reset_forgets_it() -> None:
    meter = MemoryMeter("cpu")
    assert meter.resettable, "clear_refs must be writable on Linux"
    with meter.phase("alloc"):
        big = _alloc(ALLOC_MIB)
        del big
    rec = meter.phases["alloc"]
    assert isinstance(rec, PhaseMemory) and rec.resettable
    assert abs(rec.rise_mib - ALLOC_MIB) < TOLERANCE_MIB
    assert rec.end_mib < rec.peak_mib - ALLOC_MIB + TOLERANCE_MIB  # freed memory went back

    # After reset, the peak is the current level again, not the earlier high-water mark.
    meter.reset()
    assert meter.peak_mib() < rec.peak_mib - ALLOC_MIB + TOLERANCE_MIB
    assert meter.peak_mib() >= meter.current_mib() - 1

    # A phase with no allocation has (almost) no rise, even after a big one.
    with meter.phase("idle"):
        pass
    assert meter.phases["idle"].rise_mib < TOLERANCE_MIB
    assert set(meter.peaks) == {"alloc", "idle"}


def test_nested_phase_keeps_the_outer_peak() -> None:
    meter = MemoryMeter("cpu")
    with meter.phase("outer"):
        with meter.phase("inner"):
            big = _alloc(ALLOC_MIB)
            del big
        small = _alloc(ALLOC_MIB // 4)
        del small
    outer, inner = meter.phases["outer"], meter.phases["inner"]
    assert abs(inner.rise_mib - ALLOC_MIB) < TOLERANCE_MIB
    assert outer.peak_mib >= inner.peak_mib  # the inner reset did not erase the outer peak


def test_phase_names_are_unique_and_non_empty() -> None:
    meter = MemoryMeter("cpu")
    with meter.phase("a"):
        pass
    with pytest.raises(ValueError, match="already measured"), meter.phase("a"):
        pass
    with pytest.raises(ValueError, match="must not be empty"), meter.phase(""):
        pass


def test_without_clear_refs_falls_back_to_ru_maxrss_and_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir" / "clear_refs"
    meter = MemoryMeter("cpu", clear_refs=missing)
    assert not meter.resettable
    with meter.phase("p"):
        pass
    rec = meter.phases["p"]
    assert not rec.resettable
    # ru_maxrss is the process peak so far: never below the current resident size.
    assert rec.peak_mib >= rec.end_mib - 1


def test_bad_devices_are_rejected() -> None:
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        MemoryMeter("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            MemoryMeter("cuda")


def test_materialize_touches_every_byte_once_including_quantized_storage() -> None:
    model = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 64))
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert materialize(model) == float_bytes
    assert materialize(model, model) == float_bytes  # shared tensors are read once
    quantize_module(model, "quanto-int8")
    # int8 data + fp32 per-row scale + fp32 bias + two fp32 scalar buffers per layer.
    expected = (256 * 128 + 128 * 4 + 128 * 4 + 8) + (128 * 64 + 64 * 4 + 64 * 4 + 8)
    assert materialize(model, None) == expected


@pytest.mark.slow
def test_memory_benchmark_runs_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    """The benchmark driver: one subprocess per configuration, JSON + markdown report."""
    import json
    import subprocess
    import sys

    from zo_core.model_factory import build_tiny_sd

    repo = Path(__file__).resolve().parents[1]
    model = build_tiny_sd(tmp_path / "tiny", seed=0)
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        str(repo / "benchmarks" / "memory.py"),
        "--model-dir",
        str(model),
        "--resolution",
        "64",
        "--configs",
        "zo-int8,ti-fp32",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--out-dir",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((out / "memory-sd15.json").read_text())
    runs = {r["name"]: r for r in payload["results"]}
    assert set(runs) == {"zo-int8", "ti-fp32"}
    for r in runs.values():
        assert r["peak_resettable"]
        assert r["train_peak_mib"] >= r["runtime_baseline_mib"] > 100  # torch alone is > 100 MiB
        assert r["floor_mib"] == pytest.approx(
            r["runtime_baseline_mib"] + r["weights_mib"] + r["one_forward_activations_mib"]
        )
        assert r["s_per_step"] > 0 and len(r["losses"]) == 1
    assert (
        runs["zo-int8"]["forward_passes_per_step"] == 3
        and runs["ti-fp32"]["forward_passes_per_step"] == 1
    )
    assert runs["zo-int8"]["weights_mib"] < runs["ti-fp32"]["weights_mib"] / 2
    table = (out / "memory-sd15.md").read_text()
    assert (
        "| (c) ZO n=2, quanto int8" in table
        and "ZO int8 (n + 1 forwards batched) peak / backprop TI fp32 peak" in table
    )


def test_memory_benchmark_rejects_bad_flags() -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    script = str(repo / "benchmarks" / "memory.py")
    bad = subprocess.run(
        [sys.executable, script, "--configs", "zo-int8,zo-int9"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "unknown configuration(s) ['zo-int9']" in bad.stderr
    bad = subprocess.run(
        [sys.executable, script, "--resolution", "100"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "multiple of 64" in bad.stderr
