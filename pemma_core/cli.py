"""The ``pemma`` command.

Each sub-command lives in its own module, imported only when that command is named, and
its heavy dependencies (torch, MONAI, Flower) only when it runs, so ``pemma --help`` and
``pemma CMD --help`` answer at once. A command module exposes::

    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int      # exit status

Its one-line summary is kept here, in :data:`COMMANDS`. Exit status: 0 success, 1 a
failure (a user error is one line on stderr, ``pemma CMD: error: ...``; ``-v`` adds the
traceback), 2 a usage error (bad options: argparse, or :class:`~pemma_core.console.UsageError`
from a command), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from pemma_core import console

# name -> (module, one-line summary for ``pemma --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("pemma_core.model.info", "parameter counts and upload sizes of a PEMMA model (computed from the model)"),
    "phantoms": ("pemma_core.phantoms.cli",
                 "write a synthetic PET/CT federation (sites, manifests, clinical CSVs, site YAMLs)"),
    "check-site": ("pemma_core.data.site_check",
                   "check a site's YAML, manifest, clinical CSV and every image without training"),
    "convert": ("pemma_core.data.convert",
                "DICOM to NIfTI: a CT (HU) or PET (SUV) series, or an RTSTRUCT / DICOM-SEG label on its series' grid"),
    "audit": ("pemma_core.audit",
              "what this site has sent to the server: every message, tensor and metric (from its own log)"),
    "simulate": ("simulation.simulate",
                 "run a federation on this machine (Flower simulation engine): pretrain-ct, adapt, prognosis, "
                 "with a report"),
    "evaluate": ("simulation.evaluate", "Dice per site and per mode of a run's adapters on local site data"),
    "predict": ("simulation.predict", "segment a CT (+PET) case with a run's adapters; the mask is written on the CT grid"),
    "export": ("simulation.export",
               "a run's model as a self-contained package (MONAI bundle layout, model card) for pemma predict --model"),
    "bench": ("benchmarks.cli",
              "benchmark PEMMA vs its baselines on the IBSI PET/CT sites (Dice, size, upload, speed, memory) "
              "-> BENCHMARKS.md"),
}

# Errors a user can act on: one line, exit status 1. Every error type of the project's own
# (SiteConfigError, RunConfigError, AdapterMismatchError, ClinicalDataError, SiteDataError,
# ...) is a ValueError; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
)

_VERBOSITY_FLAGS = ("-v", "--verbose", "-q", "--quiet")


def common_options() -> argparse.ArgumentParser:
    """The options every command takes (an argparse parent parser): ``-v`` / ``-q``."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=console.VERBOSE,
                       default=console.NORMAL, help="say more: library log lines, and the traceback of an error")
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=console.QUIET,
                       help="no progress lines: results and errors only")
    return parser


def _top_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="pemma",
        usage="pemma [-v | -q] COMMAND [options]",
        description="PEMMA: multi-modal PET/CT segmentation adapters, trained federated.",
        epilog=f"commands:\n{commands}\n\nRun 'pemma COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common_options()],
    )


def _message(exc: BaseException) -> str:
    """One line for the user: ``path: reason`` for an OS error, else the exception's text."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``pemma ARGV``; returns the exit status (also for ``--help`` and bad options: no SystemExit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = []  # -v / -q given before the command: `pemma -q check-site ...`
    while argv and argv[0] in _VERBOSITY_FLAGS:
        flags.append(argv.pop(0))
    if not argv or argv[0] in ("-h", "--help"):
        if argv:
            _top_parser().print_help()
            return 0
        _top_parser().print_help(sys.stderr)
        return 2
    name, rest = argv[0], flags + argv[1:]
    if name not in COMMANDS:
        top = _top_parser()
        top.print_usage(sys.stderr)
        print(f"pemma: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"pemma {name}", description=summary, parents=[common_options()])
    module.add_arguments(parser)
    try:
        args = parser.parse_args(rest)
    except SystemExit as exc:  # --help (0) or a bad option (2, argparse has said why)
        return exc.code if isinstance(exc.code, int) else 0
    console.set_verbosity(args.verbosity)
    try:
        return int(module.run(args) or 0)
    except console.UsageError as exc:
        parser.print_usage(sys.stderr)
        console.error(name, str(exc))
        return 2
    except KeyboardInterrupt:
        print(f"\npemma {name}: interrupted", file=sys.stderr, flush=True)
        return 130
    except USER_ERRORS as exc:
        if console.verbosity() >= console.VERBOSE:
            traceback.print_exc()
        console.error(name, _message(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
