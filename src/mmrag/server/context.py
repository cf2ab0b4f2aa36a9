"""`Context`: what the handlers share — the memory service, capabilities, limits, threads."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.params import Depends as DependsParam

from mmrag.memory.ingest import DocumentLimits
from mmrag.server.auth import BearerAuth
from mmrag.server.bodies import validation_error
from mmrag.server.capabilities import MISSING, Capabilities, GenerationOptions
from mmrag.server.config import ServerConfig
from mmrag.server.service import MemoryService

T = TypeVar("T")


@dataclasses.dataclass
class Context:
    """What the handlers share: the memory, the capabilities, limits, access, the threads."""

    service: MemoryService
    capabilities: Capabilities
    config: ServerConfig
    auth: BearerAuth
    pool: ThreadPoolExecutor
    generation_pool: ThreadPoolExecutor
    limits: DocumentLimits = dataclasses.field(init=False)  # built once from `config`

    def __post_init__(self) -> None:
        self.limits = self.config.document_limits()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    async def generate(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.generation_pool, functools.partial(fn, *args))

    def check_k(self, k: int, loc: str = "k") -> int:
        if k > self.config.max_k:
            raise validation_error(("body", loc), f"must be <= {self.config.max_k}")
        return k

    def check_text(self, text: str | None, loc: tuple[str | int, ...]) -> str | None:
        if text is not None and len(text) > self.config.max_text_chars:
            raise validation_error(loc, f"longer than {self.config.max_text_chars} characters")
        return text

    def options(self, body: Any, max_tokens: int = 64) -> GenerationOptions:
        return GenerationOptions(
            k=self.check_k(body.k),
            filters=body.filters or None,
            seed=body.seed,
            max_tokens=max_tokens,
        )

    def capability(self, name: str) -> Any:
        found = getattr(self.capabilities, name)
        if found is None:
            key = {"image_generator": "image_generation", "captioner": "captioning"}.get(name, name)
            raise HTTPException(501, MISSING[key])
        return found


def get_context(request: Request) -> Context:
    """The dependency every handler takes: the app's shared context."""
    ctx: Context = request.app.state.mmrag
    return ctx


ContextDep = Annotated[Context, Depends(get_context)]


@dataclasses.dataclass(frozen=True)
class Access:
    """Who may read and write: the dependencies each kind of route carries, and the errors a
    read may answer (401 / 403 only when reads need the token)."""

    read: list[DependsParam]
    write: list[DependsParam]
    read_errors: tuple[int, ...]

    @classmethod
    def of(cls, auth: BearerAuth, open_reads: bool) -> Access:
        write = [Depends(auth.dependency("writing"))]
        if open_reads:
            return cls([], write, ())
        return cls([Depends(auth.dependency("reading"))], write, (401, 403))
