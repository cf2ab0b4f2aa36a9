"""TorchScript for the hot paths: a whole forward as one call that releases Python's GIL.

Through PyTorch modules a forward is many operator calls, and each takes the GIL back when its
kernel returns: a serving thread waits for it between operators while the event loop and other
threads hold it, and a decoding loop pays Python's dispatch per operator. A TorchScript
function or trace runs its whole body in C++ with the GIL released, on the same ATen kernels.

TorchScript is deprecated in favour of `torch.compile` / `torch.export`, but those run Python
wrapper code per kernel or need a C++ toolchain at run time (AOTInductor); nothing else in
torch runs a whole forward without the GIL. Its warnings are silenced here, and where it is
missing (or cannot compile something) these return None and callers keep their module path.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def script(fn: Callable[..., Any], what: str) -> Any | None:
    """`torch.jit.script(fn)`, or None (logged, naming `what`) where that fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(fn)
    except Exception as e:  # e.g. a torch without TorchScript, or source it cannot read
        log.warning("TorchScript is unavailable for %s (%s); using the modules", what, e)
        return None


def trace(module: nn.Module, example: torch.Tensor, what: str) -> Any | None:
    """`torch.jit.trace(module, example)` in inference mode, or None (logged) where that fails.
    Shapes the module reads as Python numbers become constants of the trace."""
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # deprecation, and shapes read as constants
            return torch.jit.trace(module, example, check_trace=False)
    except Exception as e:
        log.warning("TorchScript is unavailable for %s (%s); using the modules", what, e)
        return None
