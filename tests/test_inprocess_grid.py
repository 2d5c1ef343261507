"""The in-process grid's workers (sites side by side in threads) and how a run's time is read from them."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from server.report import overhead_share
from simulation.inprocess import InProcessGrid
from simulation.simulate import default_site_workers


def test_default_site_workers_follow_the_machine_not_the_federation() -> None:
    assert default_site_workers(3, cores=2, gpu=False) == 3  # an odd site count still fills both cores
    assert default_site_workers(64, cores=2, gpu=False) == 4  # memory bounded by the machine
    assert default_site_workers(1, cores=16, gpu=False) == 1
    assert default_site_workers(8, cores=16, gpu=True) == 1  # sites take turns on the GPU


def test_a_grid_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1"):
        InProcessGrid(None, [{}], workers=0)


def _messages(grid: InProcessGrid, nodes: list[int]) -> list[Message]:
    return [grid.create_message(RecordDict({"config": ConfigRecord({"n": n})}), "train", n, "1") for n in nodes]


def test_nodes_keep_their_worker_and_get_their_own_replies() -> None:
    spans: dict[int, list[tuple[float, float]]] = {}

    def app(msg: Message, context: Context) -> Message:
        start = time.perf_counter()
        time.sleep(0.05)  # long enough for the other worker to start
        spans.setdefault(context.node_id, []).append((start, time.perf_counter()))
        if context.node_id == 4:
            raise RuntimeError("site 4 is down")
        return Message(RecordDict({"config": ConfigRecord({"from": context.node_id})}), reply_to=msg)

    grid = InProcessGrid(app, [{}] * 5, workers=2)
    grid.disconnected = {5}
    assert [grid.worker_of(n) for n in (1, 2, 3, 4)] == [0, 1, 0, 1]
    for _ in range(2):
        sent = _messages(grid, [1, 2, 3, 4, 5])
        replies = grid.send_and_receive(sent)
        assert [r.metadata.reply_to_message_id for r in replies] == [m.metadata.message_id for m in sent[:4]]
        assert [r.content["config"]["from"] for r in replies[:3]] == [1, 2, 3]
        assert replies[3].has_error() and "site 4 is down" in replies[3].error.reason
    for (s1, e1), (s2, e2), (s3, _) in zip(spans[1], spans[2], spans[3]):
        assert s2 < e1 and s1 < e2  # nodes 1 and 2 (two workers) ran at once
        assert s3 >= e1  # node 3 waited for node 1, its worker's first site
    assert 5 not in spans
    assert len(grid.transcript) == 10 and grid.transcript[4].reply is None


def _round(sites: list[tuple[int, float, float]]) -> dict:
    return {"phase": "adapt", "round": 1, "train_wall_seconds": 10.0, "aggregation_seconds": 0.1,
            "sites": [{"node_id": n, "train_seconds": t, "setup_seconds": s} for n, t, s in sites]}


def test_time_outside_local_training_counts_the_busiest_worker() -> None:
    rounds = [_round([(1, 3.0, 0.5), (2, 4.0, 0.2), (3, 5.0, 0.5)])]
    serial = overhead_share({"run": {}, "rounds": rounds})
    assert serial["local_training_seconds"] == pytest.approx(12.0) and serial["overhead_share"] == 0.0
    two = overhead_share({"run": {"site_workers": 2}, "rounds": rounds})  # nodes 1 and 3 share worker 0
    assert two["local_training_seconds"] == pytest.approx(8.0) and two["site_setup_seconds"] == pytest.approx(1.0)
    assert two["overhead_share"] == pytest.approx(0.2)
    three = overhead_share({"run": {"site_workers": 3}, "rounds": rounds})
    assert three["local_training_seconds"] == pytest.approx(5.0) and three["overhead_share"] == pytest.approx(0.5)
