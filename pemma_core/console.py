"""What the ``pemma`` commands say on the terminal: messages, progress, verbosity.

One place decides how loud a command is (``-q`` / default / ``-v``), so every command
reports progress the same way: a rich progress bar when stderr is a terminal, one plain
line per step otherwise (CI logs, ``nohup``), nothing with ``-q``. Results go to stdout;
progress, warnings and errors go to stderr, so ``pemma CMD --json > out.json`` stays clean.

This module is imported by ``pemma --help``: it must stay free of heavy imports.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

__all__ = ["NORMAL", "QUIET", "VERBOSE", "UsageError", "error", "progress", "say", "set_verbosity", "verbosity"]

QUIET, NORMAL, VERBOSE = 0, 1, 2

T = TypeVar("T")

_verbosity = NORMAL
_LOG_LEVELS = {QUIET: logging.ERROR, VERBOSE: logging.INFO}  # NORMAL: the root logger's own level
_handler: logging.Handler | None = None
_root_level: int | None = None  # the root logger's level before -q / -v changed it


class UsageError(Exception):
    """A command was given options it cannot work with; ``pemma`` exits with status 2."""


def _has_own_handler(record: logging.LogRecord) -> bool:
    """Whether a logger below the root (Flower's, say) already prints ``record``."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None and logger.parent is not None:  # stop below the root
        if logger.handlers:
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


def set_verbosity(level: int) -> None:
    """Set how much the commands say: ``QUIET`` (errors only), ``NORMAL``, ``VERBOSE``.

    The root logger follows: at ``NORMAL`` it is left as it was (library warnings show),
    ``VERBOSE`` adds their INFO lines (through a stderr handler added only then, only when
    the root has none, skipping loggers that print for themselves), ``QUIET`` keeps errors
    only. A test runner's or an application's handlers are left alone.
    """
    global _verbosity, _handler, _root_level
    _verbosity = max(QUIET, min(VERBOSE, level))
    root = logging.getLogger()
    if _verbosity in _LOG_LEVELS:
        _root_level = root.level if _root_level is None else _root_level
        root.setLevel(_LOG_LEVELS[_verbosity])
    elif _root_level is not None:
        root.setLevel(_root_level)
        _root_level = None
    if _verbosity >= VERBOSE and _handler is None and not root.handlers:
        _handler = logging.StreamHandler()  # stderr
        _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        _handler.addFilter(lambda record: not _has_own_handler(record))
        root.addHandler(_handler)
    elif _verbosity < VERBOSE and _handler is not None:
        root.removeHandler(_handler)
        _handler = None


def verbosity() -> int:
    """The current level (``QUIET``, ``NORMAL`` or ``VERBOSE``)."""
    return _verbosity


def say(message: str, level: int = NORMAL, *, file: TextIO | None = None) -> None:
    """A progress or status line, shown at ``level`` and louder; on stderr unless ``file``."""
    if _verbosity >= level:
        print(message, file=file or sys.stderr, flush=True)


def error(command: str, message: str) -> None:
    """``pemma COMMAND: error: message`` on stderr, shown even with ``-q``."""
    print(f"pemma {command}: error: {message}", file=sys.stderr, flush=True)


def progress(
    items: Iterable[T], description: str, total: int | None = None, label: Callable[[T], str] | None = None
) -> Iterator[T]:
    """Iterate over ``items`` showing progress on stderr.

    A rich bar on a terminal; otherwise one line per item, ``description i/n [label(item)]``,
    written before the item is worked on, so a log shows which item a slow or stuck step
    is on; silent with ``-q``.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if _verbosity <= QUIET:
        yield from items
        return
    if sys.stderr.isatty():
        from rich.console import Console  # imported here: rich costs start-up time
        from rich.progress import Progress

        # stdout is left alone: results printed meanwhile must stay on stdout (`> out.json`).
        with Progress(console=Console(stderr=True), transient=True, redirect_stdout=False) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                if label is not None:
                    bar.update(task, description=f"{description} {label(item)}")
                yield item
                bar.advance(task)
        return
    for i, item in enumerate(items, start=1):
        count = f"{i}/{total}" if total else str(i)
        say(f"{description} {count}" + (f" {label(item)}" if label is not None else ""))
        yield item
