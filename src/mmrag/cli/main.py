"""The `mmrag` command: one parser, a subcommand per task, each a thin function over the API.

Commands that own a parser of their own (the trainers, the evaluations, `generate`, `chat`)
are real subcommands built from that parser, so `mmrag train ra-cm3 --help` lists every
option; their modules are imported only when the command line names them, so `mmrag search`
does not import the trainers.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from mmrag.cli import demo, memory, serve
from mmrag.cli.common import EXIT_ERROR, Command, CommandError
from mmrag.config import ConfigError

# Delegating commands: group -> name -> (module with build_parser() and main(argv), help).
GROUPS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "train": (
        "train a component; `mmrag train NAME --help` lists its options",
        {
            "encoder": ("mmrag.encoders.lite_train", "the lite encoder's projection heads"),
            "vq": ("mmrag.models.vq.train", "the VQ image tokenizer"),
            "ra-cm3": (
                "mmrag.models.ra_cm3.train",
                "the RA-CM3 generator (--retrieval off: the vanilla baseline)",
            ),
            "fromage": ("mmrag.models.fromage.train", "the frozen-LM adapters (FROMAGe)"),
            "gill": (
                "mmrag.models.gill.train",
                "image tokens, mapper and decision on top of FROMAGe (GILL)",
            ),
            "chat": ("mmrag.chat.train", "the chat's image decision (does the user ask to see?)"),
        },
    ),
    "eval": (
        "evaluate a model; `mmrag eval NAME --help` lists its options",
        {
            "ra-cm3": (
                "mmrag.models.ra_cm3.evaluate",
                "retrieval vs none: FID, dual-encoder score, CIDEr, knowledge test",
            ),
            "fromage": (
                "mmrag.models.fromage.evaluate",
                "contextual image retrieval R@k, captioning CIDEr",
            ),
            "gill": (
                "mmrag.models.gill.evaluate",
                "decision F1 and calibration, mapper, generated images",
            ),
            "encoder": (
                "mmrag.encoders.evaluate",
                "text/image recall per source on held-out groups, cross-style, bridge alone",
            ),
            "vq": (
                "mmrag.models.vq.evaluate",
                "held-out PSNR, code usage, reconstruction FID",
            ),
            "chat": (
                "mmrag.chat.evaluate",
                "words, grounded naming, images when asked, follow-ups, seconds per turn",
            ),
        },
    ),
}
# Single delegating commands: name -> (module, help).
DELEGATES: dict[str, tuple[str, str]] = {
    "generate": (
        "mmrag.cli.generate",
        "generate with RA-CM3 from what MEMORY retrieves: image, caption, infill-image, "
        "infill-caption",
    ),
    "chat": (
        "mmrag.cli.chat",
        "chat over MEMORY with the frozen LM: text and images in, text and retrieved or "
        "generated images out",
    ),
}


def _words(argv: Sequence[str]) -> list[str]:
    """The positional words of the command line (top-level options take no values)."""
    return [a for a in argv if not a.startswith("-")]


def _delegate(sub: Any, name: str, module: str, help: str, chosen: bool) -> argparse.ArgumentParser:
    """A subcommand parsed by `module.build_parser()`; built only when the command line names
    it (otherwise a stub that only shows in the listing)."""
    if not chosen:
        stub: argparse.ArgumentParser = sub.add_parser(name, help=help)
        return stub
    own: argparse.ArgumentParser = importlib.import_module(module).build_parser()
    parser = sub.add_parser(
        name, help=help, parents=[own], add_help=False, description=own.description
    )
    parser.set_defaults(delegate=module)
    return parser


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The whole command; `argv` says which delegated parser to build in full."""
    words = _words(argv)
    parser = argparse.ArgumentParser(
        prog="mmrag",
        description="Retrieval-augmented multimodal generation over a persistent memory.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    memory.add_commands(add)
    for group, (group_help, members) in GROUPS.items():
        g = sub.add_parser(group, help=group_help, description=group_help)
        inner = g.add_subparsers(dest="what", required=True, metavar="NAME")
        for name, (module, help) in members.items():
            _delegate(inner, name, module, help, words[:2] == [group, name])
    for name, (module, help) in DELEGATES.items():
        _delegate(sub, name, module, help, words[:1] == [name])
    demo.add_commands(add)
    serve.add_commands(add)
    return parser


def _rest(argv: Sequence[str], args: argparse.Namespace) -> list[str]:
    """What follows the command words: the delegated module's own arguments."""
    words = [args.command] + ([args.what] if args.command in GROUPS else [])
    i = 0
    for word in words:
        i = list(argv).index(word, i) + 1
    return list(argv[i:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from mmrag.documents import DocumentError
    from mmrag.memory.memory import MemoryFolderError
    from mmrag.memory.store import StoreError

    try:
        if getattr(args, "delegate", None):
            code: int = importlib.import_module(args.delegate).main(_rest(argv, args))
            return code
        result: int = args.func(args)
        return result
    except (
        CommandError,
        ConfigError,
        DocumentError,
        MemoryFolderError,
        StoreError,
        FileNotFoundError,
        ImportError,
    ) as e:
        print(f"mmrag {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
