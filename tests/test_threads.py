"""A CPU run asks PyTorch for no more intra-op threads than the cores other jobs leave idle."""

from __future__ import annotations

import pytest
import torch

from pemma_core.training import threads
from pemma_core.training.threads import threads_for_load, threads_for_this_machine


@pytest.mark.parametrize(("wanted", "cores", "load", "expected"), [
    (2, 2, 0.3, 2),    # an idle machine: as many as asked
    (2, 2, 1.2, 1),    # one core busy elsewhere
    (2, 2, 7.5, 1),    # every core busy: still one
    (16, 16, 3.7, 13),
    (4, 16, 1.0, 4),   # never more than asked
])
def test_threads_fit_the_cores_that_other_jobs_leave_idle(wanted, cores, load, expected):
    assert threads_for_load(wanted, cores, load) == expected


def test_a_busy_machine_cuts_the_threads_for_the_block_only(monkeypatch: pytest.MonkeyPatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "available_cores", lambda: 2)
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.4, 1.0, 0.5))
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        with threads_for_this_machine("cpu") as cut:
            assert torch.get_num_threads() == 1
            assert cut == "1 intra-op thread(s): load average 1.4 on 2 cores"
        assert torch.get_num_threads() == 2
        with threads_for_this_machine("cuda") as cut:  # a GPU run's CPU threads are left alone
            assert cut is None and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own choice stands
        with threads_for_this_machine("cpu") as cut:
            assert cut is None and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0.1, 0.1))
        with threads_for_this_machine("cpu") as cut:
            assert cut is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
