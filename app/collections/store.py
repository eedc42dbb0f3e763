"""Collections of embeddings in PostgreSQL with pgvector: the schema and every query, on psycopg 3's async pool.

Schema (created on first use, under an advisory lock so that replicas starting together do not race):
- `vitserve_collections`: one row per collection: its name, what it is bound to (model name, weights sha256,
  served image size, pool, preprocessing), metric, dimension, whether thumbnails are kept, the index kind, the
  item count (kept in the same transaction as every add and delete) and the name of its items table;
- one items table per collection, `vitserve_items_<id>` (named from the collection's serial id, never from
  client text): `seq` (insertion order, the paging cursor), `id` (unique), `embedding vector(dim)`,
  `metadata jsonb`, `thumbnail bytea`; an HNSW index on `embedding` with the metric's operator class.

Values are always bound parameters; table and index names are `psycopg.sql.Identifier`s built from the
serial id. An add is one transaction (all or nothing), committed before it is answered: with PostgreSQL's
default `synchronous_commit = on`, an answered add survives a crash of both processes.

Search: HNSW returns at most `hnsw.ef_search` rows and applies a filter after the index scan. Each search
sets `hnsw.ef_search` to max(k, EF_SEARCH) and `hnsw.iterative_scan = strict_order` (pgvector 0.8), so
the scan goes on past a filter's rejects; should it still end with fewer than k rows (the scan's tuple cap
was reached), the same query runs again as an exact scan. So k results come back whenever k items match.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("vitserve")

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
METRICS = ("cosine", "l2", "ip")
Metric = Literal["cosine", "l2", "ip"]
# pgvector: the distance operator and HNSW operator class of each metric
OPERATOR = {"cosine": "<=>", "l2": "<->", "ip": "<#>"}
OPCLASS = {"cosine": "vector_cosine_ops", "l2": "vector_l2_ops", "ip": "vector_ip_ops"}
HNSW_MAX_DIM = 2000  # pgvector indexes `vector` columns up to 2,000 dimensions; above, search is exact
HNSW_M = 16  # pgvector's defaults, which bench/search.py measures
HNSW_EF_CONSTRUCTION = 64
# the search list's size at the default index settings: recall@10 >= 0.95 on clustered 768-d vectors and on the
# digit embeddings (bench/search.py; bench/results/)
EF_SEARCH = 100
MAX_K = 1000  # pgvector's largest hnsw.ef_search
MAX_ID = 256  # characters in an item id
LOCK_KEY = 0x76697473  # advisory lock that serialises schema creation across processes

# ------------------------------------------------------------------------------------------------ errors


class StoreError(Exception):
    """A request the store cannot carry out; `kind` says which answer it deserves."""

    kind = "invalid"


class NotFound(StoreError):
    kind = "not_found"


class Conflict(StoreError):
    kind = "conflict"


class Invalid(StoreError):
    kind = "invalid"


class Unavailable(StoreError):
    kind = "unavailable"


# ------------------------------------------------------------------------------------------------ values


@dataclass(frozen=True)
class Binding:
    """What a collection's vectors depend on: the model, its weights, size, pool and preprocessing."""

    model: str
    model_sha256: str
    image_size: list[int]
    pool: str
    preprocess: dict


@dataclass(frozen=True)
class Collection:
    id: int
    name: str
    binding: Binding
    metric: Metric
    dim: int
    thumbnails: bool
    index: str
    count: int

    @property
    def table(self) -> sql.Identifier:
        return sql.Identifier(f"vitserve_items_{self.id}")

    def public(self) -> dict:
        b = self.binding
        return {
            "name": self.name,
            "model": b.model,
            "model_sha256": b.model_sha256,
            "image_size": list(b.image_size),
            "pool": b.pool,
            "preprocess": b.preprocess,
            "metric": self.metric,
            "dim": self.dim,
            "count": self.count,
            "index": self.index,
            "thumbnails": self.thumbnails,
        }


@dataclass(frozen=True)
class NewItem:
    id: str
    vector: np.ndarray  # float32 (dim,)
    metadata: dict
    thumbnail: bytes | None = None


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise Invalid(
            "a collection name is 1 to 63 characters: lowercase letters, digits, '_' and '-', starting with a "
            "letter or digit"
        )
    return name


def check_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID or "\x00" in value:
        raise Invalid(f"{where}: an item id is a non-empty string of at most {MAX_ID} characters")
    return value


