"""Trainer flags generated from a config dataclass: one `--name` per overridable field.

Each trainer lists the fields a user may override with their help text; the flag's type and
default come from the config class itself, so a flag can never disagree with its field.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mmrag.config import Config, ConfigError

C = TypeVar("C", bound=Config)
SCALARS = (int, float, str)


def _scalar(hint: Any) -> type:
    """int, float or str, unwrapping `X | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            hint = args[0]
    if hint not in SCALARS:
        raise TypeError(f"a config flag must be int, float or str, not {hint!r}")
    kind: type = hint
    return kind


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_config_flags(
    parser: argparse.ArgumentParser,
    defaults: Config,
    helps: Mapping[str, str],
    metavars: Mapping[str, str] | None = None,
) -> None:
    """`--field` for each field in `helps`, typed from the dataclass, its default in the help
    (the flag itself defaults to None: only a given flag overrides the config)."""
    hints = typing.get_type_hints(type(defaults))
    fields = {f.name for f in dataclasses.fields(defaults)}
    for name, text in helps.items():
        if name not in fields:
            raise TypeError(f"{type(defaults).__name__} has no field {name!r}")
        kind = _scalar(hints[name])
        metavar = (metavars or {}).get(name, kind.__name__.upper())
        parser.add_argument(
            flag_name(name),
            type=kind,
            metavar=metavar,
            help=f"{text} (default {getattr(defaults, name)!r})".replace("%", "%%"),
        )


def config_changes(args: argparse.Namespace, helps: Mapping[str, str]) -> dict[str, Any]:
    """The fields whose flag was given."""
    return {name: getattr(args, name) for name in helps if getattr(args, name) is not None}


def apply_flags(config: C, args: argparse.Namespace, helps: Mapping[str, str]) -> C:
    changes = config_changes(args, helps)
    return config.replace(**changes) if changes else config


def add_run_flags(
    parser: argparse.ArgumentParser, config_class: type[Config], data_help: str, out_help: str
) -> None:
    """What every trainer takes: --data, --out, --config."""
    parser.add_argument(
        "--data", nargs="+", required=True, type=Path, metavar="PATH", help=data_help
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help=out_help)
    parser.add_argument(
        "--config",
        type=Path,
        metavar="JSON_FILE",
        help=f"a full {config_class.__name__} JSON (e.g. a run's train-config.json; unknown "
        "keys are an error); the flags below override it",
    )


def parse_run(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    build: Callable[[argparse.Namespace], C],
) -> tuple[argparse.Namespace, C]:
    """A trainer's command line and the config it asks for; a config that cannot be built is a
    usage error. `--threads`, where the trainer has it, sets torch's CPU threads."""
    args = parser.parse_args(argv)
    try:
        config = build(args)
    except (ConfigError, OSError) as e:
        parser.error(str(e))
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return args, config


def log_progress(main_rank: bool = True) -> None:
    """INFO logs to stderr unless the caller configured logging (one rank tells the story)."""
    if not logging.getLogger().handlers:
        level = logging.INFO if main_rank else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
