"""`mmrag demo`: the offline demo and its HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmrag.cli.common import EXIT_OK, AddCommand


def cmd_demo(args: argparse.Namespace) -> int:
    from mmrag.demo.report import run_demo

    report = run_demo(
        Path(args.out),
        limit=args.limit,
        progress=not args.no_progress,
        rebuild=args.rebuild,
        chat=not args.no_chat,
    )
    print(f"demo report: {report}")
    return EXIT_OK


def add_commands(add: AddCommand) -> None:
    p = add("demo", cmd_demo, "build the emoji + photos memory and write an HTML report")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument(
        "--limit", type=int, default=None, help="use only the first N emoji (default: all)"
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached memory")
    p.add_argument(
        "--no-chat",
        action="store_true",
        help="skip the scripted FROMAGe / GILL conversation (it builds a second memory with "
        "the fromage encoder)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
