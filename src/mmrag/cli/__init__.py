"""The `mmrag` command."""

from mmrag.cli.main import main

__all__ = ["main"]
