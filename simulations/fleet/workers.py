"""Worker subprocesses that hold the model once and run device tasks under a memory cap.

Why subprocesses with a resident-memory watchdog (and not the alternatives):

- Ray's ``memory`` resource only schedules; it caps nothing (Flower notes, "Simulation").
- ``RLIMIT_AS`` limits *address space*, not resident memory: PyTorch and its libraries map
  gigabytes they never touch, so a realistic budget would fail at import, and an allocation that
  crosses the limit raises inside the app (MemoryError) instead of killing it as a phone's OS does.
  It also cannot follow a different budget per device in a long-lived process.
- cgroups would be exact but need privileges that a user's laptop or CI does not grant.

So each worker is a long-lived process (the model is loaded once per worker and weight setting,
not once per device and round) with a watchdog thread that, while a device task runs, reads the
process's resident memory (``VmRSS`` in /proc/self/status) every few milliseconds and, when the
device's *app memory* (resident memory minus the worker's runtime baseline measured before any
model was loaded) exceeds the device's budget, reports it and kills the process with SIGKILL -
exactly what Android's low-memory killer or iOS jetsam do. A spike shorter than the polling period
is still caught afterwards: the peak (``VmHWM``, reset before each task through
/proc/self/clear_refs) is checked against the cap before the result is accepted. The harness
then starts a fresh worker; the killed device's state is untouched because tasks run on a staging
copy of the state (see `runner`).

We run our own small pool instead of `concurrent.futures.ProcessPoolExecutor` because that pool
breaks as a whole when one worker is killed and exposes neither the workers' pids nor a way to
route tasks to the worker that already holds the right model.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Literal

from simulations.fleet.backend import DeviceTask, InjectedCrash, TaskResult
from zo_core.memory import read_status_mib, reset_peak

Status = Literal["ok", "oom", "crash", "error"]


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc `malloc_trim`).

    Between device tasks, so that one device's freed activations do not count towards the next
    device's peak. (Forcing every large allocation through mmap with MALLOC_MMAP_THRESHOLD_ would
    do the same, but it made each ZO step about 25% slower here.)
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: freed pages stay with the allocator and peaks are conservative
        pass


@dataclass(frozen=True)
class Job:
    """A device task and the app-memory cap it runs under (MiB; ``inf`` for no cap)."""

    task: DeviceTask
    cap_mib: float


@dataclass(frozen=True)
class Outcome:
    """How a job ended.

    Attributes
    ----------
    status
        ``ok``; ``oom`` (killed over its cap, or its measured peak exceeded it); ``crash`` (an
        injected crash); ``error`` (any other exception, or the worker died).
    result
        The task's result when ``ok``.
    peak_mib
        Measured peak app memory (for ``oom`` killed by the watchdog: the resident memory seen).
    wall_s
        Wall time on this machine.
    message
        Error text for reports.
    """

    status: Status
    result: TaskResult | None
    peak_mib: float | None
    wall_s: float
    message: str = ""


class _Watchdog(threading.Thread):
    """Kills the process when resident memory exceeds the armed limit (see the module docstring)."""

    def __init__(self, conn: Connection, lock: threading.Lock, baseline_mib: float, poll_s: float) -> None:
        super().__init__(daemon=True)
        self.conn, self.lock, self.baseline, self.poll_s = conn, lock, baseline_mib, poll_s
        self.cap_mib: float | None = None
        self.armed = threading.Event()

    def arm(self, cap_mib: float) -> None:
        self.cap_mib = cap_mib
        self.armed.set()

    def disarm(self) -> None:
        self.armed.clear()

    def check(self) -> None:
        """Kill the process now if the armed cap is exceeded."""
        cap = self.cap_mib
        app = read_status_mib("VmRSS") - self.baseline
        if cap is not None and self.armed.is_set() and app > cap:
            with self.lock:
                self.conn.send(("oom", app))
            os.kill(os.getpid(), signal.SIGKILL)

    def run(self) -> None:
        while True:
            self.armed.wait()
            self.check()
            time.sleep(self.poll_s)


def _worker_main(conn: Connection, factory: str, kwargs: dict[str, Any], poll_s: float) -> None:
    """Body of a worker process: build the backend, then run tasks until told to stop."""
    module_name, _, attr = factory.partition(":")
    backend = getattr(importlib.import_module(module_name), attr)(**kwargs)
    baseline = read_status_mib("VmRSS")
    lock = threading.Lock()
    dog = _Watchdog(conn, lock, baseline, poll_s)
    dog.start()
    conn.send(("ready", baseline))
    while True:
        job: Job | None = conn.recv()
        if job is None:
            return
        if job.task.fresh_start:
            backend.forget(job.task.device_id)
        backend.load(job.task.plan.bits)  # outside the device's window: a phone ships its weights ready
        release_memory()
        reset_peak()
        dog.arm(job.cap_mib)
        dog.check()  # a device whose model alone exceeds its cap dies before it starts, deterministically
        t0 = time.perf_counter()
        status: Status = "ok"
        result: TaskResult | None = None
        message = ""
        try:
            result = backend.run(job.task)
        except InjectedCrash as exc:
            status, message = "crash", str(exc)
        except Exception:  # any other failure is the device's error, reported, never fatal
            status, message = "error", traceback.format_exc(limit=6)
        finally:
            dog.disarm()
        wall = time.perf_counter() - t0
        peak = read_status_mib("VmHWM") - baseline
        if status == "ok" and result is not None and job.task.round > 0 and peak <= job.cap_mib:
            # The simulation's fidelity oracle runs after the device's memory window: it is the
            # harness's measurement, not the device's work.
            try:
                result = dataclasses.replace(result, fidelity=float(backend.evaluate(job.task)))
            except Exception:
                status, result, message = "error", None, "fidelity evaluation failed:\n" + traceback.format_exc(limit=6)
        with lock:
            conn.send(("done", status, result, peak, wall, message))
        if job.task.device_id >= 0 and status != "ok":
            backend.forget(job.task.device_id)


class _Worker:
    def __init__(self, ctx: Any, factory: str, kwargs: dict[str, Any], poll_s: float) -> None:
        parent, child = ctx.Pipe()
        self.conn: Connection = parent
        # One thread per worker: the pool is the parallelism (more threads than cores only contend).
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.proc = ctx.Process(target=_worker_main, args=(child, factory, kwargs, poll_s), daemon=True)
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        try:
            tag, self.baseline_mib = self.conn.recv()
        except EOFError:
            self.proc.join(timeout=10)
            raise RuntimeError(
                f"worker process failed to start (exit code {self.proc.exitcode}); see its traceback above"
            ) from None
        if tag != "ready":
            raise RuntimeError(f"worker failed to start: {tag}")
        self.bits: int | None = None
        self.job: Job | None = None
        self.index = -1
        self.started = 0.0

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class WorkerPool:
    """A bounded pool of worker processes running device jobs under memory caps.

    Parameters
    ----------
    factory
        ``"module:callable"`` that builds the backend inside each worker.
    factory_kwargs
        Keyword arguments of the factory (picklable).
    size
        Number of workers (concurrency); at most the CPU cores are useful.
    poll_s
        Watchdog polling period.
    task_timeout_s
        Wall seconds after which a hung task's worker is killed (recorded as ``error``).
    """

    def __init__(
        self,
        factory: str,
        factory_kwargs: dict[str, Any] | None = None,
        size: int = 1,
        *,
        poll_s: float = 0.005,
        task_timeout_s: float = 1800.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"worker pool size must be >= 1, got {size}")
        if ":" not in factory:
            raise ValueError(f"backend factory must be 'module:callable', got {factory!r}")
        self.factory, self.kwargs, self.poll_s = factory, dict(factory_kwargs or {}), poll_s
        self.task_timeout_s = task_timeout_s
        self._ctx = mp.get_context("spawn")
        self.workers = [self._spawn() for _ in range(size)]
        self.restarts = 0

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.factory, self.kwargs, self.poll_s)

    @property
    def baseline_mib(self) -> float:
        """Runtime baseline of the first worker (interpreter + libraries, before any model)."""
        return self.workers[0].baseline_mib

    def run(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Run `jobs` on the pool; returns one `Outcome` per job, in order.

        Jobs are grouped by weight bits and a free worker prefers a job whose bits it already
        holds, so that each worker switches models as rarely as possible.
        """
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i].task.plan.bits)
        pending: deque[int] = deque(order)
        outcomes: list[Outcome | None] = [None] * len(jobs)
        busy: list[_Worker] = []
        while pending or busy:
            for w in self.workers:
                if w.job is None and pending:
                    pick = next((i for i in pending if jobs[i].task.plan.bits == w.bits), pending[0])
                    pending.remove(pick)
                    w.job, w.index, w.started, w.bits = jobs[pick], pick, time.perf_counter(), jobs[pick].task.plan.bits
                    w.conn.send(w.job)
                    busy.append(w)
            wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=1.0)
            for w in list(busy):
                outcome = self._collect(w)
                if outcome is None:
                    continue
                outcomes[w.index] = outcome
                busy.remove(w)
                if outcome.status == "oom" or not w.proc.is_alive():
                    self._replace(w)
                else:
                    w.job = None
        return [o for o in outcomes if o is not None]

    def _collect(self, w: _Worker) -> Outcome | None:
        """The outcome of `w`'s job if it has ended, else None."""
        assert w.job is not None
        elapsed = time.perf_counter() - w.started
        if w.conn.poll():
            try:
                msg = w.conn.recv()
            except EOFError:
                msg = None
            if msg is not None and msg[0] == "oom":
                w.proc.join(timeout=10)
                return Outcome("oom", None, float(msg[1]), elapsed, f"killed over its {w.job.cap_mib:.1f} MiB cap")
            if msg is not None and msg[0] == "done":
                _, status, result, peak, wall, message = msg
                if peak > w.job.cap_mib:
                    # A spike between two watchdog polls: the OS would have killed the app before
                    # it finished, crashed or failed, so that is what the device suffered.
                    return Outcome("oom", None, peak, wall, f"peak {peak:.1f} MiB over its {w.job.cap_mib:.1f} MiB cap")
                return Outcome(status, result, peak, wall, message)
        if not w.proc.is_alive():
            return Outcome("error", None, None, elapsed, f"worker died (exit code {w.proc.exitcode})")
        if elapsed > self.task_timeout_s:
            w.proc.kill()
            w.proc.join()
            return Outcome("error", None, None, elapsed, f"worker killed: task exceeded {self.task_timeout_s:.0f} s")
        return None

    def _replace(self, w: _Worker) -> None:
        w.close()
        self.restarts += 1
        self.workers[self.workers.index(w)] = self._spawn()

    def close(self) -> None:
        """Stop every worker."""
        for w in self.workers:
            w.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
