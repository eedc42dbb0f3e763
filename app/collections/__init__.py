"""Image search: collections of embeddings in PostgreSQL with pgvector.

`CollectionsService(data_dir, url)` opens the store on first use: the shared database of `url`
(`--collections-url`), or else the private PostgreSQL under `data_dir` (`app.collections.embedded`), and
closes it (stopping the private server) at shutdown. The schema and queries are in `app.collections.store`.
Nothing here imports torch or FastAPI.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import unquote, urlsplit

from app.collections.embedded import EmbeddedError, EmbeddedPostgres
from app.collections.store import (
    EF_SEARCH,
    MAX_K,
    Binding,
    Collection,
    Conflict,
    Invalid,
    NewItem,
    NotFound,
    Store,
    StoreError,
    Unavailable,
)

log = logging.getLogger("vitserve")

__all__ = [
    "EF_SEARCH",
    "MAX_K",
    "Binding",
    "Collection",
    "CollectionsService",
    "Conflict",
    "Invalid",
    "NewItem",
    "NotFound",
    "Store",
    "StoreError",
    "Unavailable",
    "url_secrets",
]


def url_secrets(url: str) -> list[str]:
    """The parts of a connection URL that must never be shown: the whole URL, its user and its password."""
    out = [url]
    try:
        parts = urlsplit(url)
        for value in (parts.password, parts.username):
            if value:
                out += [value, unquote(value)]
    except ValueError:
        pass
    return [s for s in out if len(s) >= 3]


class CollectionsService:
    """One process's collections store, opened on first use and closed at shutdown."""

    def __init__(self, data_dir: str | None, url: str | None, pool_size: int = 8):
        self.url = url
        self.pool_size = pool_size
        self.embedded = None if url else EmbeddedPostgres(data_dir)
        self._store: Store | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def kind(self) -> str:
        return "shared" if self.url else "embedded"

    async def store(self) -> Store:
        if self._store is not None:
            return self._store
        async with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if self._store is None:
                self._store = await self._open()
        return self._store

    async def _open(self) -> Store:
        if self.url:
            if not self.url.startswith(("postgresql://", "postgres://")):
                raise Unavailable("--collections-url must be a postgresql:// URL")
            secrets = url_secrets(self.url)
            conninfo = self.url
        else:
            assert self.embedded is not None
            try:
                conninfo = await asyncio.to_thread(self.embedded.start)
            except EmbeddedError as e:
                log.error("collections: %s", e)
                raise Unavailable("the collection store could not be started; the server log says why") from None
            secrets = [str(self.embedded.data_dir)]
        store = Store(conninfo, max_size=self.pool_size, secrets=secrets)
        try:
            await store.open()
        except Unavailable as e:
            log.error("collections: %s", e)
            if self.embedded is not None:
                await asyncio.to_thread(self.embedded.stop)
            raise Unavailable("the collections database cannot be reached; the server log says why") from None
        log.info("collections: using the %s PostgreSQL", self.kind)
        return store

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            store, self._store = self._store, None
            if store is not None:
                await store.close()
            if self.embedded is not None:
                await asyncio.to_thread(self.embedded.stop)
