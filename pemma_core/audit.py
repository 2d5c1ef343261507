"""A site's own log of what it sent, and ``pemma audit SITE.yaml`` to read it.

Hospital IT must be able to answer "what did we send?" without trusting the server. Each
site appends one JSON line per reply it sends to ``<cache_dir>/audit.jsonl``
(:func:`record`)::

    {"time": "2025-06-01T10:00:00.123Z",      # UTC, when the reply was logged
     "site": "site-1", "run_id": 7,           # run_id: Flower's, or null
     "message_type": "train", "phase": "adapt", "round": 3,    # phase/round: null for queries
     "tensors": [{"name", "shape", "dtype", "bytes"}, ...], "bytes": 123456,  # as sent (wire dtype)
     "metrics": {"loss": 0.31, ...},          # every value as sent, lists as lists
     "meta": {"site": ..., "fingerprint": ..., "ehr-stats": "<the JSON text sent>"},
     "error": null}                           # or the text of an error reply

Values JSON cannot hold are written so that every line stays valid JSON: a NaN or infinite
number as the string ``"nan"``, ``"inf"`` or ``"-inf"``; numpy scalars as numbers; anything
else JSON has no form for as its ``repr`` (so an odd value never stops the log).

Appends from several processes do not interleave: each entry is one ``write`` of one line
to a file opened for appending (``O_APPEND``), then flushed to disk (``fsync``).
:func:`read_audit` reads a log cut by a crash: a line it cannot read is reported, the
others are kept. Framework-free: numpy only (``pemma audit --help`` stays instant).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pemma_core.protocol import Reply

__all__ = ["AUDIT_FILE", "add_arguments", "audit_path", "read_audit", "record", "run", "summarise"]

AUDIT_FILE = "audit.jsonl"
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}  # how a NaN / infinite number is written


def audit_path(cache_dir: Path) -> Path:
    """The audit log of the site whose cache folder is ``cache_dir``."""
    return Path(cache_dir) / AUDIT_FILE


# ----------------------------------------------------------------------------- writing


def _plain(value: Any) -> Any:
    """``value`` as something ``json.dumps(allow_nan=False)`` writes: see the module docstring."""
    if isinstance(value, np.generic):
        value = value.item()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def _tensor(name: str, value: Any) -> dict[str, Any]:
    try:
        array = np.asarray(value)
        return {"name": str(name), "shape": list(array.shape), "dtype": str(array.dtype), "bytes": int(array.nbytes)}
    except Exception:  # an object numpy cannot read: logged, never a reason to fail the reply
        return {"name": str(name), "shape": _plain(getattr(value, "shape", None)), "dtype": type(value).__name__,
                "bytes": 0}


def record(
    cache_dir: Path,
    *,
    site: str,
    message_type: str,
    phase: str | None,
    round: int | None,  # noqa: A002 (the protocol's name for it)
    reply: Reply | None,
    error: str | None = None,
    run_id: int | None = None,
) -> dict[str, Any]:
    """Append one entry (the module docstring's form) for a reply ``site`` sends; returns the entry.

    ``reply`` is what leaves the site (tensors in their wire dtype), or ``None`` for an
    error reply, whose text is ``error``. Folders are created. An odd value never raises;
    an unwritable log does (``OSError``), so a site cannot send without its record.
    """
    tensors = [_tensor(name, value) for name, value in (reply.arrays.items() if reply is not None else ())]
    entry = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "site": _plain(site),
        "run_id": _plain(run_id),
        "message_type": _plain(message_type),
        "phase": _plain(phase),
        "round": _plain(round),
        "tensors": tensors,
        "bytes": sum(t["bytes"] for t in tensors),
        "metrics": _plain(dict(reply.metrics)) if reply is not None else {},
        "meta": _plain(dict(reply.meta)) if reply is not None else {},
        "error": None if error is None else str(error),
    }
    line = (json.dumps(entry, allow_nan=False, default=repr) + "\n").encode("utf-8")  # no raw newline inside
    path = audit_path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unbuffered: the line goes to the kernel in one write(), so concurrent appends stay whole lines.
    with open(path, "ab", buffering=0) as log:
        written = log.write(line)
        while written is not None and written < len(line):  # a short write (rare): finish the line
            written += log.write(line[written:])
        os.fsync(log.fileno())
    return entry


# ----------------------------------------------------------------------------- reading


def read_audit(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(entries, problems) of the log at ``path``: one problem per line that is not a JSON object.

    Blank lines are skipped; a last line without its newline (a crash while writing) is
    reported like any other unreadable line. A missing file raises ``FileNotFoundError``.
    """
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cut = number == len(lines)  # the text did not end with a newline
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"line {number}: not JSON" + (" (cut short: the last line has no newline)" if cut else ""))
            continue
        if not isinstance(entry, dict):
            problems.append(f"line {number}: not a JSON object")
            continue
        entries.append(entry)
    return entries, problems


# ----------------------------------------------------------------------------- summary


def _size(n: int) -> str:
    return f"{n:,} bytes" + (f" ({n / 1e6:.1f} MB)" if n >= 100_000 else "")


