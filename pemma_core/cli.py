"""The ``pemma`` command.

Each sub-command lives in its own module, imported only when that command runs, so
``pemma info`` never loads Flower. A command module exposes::

    HELP: str                                     # one line for ``pemma --help``
    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int      # exit status
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "info": "pemma_core.info",
    "phantoms": "pemma_core.phantoms",
    "check-site": "pemma_core.site_check",
    "simulate": "simulation.simulate",
    "evaluate": "simulation.evaluate",
    "predict": "simulation.predict",
    "bench": "simulation.bench",
}


def _top_help() -> str:
    lines = ["usage: pemma COMMAND [options]", "", "commands:"]
    for name, module_name in COMMANDS.items():
        try:
            summary = importlib.import_module(module_name).HELP
        except Exception as exc:  # a broken command must not hide the others
            summary = f"(unavailable: {exc})"
        lines.append(f"  {name:<12} {summary}")
    lines.append("")
    lines.append("Run 'pemma COMMAND --help' for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pemma: unknown command {name!r}\n\n{_top_help()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name])
    parser = argparse.ArgumentParser(prog=f"pemma {name}", description=module.HELP)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
