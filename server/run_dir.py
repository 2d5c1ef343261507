"""The run folder: what a federated run leaves behind, and how to read it back
(the report written into it is :mod:`server.report`).

::

    RUN/
      run.json                       settings of the run (model spec, seed, rounds, sites...)
      federation/                    the phantom federation `pemma simulate` writes when given no site YAML
      backbone.safetensors           the frozen CT backbone (pretrain-ct result or --backbone-file)
      pretrain/round-<n>.safetensors CT backbone after pretraining round n
      adapters/round-<n>.safetensors global adapters after adapt round n (round-0: initial),
                                     then, numbered on, after each prognosis round (the same
                                     adapters + survival head / EHR encoder; metadata also
                                     holds the EHR preprocessor, ``pemma.ehr_preprocessor``);
                                     metadata: fingerprint, spec, groups, provenance
                                     (phase, round, participating sites)
      server-optimizer/round-<n>.safetensors
                                     FedAdam / FedYogi moments after adapt round n (the last two
                                     rounds; only with server-optimizer), read back by --resume
      metrics.json                   {"run": {...}, "pretrain_rounds": [...], "rounds": [...]}
      report.md                      summary, Dice-per-round plot, a prediction overlay
      plots/dice.png, plots/overlay.png

A round is *finished* once its checkpoint file exists and its entry is in
``metrics.json`` (written in that order); ``--resume`` continues after the last finished
round of each phase.

Each item of ``rounds`` (and ``pretrain_rounds``) holds ``phase``, ``round``,
``wall_seconds`` (train + evaluate), ``train_wall_seconds`` (sending the global
tensors to collecting every reply; aggregation not included), ``aggregation_seconds``,
``aggregated``, ``note``, ``contributors`` (group -> sites aggregated) and ``sites``: one
entry per site with ``name``, ``status`` (ok / clipped / rejected / failed), ``reason``,
``clip_factor`` (clipped), ``bytes_up``, ``bytes_down``, ``train_seconds``,
``setup_seconds``, ``loss``, ``examples`` (per group) and ``dice`` (per evaluated mode),
and in ``prognosis`` rounds (in ``rounds`` too, ``phase: "prognosis"``) ``c_index`` (the
site's held-out split, where it could be computed).

``run.segments`` lists the process runs that made the run, one per start or ``--resume``
(:meth:`RunDir.start_segment`, :meth:`RunDir.finish_segment`)::

    {"started": ISO time, "wall_seconds": s, "resumed_after": {phase: last finished round} | null,
     "ended": "finished" | "interrupted"}

A segment reads ``interrupted`` until it is finished; its ``wall_seconds`` is refreshed
with every round it records, so an interrupted one keeps its time up to its last round.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

PHASE_LISTS = {"pretrain-ct": "pretrain_rounds", "adapt": "rounds", "prognosis": "rounds"}  # in run order
FINISHED, INTERRUPTED = "finished", "interrupted"


def _phase_of(record: Mapping[str, Any], key: str) -> str:
    return str(record.get("phase") or ("pretrain-ct" if key == "pretrain_rounds" else "adapt"))


def phase_rounds(metrics: Mapping[str, Any], phase: str) -> list[dict[str, Any]]:
    """The ``metrics.json`` entries of one phase (adapt and prognosis share ``rounds``)."""
    key = PHASE_LISTS[phase]
    return [r for r in metrics.get(key, []) if _phase_of(r, key) == phase]


def run_segments(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run's segments (``run.segments``), each with ``ended`` (a segment never finished reads
    ``interrupted``), ``wall_seconds`` and ``resumed_after``; empty for a run recorded without them."""
    out = []
    for segment in metrics.get("run", {}).get("segments", []):
        ended = segment.get("ended")
        out.append({**segment, "wall_seconds": float(segment.get("wall_seconds") or 0.0),
                    "resumed_after": segment.get("resumed_after") or None,
                    "ended": FINISHED if ended == FINISHED else INTERRUPTED})
    return out


def dice_metrics(eval_metrics: Mapping[str, Any]) -> dict[str, float]:
    """The ``dice-<mode>`` entries of a round's ``eval_metrics`` (which also hold the
    aggregated Dice, HD95 and surface Dice under their own prefixes)."""
    return {k: float(v) for k, v in eval_metrics.items() if k.startswith("dice-")}


def round_dice(eval_metrics: Mapping[str, Any]) -> dict[str, float]:
    """Mode -> mean Dice of a round's ``eval_metrics``."""
    return {k.removeprefix("dice-"): v for k, v in dice_metrics(eval_metrics).items()}


def total_wall_seconds(metrics: Mapping[str, Any]) -> float:
    """Wall time of the whole run: the sum over its segments (a run recorded without segments: its
    ``wall_seconds``, else 0)."""
    segments = run_segments(metrics)
    if segments:
        return sum(s["wall_seconds"] for s in segments)
    return float(metrics.get("run", {}).get("wall_seconds") or 0.0)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _refresh_segment(info: dict[str, Any]) -> None:
    """The current (last) segment's ``wall_seconds``: now minus its start."""
    segments = info.get("segments") or []
    if segments and segments[-1].get("ended") != FINISHED and segments[-1].get("started"):
        started = datetime.fromisoformat(segments[-1]["started"])
        segments[-1]["wall_seconds"] = round(max(0.0, (_now() - started).total_seconds()), 3)


