"""How many intra-op threads a CPU run asks PyTorch for on a machine that other jobs share.

PyTorch's OpenMP threads meet after every parallel kernel and spin while they wait. When
another job keeps one of the cores busy, the thread that shares that core arrives late at
every meeting, and a kernel can take many times longer than on one thread alone
(BENCHMARKS.md, "Threads on a shared machine"). So a CPU run asks for no more threads than
the cores other jobs leave idle, judged by the load average when it starts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["available_cores", "fitting_threads", "threads_for_load", "threads_for_this_machine"]


def available_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_for_load(threads: int, cores: int, load: float) -> int:
    """At most ``threads``, and no more than the ``cores`` that a 1-minute load average of
    ``load`` leaves idle; at least one."""
    return max(1, min(int(threads), int(cores) - int(load)))


def fitting_threads(device: str = "cpu") -> tuple[int, str | None]:
    """(intra-op threads for a run on ``device``, why they are fewer than now or None).

    On a CPU device, :func:`threads_for_load` of the current count, this process's cores and
    the 1-minute load average. ``OMP_NUM_THREADS`` in the environment is a choice already
    made and is left alone (a run's last digits depend on its thread count: that is how to pin
    them)."""
    now = torch.get_num_threads()
    if not str(device).startswith("cpu") or os.environ.get("OMP_NUM_THREADS") or not hasattr(os, "getloadavg"):
        return now, None
    load, cores = os.getloadavg()[0], available_cores()
    wanted = threads_for_load(now, cores, load)
    if wanted >= now:
        return now, None
    return wanted, f"{wanted} intra-op thread(s): load average {load:.1f} on {cores} cores"


@contextlib.contextmanager
def threads_for_this_machine(device: str = "cpu") -> Iterator[str | None]:
    """PyTorch's intra-op threads set to :func:`fitting_threads` for the block; yields why they
    were cut (None: left as they were) and restores them after."""
    before = torch.get_num_threads()
    wanted, why = fitting_threads(device)
    if why is None:
        yield None
        return
    torch.set_num_threads(wanted)
    try:
        yield why
    finally:
        torch.set_num_threads(before)
