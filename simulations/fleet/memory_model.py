"""Predict a device configuration's peak memory, and plan each device from it.

Notation (MiB, one device task = load state, run the local ZO steps, evaluate, save):

    peak(plan) = fixed[bits, r] + item[bits, r] * items(plan)
    items(plan) = n + 1 if the n + 1 evaluations of a ZO step run as one batched forward, else 1

`fixed` holds the weights at `bits`, the cached latents, the personal state and the step's
constant buffers; `item` is the activation memory of one batch item of the UNet forward at
resolution scale r. The form follows how the step is built (common random numbers: the n + 1
evaluations differ only in the token row, method note section 2), and the two coefficients of each
(bits, r) are fitted from two measured peaks (1 and 2 batch items), so a planned n = 2 batched
step (3 items) is an extrapolation that the run then checks against the measured peak.

For real models the same form is filled from measured figures (SD1.5 at 512 px), which is how the
harness answers what each device profile could run with SD1.5.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from simulations.fleet.profiles import DeviceProfile
from simulations.fleet.scenario import PlannerConfig


@dataclass(frozen=True, order=True)
class DevicePlan:
    """The configuration one device runs: weight bits, RGE n, batched or sequential forwards,
    and the resolution as a fraction of the model's native one."""

    bits: int
    n: int
    batched: bool
    resolution_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.bits not in (32, 16, 8, 4):
            raise ValueError(f"plan bits must be 32, 16, 8 or 4, got {self.bits}")
        if self.n < 1:
            raise ValueError(f"plan n must be >= 1, got {self.n}")
        if not 0 < self.resolution_scale <= 1:
            raise ValueError(f"plan resolution_scale must be in (0, 1], got {self.resolution_scale}")

    @property
    def items(self) -> int:
        """Batch items of the largest forward the plan runs."""
        return self.n + 1 if self.batched else 1

    @property
    def forward_items_per_step(self) -> int:
        """Batch items computed per ZO step (n + 1 either way; batching changes only the peak)."""
        return self.n + 1

    @property
    def label(self) -> str:
        """Short text for tables, e.g. ``int8 n2 batched r1.0``."""
        bits = "fp32" if self.bits == 32 else ("bf16" if self.bits == 16 else f"int{self.bits}")
        mode = "batched" if self.batched else "sequential"
        return f"{bits} n{self.n} {mode} r{self.resolution_scale:g}"


@dataclass(frozen=True)
class MemoryModel:
    """Coefficients of the peak-memory model of one model on one software stack.

    Attributes
    ----------
    name
        What the coefficients describe, e.g. ``"embedded (calibrated)"``.
    fixed_mib
        ``{(bits, resolution_scale): MiB}``.
    item_mib
        ``{(bits, resolution_scale): MiB per batch item}``.
    """

    name: str
    fixed_mib: Mapping[tuple[int, float], float]
    item_mib: Mapping[tuple[int, float], float]

    def __post_init__(self) -> None:
        if set(self.fixed_mib) != set(self.item_mib):
            raise ValueError(f"memory model {self.name}: fixed and item coefficients cover different configs")
        if not self.fixed_mib:
            raise ValueError(f"memory model {self.name}: no coefficients")

    def supports(self, plan: DevicePlan) -> bool:
        """Whether the model has coefficients for the plan's (bits, resolution)."""
        return (plan.bits, plan.resolution_scale) in self.fixed_mib

    def predict_mib(self, plan: DevicePlan) -> float:
        """Predicted peak app memory of a device task under `plan`, MiB."""
        key = (plan.bits, plan.resolution_scale)
        if key not in self.fixed_mib:
            raise ValueError(f"memory model {self.name} has no coefficients for {plan.label}")
        return self.fixed_mib[key] + self.item_mib[key] * plan.items

    @classmethod
    def fit(cls, name: str, measured: Mapping[DevicePlan, float]) -> MemoryModel:
        """Least-squares fit of fixed + item * items for each (bits, resolution) from measured peaks.

        Raises
        ------
        ValueError
            If some (bits, resolution) has measurements at fewer than two distinct item counts.
        """
        groups: dict[tuple[int, float], list[tuple[int, float]]] = {}
        for plan, peak in measured.items():
            groups.setdefault((plan.bits, plan.resolution_scale), []).append((plan.items, peak))
        fixed: dict[tuple[int, float], float] = {}
        item: dict[tuple[int, float], float] = {}
        for key, points in groups.items():
            xs = [x for x, _ in points]
            if len(set(xs)) < 2:
                raise ValueError(f"memory model {name}: {key} needs peaks at two item counts, got {xs}")
            mx = sum(xs) / len(xs)
            my = sum(y for _, y in points) / len(points)
            slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
            # A negative slope is measurement noise (the allocator reused freed pages): clamp it so
            # that more items never predict less memory.
            item[key] = max(slope, 0.0)
            fixed[key] = my - item[key] * mx
        return cls(name=name, fixed_mib=fixed, item_mib=item)

    def to_json(self) -> dict[str, object]:
        """JSON-ready coefficients."""
        return {
            "name": self.name,
            "coefficients": [
                {"bits": b, "resolution_scale": r, "fixed_mib": self.fixed_mib[(b, r)], "item_mib": self.item_mib[(b, r)]}
                for b, r in sorted(self.fixed_mib)
            ],
        }


