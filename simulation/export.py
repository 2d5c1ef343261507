"""``pemma export``: a run's model as a self-contained package (MONAI bundle layout, model card).

::

    pemma export RUN OUT [--round N]

``OUT`` must not exist. ``pemma predict --model OUT`` then needs neither the run folder
nor any site YAML (:mod:`simulation.model_package` describes the layout).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pemma_core import console


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="run folder (pemma simulate / flwr run output)")
    parser.add_argument("out", type=Path, metavar="OUT", help="package folder to create (must not exist)")
    parser.add_argument("--round", type=int, help="adapters of this round (default: the last, prognosis included)")


def run(args: argparse.Namespace) -> int:
    from simulation.model_package import export_package, read_package_metadata

    console.say(f"exporting {args.run}" + (f" (round {args.round})" if args.round is not None else ""))
    out = export_package(args.run, args.out, args.round)
    pemma = read_package_metadata(out)["pemma"]
    console.say(f"round {pemma['round']} ({pemma['phase']}), modes {', '.join(pemma['modes'])}; "
                f"model card {out / 'README.md'}")
    print(out)
    return 0