class RunDir:
    """Paths and small readers/writers of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()

    # ------------------------------------------------------------ paths
    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_json(self) -> Path:
        return self.path / "metrics.json"

    @property
    def backbone_file(self) -> Path:
        return self.path / "backbone.safetensors"

    @property
    def federation_dir(self) -> Path:
        return self.path / "federation"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def checkpoint(self, phase: str, round_: int) -> Path:
        folder = "pretrain" if phase == "pretrain-ct" else "adapters"
        return self.path / folder / f"round-{round_}.safetensors"

    def server_optimizer_file(self, round_: int) -> Path:
        return self.path / "server-optimizer" / f"round-{round_}.safetensors"

    def checkpoints(self, phase: str) -> dict[int, Path]:
        """Checkpoint files of ``phase`` by round. ``adapters/`` holds adapt and prognosis
        rounds: a file is prognosis's once ``metrics.json`` records its round as such."""
        folder = self.path / ("pretrain" if phase == "pretrain-ct" else "adapters")
        out: dict[int, Path] = {}
        for file in folder.glob("round-*.safetensors"):
            match = re.fullmatch(r"round-(\d+)\.safetensors", file.name)
            if match:
                out[int(match.group(1))] = file
        if phase != "pretrain-ct":
            prognosis = {r["round"] for r in phase_rounds(self.metrics(), "prognosis")}
            out = {n: f for n, f in out.items() if (n in prognosis) == (phase == "prognosis")}
        return dict(sorted(out.items()))

    # ------------------------------------------------------------ json
    def read_json(self, path: Path, default: Any) -> Any:
        if not path.exists():
            return default
        return json.loads(path.read_text(encoding="utf-8"))

    def write_json(self, path: Path, data: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def metrics(self) -> dict[str, Any]:
        data = self.read_json(self.metrics_json, {})
        data.setdefault("run", {})
        data.setdefault("pretrain_rounds", [])
        data.setdefault("rounds", [])
        return data

    def record_round(self, record: Mapping[str, Any]) -> None:
        """Add (or replace) one round's entry in ``metrics.json``."""
        data = self.metrics()
        items = [r for r in data[PHASE_LISTS[record["phase"]]] if r["round"] != record["round"]]  # one entry per round number
        items.append(dict(record))
        data[PHASE_LISTS[record["phase"]]] = sorted(items, key=lambda r: r["round"])
        _refresh_segment(data["run"])
        self.write_json(self.metrics_json, data)

    def update_run_info(self, **info: Any) -> None:
        data = self.metrics()
        data["run"].update(info)
        self.write_json(self.metrics_json, data)

    def start_segment(self, resumed_after: Mapping[str, int] | None = None) -> None:
        """Open a segment (at the start of the run, or of a resume: ``resumed_after`` is then
        :meth:`finished_rounds`, read before anything is forgotten). It reads ``interrupted``
        until :meth:`finish_segment`."""
        data = self.metrics()
        segments = data["run"].setdefault("segments", [])
        segments.append({"started": _now().isoformat(timespec="milliseconds"), "wall_seconds": 0.0,
                         "resumed_after": dict(resumed_after) if resumed_after is not None else None,
                         "ended": INTERRUPTED})
        self.write_json(self.metrics_json, data)

    def finish_segment(self) -> None:
        """Close the current segment: its final ``wall_seconds``, ``ended: finished``."""
        data = self.metrics()
        segments = data["run"].get("segments") or []
        if not segments:
            raise RuntimeError(f"{self.metrics_json}: no run segment to finish (start_segment was not called)")
        _refresh_segment(data["run"])
        segments[-1]["ended"] = FINISHED
        self.write_json(self.metrics_json, data)

    def finished_rounds(self) -> dict[str, int]:
        """Last finished round of each phase that has one, in run order (what a resume continues after)."""
        rounds = {phase: self.last_finished_round(phase) for phase in PHASE_LISTS}
        return {phase: n for phase, n in rounds.items() if n > 0}

    def last_finished_round(self, phase: str) -> int:
        """Highest round with both its checkpoint and its metrics entry (0 if none; adapt
        round 0 is the initial adapters, which need no metrics entry)."""
        recorded = {r["round"] for r in phase_rounds(self.metrics(), phase)}
        files = self.checkpoints(phase)
        done = [n for n in files if n in recorded]
        return max(done, default=0)

    def forget_after(self, phase: str, round_: int) -> None:
        """Drop entries and checkpoints of ``phase`` after ``round_`` (an interrupted round)."""
        files = self.checkpoints(phase)
        data = self.metrics()
        key = PHASE_LISTS[phase]
        data[key] = [r for r in data[key] if r["round"] <= round_ or _phase_of(r, key) != phase]
        self.write_json(self.metrics_json, data)
        for n, file in files.items():
            if n > round_:
                file.unlink()

    def forget_phase(self, phase: str) -> None:
        """Drop every entry and checkpoint of ``phase`` (prognosis reruns after adapt)."""
        self.forget_after(phase, -1)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = ["FINISHED", "INTERRUPTED", "PHASE_LISTS", "RunDir", "dice_metrics", "phase_rounds", "round_dice", "run_segments",
           "total_wall_seconds"]
