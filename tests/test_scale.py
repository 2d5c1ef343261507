"""benchmarks.scale: the synthetic round is a real, accepted aggregate_round, and the table is what was measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.scale import MARGIN, MEMORY_FACTOR, adapter_bytes, adapter_layout, fits, main, scale_table, synthetic_updates


def test_three_tiny_sites_are_aggregated_and_reported(tmp_path: Path) -> None:
    state, groups = adapter_layout(preset="tiny")
    updates = synthetic_updates(state, groups, 3)
    assert [set(u.tensors) for u in updates] == [set(state)] * 3
    assert all(u.tensors[n].dtype == np.float32 and u.tensors[n].shape == state[n].shape for u in updates for n in state)
    assert not np.array_equal(updates[0].tensors[next(iter(state))], updates[1].tensors[next(iter(state))])

    result = scale_table(state, groups, [3], say=lambda _: None)
    (row,) = result["rows"]
    assert row["measured"] and row["seconds"] > 0 and row["peak_round_mib"] > 0
    assert row["bytes_up_float32"] == 3 * adapter_bytes(state) == 2 * row["bytes_up_float16"]
    assert row["held_updates_mib"] * 2**20 == row["bytes_up_float32"]

    assert main(["--out", str(tmp_path), "--sites", "3", "--preset", "tiny"]) == 0
    written = json.loads((tmp_path / "scale.json").read_text())
    assert [r["sites"] for r in written["rows"]] == [3] and written["preset"] == "tiny"


def test_an_n_that_does_not_fit_is_extrapolated_not_run() -> None:
    state, groups = adapter_layout(preset="tiny")
    one = adapter_bytes(state)
    available = int(40 * one * MEMORY_FACTOR / MARGIN)  # room for exactly 40 updates with the margin
    assert fits(40, one, available) and not fits(41, one, available)
    result = scale_table(state, groups, [2, 4, 1000], available=available, say=lambda _: None)
    by_n = {r["sites"]: r for r in result["rows"]}
    assert by_n[2]["measured"] and by_n[4]["measured"] and not by_n[1000]["measured"]
    slope = (by_n[4]["held_updates_mib"] - by_n[2]["held_updates_mib"]) / 2
    assert np.isclose(by_n[1000]["held_updates_mib"], by_n[4]["held_updates_mib"] + slope * 996)