def check_metadata(value: object, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(f"{where}: metadata must be a JSON object")
    if "\x00" in repr(value):
        raise Invalid(f"{where}: metadata must not contain NUL characters")
    return value


def check_vector(value: object, dim: int, metric: str, where: str) -> np.ndarray:
    """A list of `dim` finite numbers (not all zero for cosine) -> float32; Invalid otherwise."""
    if isinstance(value, np.ndarray):
        arr = value.astype(np.float32, copy=False).reshape(-1)
    else:
        if not isinstance(value, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in value
        ):
            raise Invalid(f"{where}: a vector is a list of numbers")
        try:
            wide = np.asarray(value, dtype=np.float64)
        except (OverflowError, ValueError):
            raise Invalid(f"{where}: a vector is a list of finite numbers") from None
        if wide.size and np.abs(wide).max() > np.finfo(np.float32).max:
            raise Invalid(f"{where}: a vector holds finite numbers only (float32)")
        arr = wide.astype(np.float32)
    if arr.shape != (dim,):
        raise Invalid(f"{where}: the vector has {arr.size} dimensions; this collection's have {dim}")
    if not np.isfinite(arr).all():
        raise Invalid(f"{where}: a vector holds finite numbers only (float32)")
    if metric == "cosine" and not arr.any():
        raise Invalid(f"{where}: a zero vector has no direction, so no cosine similarity")
    return arr


def check_filter(value: object) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise Invalid('"filter" must be a JSON object {key: value} (equality on top-level metadata keys)')
    if "\x00" in repr(value):
        raise Invalid('"filter" must not contain NUL characters')
    return value


def score_of(metric: str, distance: float) -> float:
    """API.md's score from pgvector's distance: cosine similarity, negative L2 distance, inner product."""
    if metric == "cosine":
        return 1.0 - distance
    return -distance  # l2: -distance; ip: pgvector's <#> is the negative inner product


# ------------------------------------------------------------------------------------------------ the store


SCHEMA = """
CREATE TABLE IF NOT EXISTS vitserve_collections (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE,
    model text NOT NULL,
    model_sha256 text NOT NULL,
    image_size integer[] NOT NULL,
    pool text NOT NULL,
    preprocess jsonb NOT NULL,
    metric text NOT NULL,
    dim integer NOT NULL,
    thumbnails boolean NOT NULL,
    index_kind text NOT NULL,
    count bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""


class Store:
    """Collections on one PostgreSQL (the embedded one, or a shared one from `--collections-url`)."""

    def __init__(self, conninfo: str, *, min_size: int = 1, max_size: int = 8, secrets: Sequence[str] = ()):
        self._conninfo = conninfo
        self._secrets = [s for s in secrets if s]
        redact_loggers(self._secrets)
        self._cache: dict[str, Collection] = {}  # name -> collection, for searches (`describe`)
        self.pool = AsyncConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            open=False,
            configure=self._configure,
            kwargs={"autocommit": True},
            name="vitserve-collections",
        )

    @staticmethod
    async def _configure(conn: psycopg.AsyncConnection) -> None:
        from pgvector.psycopg import register_vector_async

        await register_vector_async(conn)
        # every search's settings as the session's defaults, so a search is one statement (one round trip):
        # strict_order: the scan goes on past rows a filter rejects, in exact distance order; no sequential scans,
        # so a search uses the index whatever the planner's statistics say (a table filled since its last
        # ANALYZE looks small, and a sequential scan would be chosen: exact, but slow)
        await conn.execute(
            "SELECT set_config('hnsw.ef_search', %s, false), set_config('hnsw.iterative_scan', 'strict_order', false),"
            " set_config('enable_seqscan', 'off', false)",
            (str(EF_SEARCH),),
        )

    async def open(self, timeout: float = 30.0) -> None:
        """Connect and create the schema (pgvector's extension too, where it is missing)."""
        try:
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            async with conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                await conn.execute(SCHEMA)
            await self.pool.open(wait=True, timeout=timeout)
        except (psycopg.Error, OSError) as e:
            await self.pool.close()
            raise Unavailable(self.redact(f"cannot use the collections database: {type(e).__name__}: {e}")) from None

    async def close(self) -> None:
        await self.pool.close()

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[psycopg.AsyncConnection]:
        try:
            async with self.pool.connection() as conn:
                yield conn
        except psycopg.DataError as e:  # a value PostgreSQL refuses (the checks above should have caught it)
            raise Invalid(f"a value in the request cannot be stored: {type(e).__name__}") from e
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:  # the database went away, or is full
            raise Unavailable(self.redact(f"the collections database is unavailable: {type(e).__name__}")) from e
        except psycopg_pool_timeout() as e:
            raise Unavailable("no connection to the collections database became free in time") from e

    # ---------------------------------------------------------------------------------------- collections

    async def create(self, name: str, binding: Binding, metric: str, dim: int, thumbnails: bool) -> Collection:
        check_name(name)
        if metric not in METRICS:
            raise Invalid(f"metric must be one of {', '.join(METRICS)}, not {str(metric)[:40]!r}")
        index = "hnsw" if dim <= HNSW_MAX_DIM else "exact"
        async with self._conn() as conn, conn.transaction():
            try:
                row = await (
                    await conn.execute(
                        "INSERT INTO vitserve_collections (name, model, model_sha256, image_size, pool, preprocess,"
                        " metric, dim, thumbnails, index_kind) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                        " RETURNING id",
                        (
                            name,
                            binding.model,
                            binding.model_sha256,
                            list(binding.image_size),
                            binding.pool,
                            Jsonb(binding.preprocess),
                            metric,
                            dim,
                            thumbnails,
                            index,
                        ),
                    )
                ).fetchone()
            except psycopg.errors.UniqueViolation:
                raise Conflict(f"a collection named {name!r} exists already") from None
            assert row is not None
            coll = Collection(row[0], name, binding, metric, dim, thumbnails, index, 0)  # type: ignore[arg-type]
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id text NOT NULL UNIQUE,"
                    " embedding vector({}) NOT NULL, metadata jsonb NOT NULL DEFAULT '{{}}', thumbnail bytea)"
                ).format(coll.table, sql.Literal(dim))
            )
            if index == "hnsw":
                await conn.execute(
                    sql.SQL(
                        "CREATE INDEX {} ON {} USING hnsw (embedding {}) WITH (m = {}, ef_construction = {})"
                    ).format(
                        sql.Identifier(f"vitserve_items_{coll.id}_hnsw"),
                        coll.table,
                        sql.SQL(OPCLASS[metric]),
                        sql.Literal(HNSW_M),
                        sql.Literal(HNSW_EF_CONSTRUCTION),
                    )
                )
        return coll

    async def list(self) -> list[Collection]:
        async with self._conn() as conn:
            cur = conn.cursor(row_factory=dict_row)
            rows = await (await cur.execute("SELECT * FROM vitserve_collections ORDER BY name")).fetchall()
        return [_collection(r) for r in rows]

    async def get(self, name: str) -> Collection:
        async with self._conn() as conn:
            return await self._get(conn, name)

    async def _get(self, conn: psycopg.AsyncConnection, name: str, lock: str = "") -> Collection:
        if not isinstance(name, str) or not NAME.match(name):
            raise NotFound(f"no collection named {str(name)[:100]!r}")
        cur = conn.cursor(row_factory=dict_row)
        query = "SELECT * FROM vitserve_collections WHERE name = %s" + (f" FOR {lock}" if lock else "")
        row = await (await cur.execute(query, (name,))).fetchone()
        if row is None:
            self._cache.pop(name, None)
            raise NotFound(f"no collection named {name!r}")
        coll = self._cache[name] = _collection(row)
        return coll

    async def delete(self, name: str) -> None:
        async with self._conn() as conn, conn.transaction():
            coll = await self._get(conn, name, lock="UPDATE")
            await conn.execute("DELETE FROM vitserve_collections WHERE id = %s", (coll.id,))
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(coll.table))
        self._cache.pop(name, None)

    # ---------------------------------------------------------------------------------------- items

    async def add(self, name: str, items: Sequence[NewItem], binding: Binding | None = None) -> list[str]:
        """Insert `items` in one transaction; Conflict naming an id present already or repeated. With `binding`,
        the collection must still be bound to it (checked under the same lock as the insert)."""
        ids = [it.id for it in items]
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                raise Conflict(f"item id {i[:100]!r} appears more than once in the request")
            seen.add(i)
        async with self._conn() as conn, conn.transaction():
            coll = await self._get(conn, name, lock="KEY SHARE")  # a delete of the collection waits; adds do not
            if binding is not None and coll.binding != binding:
                raise Conflict(f"collection {name!r} is bound to another model; nothing was added")
            for it in items:
                check_vector(it.vector, coll.dim, coll.metric, f"item {it.id[:100]!r}")
            present = await (
                await conn.execute(sql.SQL("SELECT id FROM {} WHERE id = ANY(%s) LIMIT 5").format(coll.table), (ids,))
            ).fetchall()
            if present:
                listed = ", ".join(repr(r[0][:100]) for r in present)
                raise Conflict(f"collection {name!r} already holds item id(s) {listed}; nothing was added")
            try:
                async with conn.cursor() as cur:
                    copy_sql = sql.SQL("COPY {} (id, embedding, metadata, thumbnail) FROM STDIN WITH (FORMAT BINARY)")
                    async with cur.copy(copy_sql.format(coll.table)) as copy:
                        copy.set_types(["text", "vector", "jsonb", "bytea"])
                        for it in items:
                            await copy.write_row((it.id, it.vector, Jsonb(it.metadata), it.thumbnail))
            except psycopg.errors.UniqueViolation:  # added by another request since the check above
                raise Conflict(f"collection {name!r} already holds one of these ids; nothing was added") from None
            await conn.execute(
                "UPDATE vitserve_collections SET count = count + %s WHERE id = %s", (len(items), coll.id)
            )
        return ids

    async def items(self, name: str, cursor: str | None, limit: int) -> tuple[list[dict], str | None]:
        after = 0
        if cursor:
            if not cursor.isdigit() or len(cursor) > 18:
                raise Invalid("cursor must be a value of 'next' from an earlier page")
            after = int(cursor)
        async with self._conn() as conn:
            coll = await self._get(conn, name)
            rows = await (
                await conn.execute(
                    sql.SQL("SELECT seq, id, metadata FROM {} WHERE seq > %s ORDER BY seq LIMIT %s").format(coll.table),
                    (after, limit + 1),
                )
            ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        page = [{"id": r[1], "metadata": r[2]} for r in rows]
        return page, (str(rows[-1][0]) if more else None)

    async def item(self, name: str, item_id: str) -> dict:
        _known_id(name, item_id)
        async with self._conn() as conn:
            coll = await self._get(conn, name)
            row = await (
                await conn.execute(
                    sql.SQL("SELECT id, metadata, thumbnail IS NOT NULL FROM {} WHERE id = %s").format(coll.table),
                    (item_id,),
                )
            ).fetchone()
        if row is None:
            raise NotFound(f"collection {name!r} holds no item {item_id[:100]!r}")
        return {"id": row[0], "metadata": row[1], "has_thumbnail": bool(row[2])}

    async def thumbnail(self, name: str, item_id: str) -> bytes:
        _known_id(name, item_id)
        async with self._conn() as conn:
            coll = await self._get(conn, name)
            row = await (
                await conn.execute(sql.SQL("SELECT thumbnail FROM {} WHERE id = %s").format(coll.table), (item_id,))
            ).fetchone()
        if row is None:
            raise NotFound(f"collection {name!r} holds no item {item_id[:100]!r}")
        if row[0] is None:
            raise NotFound(f"no thumbnail was kept for item {item_id[:100]!r}")
        return bytes(row[0])

    async def delete_item(self, name: str, item_id: str) -> None:
        _known_id(name, item_id)
        async with self._conn() as conn, conn.transaction():
            coll = await self._get(conn, name, lock="KEY SHARE")
            row = await (
                await conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s RETURNING 1").format(coll.table), (item_id,))
            ).fetchone()
            if row is None:
                raise NotFound(f"collection {name!r} holds no item {item_id[:100]!r}")
            await conn.execute("UPDATE vitserve_collections SET count = count - 1 WHERE id = %s", (coll.id,))

    async def vector_of(self, name: str, item_id: str) -> np.ndarray:
        _known_id(name, item_id)
        async with self._conn() as conn:
            coll = await self._get(conn, name)
            row = await (
                await conn.execute(sql.SQL("SELECT embedding FROM {} WHERE id = %s").format(coll.table), (item_id,))
            ).fetchone()
        if row is None:
            raise NotFound(f"collection {name!r} holds no item {item_id[:100]!r}")
        return np.asarray(row[0].to_numpy() if hasattr(row[0], "to_numpy") else row[0], dtype=np.float32)

    # ---------------------------------------------------------------------------------------- search

    async def describe(self, name: str) -> Collection:
        """The collection as this process last saw it (its count may be stale): what searches need, without a
        round trip. A collection deleted or made anew elsewhere has a new items table, so a stale entry shows
        as a missing table, and the search that meets it looks the collection up again."""
        coll = self._cache.get(name)
        if coll is None:
            coll = await self.get(name)
        return coll

    async def search(
        self,
        name: str,
        vector: object,
        k: int,
        where: dict | None = None,
        exclude: str | None = None,
        exact: bool = False,
        ef_search: int | None = None,
        binding: Binding | None = None,
    ) -> tuple[Collection, list[dict]]:
        """The k nearest items to `vector` (best first) whose metadata has every key of `where` equal, leaving
        out the item `exclude`. `exact` skips the index (the bench's ground truth). With `binding` (a search by
        image), the collection must still be bound to it."""
        if not 1 <= k <= MAX_K:
            raise Invalid(f"k must be between 1 and {MAX_K}, not {k}")
        where = check_filter(where)
        for attempt in (0, 1):
            coll = await self.describe(name)
            if binding is not None and coll.binding != binding:
                raise Conflict(f"collection {name!r} is bound to another model")
            try:
                return coll, await self._search(coll, vector, k, where, exclude, exact, ef_search)
            except psycopg.errors.UndefinedTable:
                self._cache.pop(name, None)
                if attempt:
                    raise NotFound(f"no collection named {name!r}") from None
        raise AssertionError("unreachable")

    async def _search(
        self,
        coll: Collection,
        vector: object,
        k: int,
        where: dict,
        exclude: str | None,
        exact: bool,
        ef_search: int | None,
    ) -> list[dict]:
        q = check_vector(vector, coll.dim, coll.metric, "the query")
        conds: list[sql.Composable] = []
        params: list[Any] = [q]
        for key, value in where.items():
            conds.append(sql.SQL("metadata -> %s = %s"))
            params += [key, Jsonb(value)]
        if exclude is not None:
            conds.append(sql.SQL("id <> %s"))
            params.append(exclude)
        query = sql.SQL(
            "SELECT id, metadata, embedding {} %s AS distance FROM {} {} ORDER BY distance LIMIT %s"
        ).format(
            sql.SQL(OPERATOR[coll.metric]),
            coll.table,
            sql.SQL("WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL(""),
        )
        params.append(k)
        rows: list = []
        ef = max(k, ef_search or EF_SEARCH)
        async with self._conn() as conn:
            if coll.index == "hnsw" and not exact:
                if ef == EF_SEARCH:  # the session's settings (`_configure`)
                    rows = await (await conn.execute(query, params)).fetchall()
                else:
                    async with conn.pipeline(), conn.transaction():
                        await conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(min(ef, MAX_K)),))
                        cur = await conn.execute(query, params)
                    rows = await cur.fetchall()
            if len(rows) < k:
                # fewer than k: the index scan stopped early (its tuple cap, a filter matching few rows), the
                # collection holds fewer than k matches, or there is no index: an exact scan finds them all
                async with conn.pipeline(), conn.transaction():
                    await conn.execute(
                        "SELECT set_config('enable_indexscan', 'off', true), set_config('enable_seqscan', 'on', true)"
                    )
                    cur = await conn.execute(query, params)
                rows = await cur.fetchall()
        return [{"id": r[0], "score": score_of(coll.metric, float(r[2])), "metadata": r[1]} for r in rows]


