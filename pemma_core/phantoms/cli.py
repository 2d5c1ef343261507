"""``pemma phantoms OUT --sites N --cases-per-site K --seed S``: write a synthetic federation.

The layout written is described in :mod:`pemma_core.phantoms.writer`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pemma_core.console import UsageError

__all__ = ["add_arguments", "run"]

# The writer (nibabel, scipy, pandas) is imported when the command runs, not for --help.


def _modalities(token: str) -> tuple[str, ...]:
    """argparse type of ``--modalities``: a bad token is a usage error naming it."""
    from pemma_core.phantoms.writer import parse_modalities

    try:
        return parse_modalities(token)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder (absent or empty)")
    parser.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    parser.add_argument("--cases-per-site", type=int, default=8, help="cases per site, a third test (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--test-cases", type=int, default=8, help="held-out CT+PET+EHR test cases (default 8; 0: none)")
    parser.add_argument(
        "--modalities",
        nargs="+",
        type=_modalities,
        default=None,
        metavar="MODS",
        help="per-site modalities, cycled, e.g. ct ct+pet ct+pet+ehr (the default)",
    )
    parser.add_argument(
        "--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
        help="target spacing (mm) written in the site YAMLs (default: the phantoms' own, 3.5 3.5 3.5)",
    )


def run(args: argparse.Namespace) -> int:
    from pemma_core.phantoms.writer import PHANTOM_SPACING, make_federation

    try:
        federation = make_federation(  # a non-empty OUT is refused: FileExistsError, exit status 1
            args.out,
            n_sites=args.sites,
            cases_per_site=args.cases_per_site,
            seed=args.seed,
            test_cases=args.test_cases,
            modalities=args.modalities,
            spacing=PHANTOM_SPACING if args.spacing is None else tuple(args.spacing),
        )
    except ValueError as exc:  # counts out of range
        raise UsageError(str(exc)) from exc
    for path in federation.site_yamls:
        print(path)
    if federation.test_yaml is not None:
        print(federation.test_yaml)
    return 0
