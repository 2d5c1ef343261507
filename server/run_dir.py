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
      metrics.json                   {"run": {...}, "pretrain_rounds": [...], "rounds": [...]}
      report.md                      summary, Dice-per-round plot, a prediction overlay
      plots/dice.png, plots/overlay.png

A round is *finished* once its checkpoint file exists and its entry is in
``metrics.json`` (written in that order); ``--resume`` continues after the last finished
round of each phase.

Each item of ``rounds`` (and ``pretrain_rounds``) holds ``phase``, ``round``,
``wall_seconds`` (train + evaluate), ``train_wall_seconds`` (sending the global
tensors to collecting every reply, aggregation included), ``aggregation_seconds``,
``aggregated``, ``note`` and ``sites``: one entry per site with ``name``, ``status``
(ok / rejected / failed), ``reason``, ``bytes_up``, ``bytes_down``, ``train_seconds``,
``setup_seconds``, ``loss``, ``examples`` (per group) and ``dice`` (per evaluated mode),
and in ``prognosis`` rounds (in ``rounds`` too, ``phase: "prognosis"``) ``c_index`` (the
site's held-out split, where it could be computed).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

PHASE_LISTS = {"pretrain-ct": "pretrain_rounds", "adapt": "rounds", "prognosis": "rounds"}


def _phase_of(record: Mapping[str, Any], key: str) -> str:
    return str(record.get("phase") or ("pretrain-ct" if key == "pretrain_rounds" else "adapt"))


def phase_rounds(metrics: Mapping[str, Any], phase: str) -> list[dict[str, Any]]:
    """The ``metrics.json`` entries of one phase (adapt and prognosis share ``rounds``)."""
    key = PHASE_LISTS[phase]
    return [r for r in metrics.get(key, []) if _phase_of(r, key) == phase]


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
        self.write_json(self.metrics_json, data)

    def update_run_info(self, **info: Any) -> None:
        data = self.metrics()
        data["run"].update(info)
        self.write_json(self.metrics_json, data)

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


__all__ = ["PHASE_LISTS", "RunDir", "phase_rounds"]
