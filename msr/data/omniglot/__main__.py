"""The Omniglot data command: get the array file the drivers read.

    python -m msr.data.omniglot download [--root DIR]     # the original zips, then convert
    python -m msr.data.omniglot convert SOURCE [--root DIR]  # zips or folders you have
    python -m msr.data.omniglot where                     # where the data is looked for

DIR defaults to the first data root (``$MSR_DATA``, else ``~/.cache/msr``); the result is
``DIR/omniglot/omniglot_28x28_lanczos.npz`` with ``DIR/omniglot/splits/vinyals/``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from msr.data.locations import data_roots, find_data, where_searched
from msr.data.omniglot.build import ARRAY_FILE, SOURCE, ZIPS, OmniglotDataError, convert, download

RELATIVE = f"omniglot/{ARRAY_FILE}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m msr.data.omniglot",
        description="Get Omniglot (Lake et al. 2015, MIT licence) as the 28x28 array file that "
        "msr's loaders and the few-shot driver read.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser(
        "download", help=f"download {' and '.join(ZIPS)} from {SOURCE} and convert them"
    )
    local = commands.add_parser(
        "convert", help="convert the zips (or their unzipped folders) you already have"
    )
    local.add_argument("source", type=Path, help="a folder holding the two zips or their folders")
    for command in (fetch, local):
        command.add_argument(
            "--root",
            type=Path,
            default=data_roots()[0],
            help="the data root to write into (default: %(default)s)",
        )
    commands.add_parser("where", help="where the data is looked for, and what is found")
    args = parser.parse_args(argv)
    if args.command == "where":
        found = find_data(RELATIVE)
        print(f"looked in {where_searched(RELATIVE)}: " + (f"found {found}" if found else "none"))
        return 0
    try:
        written = (
            download(args.root) if args.command == "download" else convert(args.source, args.root)
        )
    except OmniglotDataError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {written} (verified) and its split lists")
    return 0


if __name__ == "__main__":
    sys.exit(main())