def candidate_plans(planner: PlannerConfig) -> list[DevicePlan]:
    """Every configuration the planner may choose, most preferred first.

    Preference: full resolution first (resolution costs fidelity most), then more weight bits
    (int8 is close to fp32, int4 loses some quality: method note section 1), then larger n (a
    better gradient estimate), then batched forwards (same result, faster, more memory).
    """
    plans = {
        DevicePlan(bits=b, n=n, batched=bt, resolution_scale=r)
        for b in planner.bits
        for n in planner.n
        for bt in planner.batched
        for r in planner.resolution_scale
    }
    return sorted(plans, key=lambda p: (-p.resolution_scale, -p.bits, -p.n, not p.batched))


def plan_device(
    budget_mib: float, planner: PlannerConfig, model: MemoryModel
) -> tuple[DevicePlan | None, float | None]:
    """The most preferred plan whose predicted peak fits ``budget * (1 - headroom)``.

    Returns
    -------
    (plan, predicted_mib), or (None, None) when no configuration fits: the device is excluded.
    """
    limit = budget_mib * (1.0 - planner.headroom)
    for plan in candidate_plans(planner):
        if model.supports(plan):
            predicted = model.predict_mib(plan)
            if predicted <= limit:
                return plan, predicted
    return None, None


# --- SD1.5 at 512 px -------------------------------------------------------------------------------

SD15_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "memory-sd15.json"

# Whole-process peaks measured on CPU with PyTorch at SD1.5 shapes, 512 px, batch 1, n = 2 batched
# (the project's notes, docs of the CPU stack): ZO forward-only step 185 MiB (3 items), backprop TI
# step 1539 MiB; process peak fp32 4438 (ZO) / 5791 (TI) MiB, int8 weights 1855 / 3392 MiB. int4 is
# the int8 figure minus the UNet's weight saving (int8 862 MB -> int4 486 MB, quanto, UNet only).
SD15_NOTES = {
    "zo_step_mib": 185.0,
    "zo_items": 3,
    "zo_peak_mib": {32: 4438.0, 8: 1855.0, 4: 1855.0 - (862.0 - 486.0) * 1e6 / 2**20},
    "ti_peak_mib": {32: 5791.0, 8: 3392.0},
}


def _sd15_figures() -> tuple[dict[str, object], str]:
    """The SD1.5 figures: the engine benchmark's JSON when it holds 512 px results, else the notes'."""
    if SD15_RESULTS.is_file():
        parsed = parse_memory_benchmark(json.loads(SD15_RESULTS.read_text()))
        if parsed is not None:
            return parsed, f"measured by benchmarks/memory.py ({SD15_RESULTS.name}, training peaks)"
    return dict(SD15_NOTES), "CPU measurements in the project's notes (memory-sd15.json absent)"


# benchmarks/memory.py configuration names -> (method, bits, batched)
_BENCH_CONFIGS = {
    "zo-fp32": ("zo", 32, True),
    "zo-int8": ("zo", 8, True),
    "zo-int4": ("zo", 4, True),
    "zo-int8-seq": ("zo", 8, False),
    "ti-fp32": ("ti", 32, True),
    "ti-int8": ("ti", 8, True),
}


