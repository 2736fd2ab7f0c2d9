"""The ``fa-hvd-bench`` command line: one subcommand per benchmark module.

A benchmark module provides ``add_parser(subparsers)``, which registers its
subcommand and sets the ``run(args) -> int`` default; adding a benchmark is adding
its module to :data:`BENCHMARKS`.
"""

from __future__ import annotations

import argparse

from . import aggregators, checkpoint, gather, robustness, step

BENCHMARKS = (aggregators, robustness, step, checkpoint, gather)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen benchmark."""
    parser = argparse.ArgumentParser(
        prog="fa-hvd-bench",
        description="fa_hvd benchmarks: JSON lines of results on stdout, progress on stderr.",
    )
    subparsers = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for module in BENCHMARKS:
        module.add_parser(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)
