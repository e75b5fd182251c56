"""Memory caps: the memory model, the planner, and enforcement in the worker pool."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from simulations.fleet.backend import DeviceTask
from simulations.fleet.memory_model import DevicePlan, MemoryModel, candidate_plans, plan_device, sd15_table
from simulations.fleet.profiles import load_profiles
from simulations.fleet.scenario import PlannerConfig
from simulations.fleet.workers import Job, WorkerPool

FAKE = "simulations.fleet.fake_backend:make_fake_backend"
# Stand-in model: fp32 weights 40 MiB, 10 MiB per batch item -> fp32 n2 batched ~ 70 MiB.
FAKE_KW = {"weights_mib_fp32": 40.0, "item_mib": 10.0}


def _task(tmp: Path, i: int, plan: DevicePlan, *, steps: int = 4) -> DeviceTask:
    state = tmp / f"state-{i}"
    state.mkdir(parents=True, exist_ok=True)
    return DeviceTask(device_id=i, round=1, plan=plan, state_dir=str(state), data_dir=str(tmp), concept=i,
                      broadcast={}, seed=i, local_steps=steps)


def test_memory_model_fit_recovers_a_line_and_plans_by_preference() -> None:
    measured = {DevicePlan(32, 1, False): 50.0, DevicePlan(32, 1, True): 60.0,
                DevicePlan(8, 1, False): 20.0, DevicePlan(8, 1, True): 30.0}
    model = MemoryModel.fit("t", measured)
    assert model.predict_mib(DevicePlan(32, 2, True)) == pytest.approx(70.0)
    assert model.predict_mib(DevicePlan(8, 3, True)) == pytest.approx(50.0)
    planner = PlannerConfig(bits=(32, 8), n=(2, 1), batched=(True, False), resolution_scale=(1.0,), headroom=0.0)
    assert plan_device(100, planner, model)[0] == DevicePlan(32, 2, True)
    assert plan_device(65, planner, model)[0] == DevicePlan(32, 2, False)  # n before batching: 50 MiB
    assert plan_device(45, planner, model)[0] == DevicePlan(8, 2, True)  # 40 MiB
    assert plan_device(25, planner, model)[0] == DevicePlan(8, 2, False)  # sequential: 20 MiB
    assert plan_device(19, planner, model) == (None, None)  # nothing fits: excluded
    order = candidate_plans(planner)
    assert order[0] == DevicePlan(32, 2, True) and order[-1] == DevicePlan(8, 1, False)


def test_memory_model_rejects_a_single_item_count() -> None:
    with pytest.raises(ValueError, match="two item counts"):
        MemoryModel.fit("t", {DevicePlan(8, 1, False): 1.0, DevicePlan(8, 2, False): 1.0})


def test_sd15_table_orders_profiles_by_budget() -> None:
    rows, source = sd15_table(load_profiles().values(), PlannerConfig())
    by = {r["profile"]: r for r in rows}
    assert source
    assert by["mid-range-phone"]["zo_int8_fits"] and not by["mid-range-phone"]["ti_fp32_fits"]
    assert by["jetson-edge-box"]["zo_plan"] is not None
    # Backprop TI needs more than ZO at the same bits, on every profile.
    assert all(r["ti_int8_mib"] > r["zo_int8_mib"] for r in rows)  # type: ignore[operator]


def test_device_over_its_budget_is_killed_and_the_others_go_on(tmp_path: Path) -> None:
    plan = DevicePlan(32, 2, True)  # needs ~70 MiB
    jobs = [Job(_task(tmp_path, 0, plan), math.inf), Job(_task(tmp_path, 1, plan), 30.0),
            Job(_task(tmp_path, 2, DevicePlan(8, 2, True)), math.inf), Job(_task(tmp_path, 3, plan), math.inf)]
    with WorkerPool(FAKE, FAKE_KW, 2) as pool:
        outcomes = pool.run(jobs)
        assert [o.status for o in outcomes] == ["ok", "oom", "ok", "ok"]
        assert outcomes[1].result is None and outcomes[1].peak_mib is not None and outcomes[1].peak_mib > 30.0
        assert pool.restarts == 1  # the killed worker was replaced ...
        again = pool.run([Job(_task(tmp_path, 4, plan), math.inf)])  # ... and the pool still works
        assert again[0].status == "ok"
    # The measured peaks follow the memory shape of the stand-in: 40 + 3 * 10 vs 10 + 3 * 10 MiB.
    assert outcomes[0].peak_mib == pytest.approx(70.0, abs=4.0)
    assert outcomes[2].peak_mib == pytest.approx(40.0, abs=4.0)
    assert not (tmp_path / "state-1" / "theta.npy").exists()  # killed before it saved anything


def test_a_spike_between_watchdog_polls_is_still_out_of_memory(tmp_path: Path) -> None:
    # A 60 s polling period: the watchdog never looks during the task; the VmHWM check must catch it.
    with WorkerPool(FAKE, FAKE_KW, 1, poll_s=60.0) as pool:
        out = pool.run([Job(_task(tmp_path, 0, DevicePlan(32, 2, True)), 50.0)])
    assert out[0].status == "oom" and "peak" in out[0].message and out[0].result is None


def test_sd15_figures_are_read_from_the_memory_benchmark_format() -> None:
    from simulations.fleet.memory_model import parse_memory_benchmark

    payload = {"settings": {"resolution": 512}, "results": [
        {"name": "zo-int8", "train_peak_mib": 1900.0}, {"name": "zo-int8-seq", "train_peak_mib": 1780.0},
        {"name": "zo-int4", "train_peak_mib": 1500.0}, {"name": "ti-fp32", "train_peak_mib": 5800.0},
        {"name": "ti-int8", "train_peak_mib": 3400.0}]}
    fig = parse_memory_benchmark(payload)
    assert fig is not None
    # 3 batched items vs 1: two items cost 120 MiB, so the whole 3-item step is 180 MiB.
    assert fig["zo_step_mib"] == pytest.approx(180.0)
    assert fig["zo_peak_mib"] == {8: 1900.0, 4: 1500.0} and fig["ti_peak_mib"] == {32: 5800.0, 8: 3400.0}
    assert parse_memory_benchmark({**payload, "settings": {"resolution": 256}}) is None