def _short_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n:,} bytes"


def _ranges(numbers: Iterable[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    spans: list[list[int]] = []
    for n in sorted(set(numbers)):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _numbers(value: Any) -> tuple[list[float], int]:
    """(finite numbers, count of the rest) of one logged metric value (a number, a string nan/inf, a list)."""
    finite: list[float] = []
    other = 0
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            finite.append(float(v))
        else:
            other += 1
    return finite, other


def _group_lines(entries: list[dict[str, Any]]) -> list[str]:
    rounds = [e["round"] for e in entries if isinstance(e.get("round"), int)]
    total = sum(int(e.get("bytes") or 0) for e in entries)
    span = f", round{'s' if len(set(rounds)) > 1 else ''} {_ranges(rounds)}" if rounds else ""
    lines = [f"{len(entries)} message(s){span}, {_size(total)} up"]
    largest: dict[str, dict[str, Any]] = {}
    sent = 0
    for e in entries:
        for t in e.get("tensors") or []:
            sent += 1
            if t.get("bytes", 0) >= largest.get(t.get("name"), {}).get("bytes", -1):
                largest[t.get("name")] = t
    if largest:
        top = sorted(largest.values(), key=lambda t: -(t.get("bytes") or 0))[:3]
        shown = "; ".join(f"{t.get('name')} {t.get('shape')} {t.get('dtype')} {_short_size(int(t.get('bytes') or 0))}"
                          for t in top)
        lines.append(f"tensors: {len(largest)} distinct name(s), {sent} sent; largest: {shown}")
    metrics: dict[str, tuple[list[float], int]] = {}
    for e in entries:
        for name, value in (e.get("metrics") or {}).items():
            finite, other = _numbers(value)
            seen, odd = metrics.get(name, ([], 0))
            metrics[name] = (seen + finite, odd + other)
    if metrics:
        parts = []
        for name, (finite, other) in sorted(metrics.items()):
            low, high = (min(finite), max(finite)) if finite else (None, None)
            text = name if low is None else f"{name} {low:g}" if low == high else f"{name} {low:g}..{high:g}"
            parts.append(text + (f" ({other} not finite)" if other else ""))
        lines.append("metrics (min..max): " + ", ".join(parts))
    meta_keys = sorted({str(k) for e in entries for k in (e.get("meta") or {})})
    if meta_keys:
        lines.append("meta: " + ", ".join(meta_keys))
    errors = [str(e["error"]) for e in entries if e.get("error") is not None]
    if errors:
        distinct = list(dict.fromkeys(errors))
        shown = "; ".join(repr(text if len(text) <= 160 else text[:157] + "...") for text in distinct[:3])
        more = f" (+{len(distinct) - 3} other texts)" if len(distinct) > 3 else ""
        lines.append(f"errors sent: {len(errors)}: {shown}{more}")
    return lines


def summarise(entries: list[dict[str, Any]]) -> str:
    """A plain-text summary of a site's log: who, when, and per message type and phase what was sent."""
    if not entries:
        return "no entries"
    sites = sorted({str(e.get("site")) for e in entries})
    runs = sorted({e["run_id"] for e in entries if e.get("run_id") is not None}, key=str)
    times = sorted(str(e["time"]) for e in entries if e.get("time"))
    total = sum(int(e.get("bytes") or 0) for e in entries)
    errors = sum(e.get("error") is not None for e in entries)
    replies = "reply" if errors == 1 else "replies"
    lines = [
        f"site {', '.join(sites)}: {len(entries)} message(s) sent, {_size(total)} of tensors, {errors} error {replies}",
        f"runs: {', '.join(str(r) for r in runs) or 'none recorded'}",
        f"from {times[0]} to {times[-1]}" if times else "no times recorded",
    ]
    groups: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault((str(e.get("message_type")), e.get("phase")), []).append(e)
    for (message_type, phase), group in groups.items():
        first, *rest = _group_lines(group)
        lines.append(f"{message_type}" + (f" ({phase})" if phase else "") + f": {first}")
        lines += [f"  {line}" for line in rest]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("site", type=Path, help="the site YAML file (its cache folder holds the log)")
    parser.add_argument("--json", action="store_true",
                        help="print the log's entries as JSON lines instead of a summary")


def run(args: argparse.Namespace) -> int:
    from pemma_core.config.site import load_site_config

    path = audit_path(load_site_config(args.site).cache_dir)
    if not path.is_file():  # on stderr with --json: stdout holds JSON lines only (here none)
        print(f"no audit log at {path}: this site has sent nothing yet", file=sys.stderr if args.json else sys.stdout)
        return 0
    entries, problems = read_audit(path)
    if args.json:
        for entry in entries:
            print(json.dumps(entry))
    else:
        print(f"audit log {path}")
        print(summarise(entries))
    for problem in problems:  # on stderr: --json output stays clean JSON lines
        print(f"pemma audit: warning: {path}: {problem}", file=sys.stderr, flush=True)
    return 0
