"""What every `mmrag` subcommand shares: exit codes, the user-facing error, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, Protocol

from mmrag.data.datasets import DATASETS

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
DATASET_NAMES = tuple(DATASETS)

Command = Callable[[argparse.Namespace], int]


class AddCommand(Protocol):
    """Registers a subcommand: its name, the function that runs it, its one-line help."""

    def __call__(self, name: str, func: Command, help: str) -> argparse.ArgumentParser: ...


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
