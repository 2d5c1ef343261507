"""Number formatting shared by the sections of ``BENCHMARKS.md`` (plain numbers:
:func:`server.report.format_value`, the one format of the project's markdown tables)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["byte_size", "met_word", "mib", "param_count"]


def mib(value: Any) -> str:
    """Bytes as whole MiB; ``-`` for None."""
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def byte_size(value: Any) -> str:
    """Bytes as MiB (from 1 MiB) or KiB; ``-`` for None."""
    if value is None:
        return "-"
    if value >= 2**20:
        return f"{value / 2**20:.2f} MiB"
    return f"{value / 2**10:.1f} KiB"


def param_count(n: int) -> str:
    """A parameter count in M (from a million) or k."""
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def met_word(target: Mapping[str, Any]) -> str:
    """A target's result: met / missed (within noise) / reported / not measured."""
    if target["met"] is None:
        return "reported" if target["measured"] is not None else "not measured"
    word = "**met**" if target["met"] else "**missed**"
    if target.get("settled") is False:
        word += " (within noise)"
    return word