def _known_id(name: str, item_id: str) -> None:
    """An id no item can have (PostgreSQL's text holds no NUL) is simply absent."""
    if "\x00" in item_id:
        raise NotFound(f"collection {name!r} holds no such item")


class Redact(logging.Filter):
    """Replaces secrets (a connection URL, its password, the data folder) in the log records of a logger."""

    def __init__(self, secrets: Sequence[str], label: str = "<redacted>"):
        super().__init__()
        self.secrets = [s for s in secrets if s]
        self.label = label

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if any(s in text for s in self.secrets):
            for secret in self.secrets:
                text = text.replace(secret, self.label)
            record.msg, record.args = text, ()
        return True


def redact_loggers(secrets: Sequence[str], names: Sequence[str] = ("psycopg", "psycopg.pool")) -> None:
    """Keep `secrets` out of the driver's and the pool's own log lines (a failed reconnection quotes the
    server it tried)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, Redact) and f.secrets == list(secrets) for f in logger.filters):
            logger.addFilter(Redact(secrets))


def psycopg_pool_timeout() -> type[Exception]:
    from psycopg_pool import PoolTimeout

    return PoolTimeout


def _collection(row: dict) -> Collection:
    binding = Binding(row["model"], row["model_sha256"], list(row["image_size"]), row["pool"], row["preprocess"])
    return Collection(
        row["id"],
        row["name"],
        binding,
        row["metric"],
        row["dim"],
        row["thumbnails"],
        row["index_kind"],
        int(row["count"]),
    )


def elapsed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)
