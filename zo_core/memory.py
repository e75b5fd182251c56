"""Peak-memory meter for training phases: process resident memory on CPU, allocator peak on CUDA.

Why these sources (cpu-stack.md, "Measuring memory honestly on CPU"):

* On CPU, torch allocates through malloc, which tracemalloc does not see; the kernel's high-water
  mark of the resident set (``VmHWM`` in /proc/self/status) sees everything, including weights
  mapped from safetensors files once their pages are touched. Writing ``5`` to
  /proc/self/clear_refs resets that mark to the current resident size (Linux >= 4.0), which is
  what lets one process measure several phases. Where that file cannot be written, the meter falls
  back to ``getrusage(RUSAGE_SELF).ru_maxrss``, which never resets: it says so in ``resettable``
  and in every phase record, and a fresh subprocess per configuration is then the only honest way.
* glibc keeps freed small blocks inside the process; run measured processes with
  ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors return to the system and later phases do
  not inherit earlier ones' memory.
* On CUDA the meter reports torch's caching-allocator peak (``max_memory_allocated``), reset by
  ``reset_peak_memory_stats``: the tensors' bytes, not the driver context.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zo_core.quantize import storage_tensors

__all__ = ["MemoryMeter", "PhaseMemory", "materialize", "process_peak_mib", "read_status_mib", "reset_peak"]

MIB = 1024 * 1024


def read_status_mib(field: str, pid: int | str = "self") -> float:
    """A memory field (``VmRSS``, ``VmHWM``) of /proc/<pid>/status, in MiB (Linux)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # "VmHWM:   123456 kB"
    raise RuntimeError(f"/proc/{pid}/status has no {field} line")


def reset_peak() -> None:
    """Reset this process's VmHWM to its current VmRSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def process_peak_mib() -> float:
    """Peak resident memory of this process since it started (``ru_maxrss``; never reset)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


@dataclass(frozen=True)
class PhaseMemory:
    """Memory of one measured phase, in MiB.

    Attributes
    ----------
    start_mib : float
        Resident (CPU) or allocated (CUDA) memory when the phase began.
    peak_mib : float
        Highest value during the phase.
    end_mib : float
        Value when it ended.
    resettable : bool
        False when the peak could not be reset at the start (``ru_maxrss`` fallback): the peak is
        then the process peak so far, possibly reached before this phase.
    """

    start_mib: float
    peak_mib: float
    end_mib: float
    resettable: bool

    @property
    def rise_mib(self) -> float:
        """Peak above the starting level: what the phase itself needed."""
        return self.peak_mib - self.start_mib


class MemoryMeter:
    """Measure peak memory per named phase.

    Parameters
    ----------
    device : str or torch.device
        ``cpu`` (process resident memory) or a CUDA device (allocator statistics).
    proc_status, clear_refs : Path
        The procfs files read and written on CPU (parameters so tests can point them elsewhere).

    Examples
    --------
    >>> meter = MemoryMeter("cpu")
    >>> with meter.phase("step"):
    ...     run_one_step()
    >>> meter.phases["step"].peak_mib
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        proc_status: Path = Path("/proc/self/status"),
        clear_refs: Path = Path("/proc/self/clear_refs"),
    ) -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"MemoryMeter measures 'cpu' or 'cuda' devices, got {self.device}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"MemoryMeter device {self.device} requested but CUDA is not available"
            )
        self._status = proc_status
        self._clear_refs = clear_refs
        self.phases: dict[str, PhaseMemory] = {}
        self._open: list[list[float]] = []  # running peak of each open phase (for nesting)
        self.resettable = self.device.type == "cuda" or self._try_clear_refs()

    # -- raw readings ---------------------------------------------------------------------------

    def _proc_kib(self, key: str) -> float | None:
        try:
            text = self._status.read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])  # "VmHWM:   123456 kB"
        return None

    def _try_clear_refs(self) -> bool:
        if self._proc_kib("VmHWM") is None:
            return False
        try:
            self._clear_refs.write_text("5")
        except OSError:
            return False
        return True

    def _raw_peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        if self.resettable:
            kib = self._proc_kib("VmHWM")
            if kib is not None:
                return kib / 1024
        return process_peak_mib()

    # -- public API -----------------------------------------------------------------------------

    def current_mib(self) -> float:
        """Resident set size (CPU) or allocated tensor memory (CUDA) now, in MiB."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / MIB
        kib = self._proc_kib("VmRSS")
        if kib is None:
            raise RuntimeError(
                f"cannot read VmRSS from {self._status}; resident memory is unavailable"
            )
        return kib / 1024

    def peak_mib(self) -> float:
        """Peak since the last :meth:`reset` (or since process start without clear_refs), in MiB."""
        return self._raw_peak()

    def reset(self) -> None:
        """Start a new peak from the current level.

        Open phases keep the peak they have seen so far, so nested phases do not lose it.
        """
        peak = self._raw_peak()
        for running in self._open:
            running[0] = max(running[0], peak)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self.resettable = self._try_clear_refs()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the enclosed block and record it as ``self.phases[name]``.

        Raises
        ------
        ValueError
            If a phase of that name was already recorded (names must be unique per meter).
        """
        if not name:
            raise ValueError("phase name must not be empty")
        if name in self.phases:
            raise ValueError(f"phase {name!r} was already measured; use a new name")
        self.reset()
        start = self.current_mib()
        running = [start]
        self._open.append(running)
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._open.pop()
            peak = max(running[0], self._raw_peak())
            for outer in self._open:
                outer[0] = max(outer[0], peak)
            self.phases[name] = PhaseMemory(
                start_mib=start,
                peak_mib=peak,
                end_mib=self.current_mib(),
                resettable=self.resettable,
            )

    @property
    def peaks(self) -> dict[str, float]:
        """Peak MiB of every recorded phase, by name."""
        return {name: rec.peak_mib for name, rec in self.phases.items()}


def materialize(*modules: nn.Module | None) -> int:
    """Read every parameter and buffer once, so lazily mapped weights become resident.

    diffusers and transformers map safetensors files into memory; their pages are only read (and
    only then count as resident) when first used, which would make the first forward of a measured
    phase look like a huge allocation. Reading each tensor (one reduction per tensor, through
    quantized wrappers to their real int8 / packed storage) brings every page in before measuring.

    Returns
    -------
    int
        Bytes touched.
    """
    touched = 0
    seen: set[int] = set()
    with torch.no_grad():
        for module in modules:
            if module is None:
                continue
            for tensor in [*module.parameters(), *module.buffers()]:
                for leaf in storage_tensors(tensor):
                    if leaf.device.type == "meta" or leaf.data_ptr() in seen or leaf.numel() == 0:
                        continue
                    seen.add(leaf.data_ptr())
                    leaf.detach().reshape(-1).view(torch.uint8).sum()  # reads every byte
                    touched += leaf.numel() * leaf.element_size()
    return touched