def parse_memory_benchmark(payload: dict[str, object]) -> dict[str, object] | None:
    """Figures from `benchmarks/memory.py`'s JSON (None unless it ran at 512 px with ZO int8 batched).

    Uses each configuration's training peak (``train_peak_mib``: what a device holds while it
    trains, without the one-off quantization transient of loading). The per-item activation
    memory is the difference between the batched (n + 1 = 3 items) and the sequential (1 item)
    int8 runs when both exist, else the notes' figure.
    """
    settings = payload.get("settings")
    results = payload.get("results")
    if not isinstance(settings, dict) or settings.get("resolution") != 512 or not isinstance(results, list):
        return None
    zo: dict[int, float] = {}
    ti: dict[int, float] = {}
    seq: float | None = None
    for rec in results:
        if not isinstance(rec, dict) or rec.get("name") not in _BENCH_CONFIGS:
            continue
        method, bits, batched = _BENCH_CONFIGS[str(rec["name"])]
        peak = float(rec["train_peak_mib"])
        if method == "ti":
            ti[bits] = peak
        elif batched:
            zo[bits] = peak
        else:
            seq = peak
    if 8 not in zo:
        return None
    items = int(SD15_NOTES["zo_items"])  # type: ignore[arg-type]
    step = (zo[8] - seq) * items / (items - 1) if seq is not None and zo[8] > seq else SD15_NOTES["zo_step_mib"]
    return {"zo_step_mib": step, "zo_items": items, "zo_peak_mib": zo, "ti_peak_mib": ti or SD15_NOTES["ti_peak_mib"]}


def sd15_memory_model() -> tuple[MemoryModel, dict[int, float], str]:
    """Memory model of ZO on SD1.5 at 512 px, the backprop-TI peaks by bits, and the source."""
    fig, source = _sd15_figures()
    item = float(fig["zo_step_mib"]) / int(fig["zo_items"])  # type: ignore[arg-type]
    zo_peaks: dict[int, float] = fig["zo_peak_mib"]  # type: ignore[assignment]
    items = int(fig["zo_items"])  # type: ignore[arg-type]
    fixed = {(b, 1.0): peak - item * items for b, peak in zo_peaks.items()}
    return (
        MemoryModel(name="SD1.5 512px", fixed_mib=fixed, item_mib={k: item for k in fixed}),
        dict(fig["ti_peak_mib"]),  # type: ignore[arg-type]
        source,
    )


def sd15_table(profiles: Iterable[DeviceProfile], planner: PlannerConfig) -> tuple[list[dict[str, object]], str]:
    """What each profile could run with SD1.5 at 512 px (real budgets, no scaling).

    Returns one row per profile: the planned ZO configuration and its predicted peak (or None),
    whether ZO int8 and ZO int4 (n = 2, batched) fit, and whether backprop TI fits in fp32 / int8.
    """
    model, ti_peaks, source = sd15_memory_model()
    full_res = PlannerConfig(
        bits=tuple(b for b in planner.bits if model.supports(DevicePlan(b, 1, True))) or (8,),
        n=planner.n,
        batched=planner.batched,
        resolution_scale=(1.0,),
        headroom=planner.headroom,
    )
    rows: list[dict[str, object]] = []
    for prof in profiles:
        limit = prof.memory_budget_mib * (1 - planner.headroom)
        plan, predicted = plan_device(prof.memory_budget_mib, full_res, model)
        row: dict[str, object] = {
            "profile": prof.name,
            "budget_mib": prof.memory_budget_mib,
            "zo_plan": plan.label if plan else None,
            "zo_predicted_mib": predicted,
        }
        for bits in (8, 4):
            p = DevicePlan(bits=bits, n=2, batched=True)
            row[f"zo_int{bits}_mib"] = model.predict_mib(p) if model.supports(p) else None
            row[f"zo_int{bits}_fits"] = model.supports(p) and model.predict_mib(p) <= limit
        for bits, peak in sorted(ti_peaks.items(), reverse=True):
            name = "fp32" if bits == 32 else f"int{bits}"
            row[f"ti_{name}_mib"] = peak
            row[f"ti_{name}_fits"] = peak <= limit
        rows.append(row)
    return rows, source


def auto_memory_scale(sim_model: MemoryModel, plans: Sequence[DevicePlan] = (DevicePlan(8, 2, True),)) -> float:
    """Budget scale that makes the simulated model as tight on a device as SD1.5 at 512 px.

    The ratio of predicted peaks for the reference plan (int8, n = 2, batched, full resolution);
    when the simulated model has no int8 coefficients, its most compressed supported plan is used.
    """
    sd15, _, _ = sd15_memory_model()
    for plan in plans:
        if sim_model.supports(plan) and sd15.supports(plan):
            return sim_model.predict_mib(plan) / sd15.predict_mib(plan)
    common = sorted(k for k in sim_model.fixed_mib if k in sd15.fixed_mib)
    if not common:
        raise ValueError("memory-scale \"auto\": the simulated model and SD1.5 share no bits setting")
    bits, res = common[0]
    plan = DevicePlan(bits, 2, True, res)
    return sim_model.predict_mib(plan) / sd15.predict_mib(plan)
