"""Helpers shared by the pooling benchmarks (``robust_pooling.py``, ``consumption.py``).

The benchmark data (``outlier_data``), the declared pooling layer built directly from
:mod:`declopt.penalties` (``declared_pool``), the process settings that make CPU timings
repeatable (``keep_freed_memory``, ``prefault_heap``) and three memory measures:
``TensorPeak`` (peak bytes of live torch tensors during a call), ``ResidentPeak`` (growth of the
process's resident set) and ``saved_bytes`` (what autograd keeps for backward).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported in the functions: robust_pooling.py configures
    from torch import Tensor  # TorchInductor's cache through the environment before it loads

PENALTIES = ["quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic"]
NONCONVEX = ("welsch", "truncated_quadratic")
CHANNELS = 128


def outlier_data(batch: int, channels: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``x: (batch, channels, n)`` standard normal with 10% of entries multiplied by 10 (the
    outliers robust pooling is for), and a fixed upstream gradient ``v: (batch, channels)``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, n, generator=gen)
    outliers = torch.rand(batch, channels, n, generator=gen) < 0.1
    x = torch.where(outliers, 10 * x, x)
    v = torch.randn(batch, channels, generator=gen)
    return x, v


class DeclaredPool:
    """``x (..., n) -> (...)`` through a declared ``dl.Layer`` (kept as ``.layer``)."""

    def __init__(self, layer: Callable[..., tuple[Tensor, ...]]) -> None:
        self.layer = layer

    def __call__(self, x: Tensor) -> Tensor:
        (out,) = self.layer(x)
        return out


def declared_pool(
    penalty: str, n: int, alpha: float = 1.0, starts: bool | None = None, **options: object
) -> DeclaredPool:
    """``x (..., n) -> (...)``: ``argmin_y sum_i phi(y - x_i; alpha)`` declared in CVXPY with
    :mod:`declopt.penalties` and solved by ``dl.Layer(..., backend="torch")``, the generic path
    (``RobustPool`` replaces its forward by an exact 1-D solver).

    ``starts`` (default: for the nonconvex penalties) gives the layer the mean and the median as
    initializers; the torch backend solves from each of them and from zero and keeps the lowest
    objective. ``options`` go to the backend (e.g. ``method="lbfgs"``).
    """
    import cvxpy as cp

    import declopt as dl

    x, y = cp.Parameter(n, name="x"), cp.Variable(name="y")
    phi = dl.penalties.get(penalty)
    problem = cp.Problem(cp.Minimize(cp.sum(phi(y - x, alpha))))
    if starts is None:
        starts = penalty in NONCONVEX
    initializers = [_mean_start, _median_start] if starts else []
    return DeclaredPool(
        dl.Layer(problem, [x], [y], backend="torch", initializers=initializers, **options)
    )


def _mean_start(x: Tensor) -> Tensor:
    return x.mean(-1)


def _median_start(x: Tensor) -> Tensor:
    return x.median(-1).values


# ------------------------------------------------------------------------------------------------
# Process settings


def keep_freed_memory() -> None:
    """glibc malloc: keep freed memory for reuse instead of returning it to the system.

    A long-running training process gets there by itself (glibc raises its thresholds as large
    blocks are freed); a fresh benchmark process would otherwise time page faults of new
    allocations, which made the mean-pooling baseline vary by 2-3x between processes.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)  # a C int


def prefault_heap(size: int = 1 << 29) -> None:
    """Grow the heap by ``size`` touched bytes and free them (kept, see keep_freed_memory).

    Without it, the first few dozen calls after the heap was trimmed (or in a fresh process) pay
    page faults for their new blocks: about 1.5 ms of system time for mean pooling's 4 MB
    gradient at batch 8, n = 1024, twice its computation.
    """
    import torch

    block = torch.ones(size // 4)
    del block


# ------------------------------------------------------------------------------------------------
# Memory


class TensorPeak:
    """Peak bytes of torch tensors allocated, and still alive, at any moment during a call.

    On CUDA: ``torch.cuda.max_memory_allocated`` after resetting it, minus the allocation before.
    On CPU torch keeps no allocator statistics, and ``tracemalloc`` does not see its allocations
    (they bypass Python's allocator), so the call runs under ``torch.profiler`` with
    ``profile_memory=True``: the CPU allocator then reports every allocation and every free of a
    block allocated during the call as a ``[memory]`` event with a signed size; the peak is the
    largest running sum of those events in time order. Tensors that existed before the call (the
    input) are not counted, nor are their frees; NumPy arrays are not torch allocations and are
    not counted either (``ResidentPeak`` sees them). ``None`` where the profiler gives no events.
    """

    def measure(self, fn: Callable[[], object], device: str = "cpu") -> int | None:
        import torch

        if device.startswith("cuda"):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - before)
        from torch.profiler import ProfilerActivity, profile

        with (
            _quiet_stderr(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            fn()
        try:  # the raw event stream (FunctionEvents attribute memory to ops, not to time)
            events = prof.profiler.kineto_results.events()
        except AttributeError:
            return None
        sizes = [
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ]
        total = peak = 0
        for _, nbytes in sorted(sizes):
            total += nbytes
            peak = max(peak, total)
        return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null: Kineto prints two log lines per profiling session from
    C++, which no logging setting silences; Python exceptions still surface after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class ResidentPeak:
    """Growth of the resident set during a call (Linux ``/proc``; ``None`` elsewhere)."""

    def __init__(self) -> None:
        self.ok = Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()
        try:
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def measure(self, fn: Callable[[], object]) -> float | None:
        if not self.ok:
            return None
        try:
            if self.libc is not None:
                self.libc.malloc_trim(0)
            before = self._status("VmRSS:")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            fn()
            return max(0, self._status("VmHWM:") - before)
        except OSError:
            self.ok = False
            return None


def saved_bytes(fn: Callable[[], object], exclude: list[Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward during ``fn()`` (unique storages)."""
    import torch

    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
