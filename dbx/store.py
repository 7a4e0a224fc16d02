"""The MLflow store itself: is it usable, and one lock so that parallel runs cannot break it.

Two things go wrong with a local sqlite store that MLflow does not guard against:

- Several ``dbx run``s started at once on a fresh store (a sweep's points run in parallel) race in
  MLflow's schema migration (``table _alembic_tmp_latest_metrics already exists``) and in creating
  the same experiment (``UNIQUE constraint failed``); a migration that loses the race can leave
  the store unusable. So every process builds the store, and gets or creates its experiment,
  holding an exclusive ``flock`` on ``.<store file>.lock`` beside the store. The kernel drops the
  lock when its process dies, so a killed run never leaves it held.
- A store that cannot work (a garbage file, an immutable file, a folder where the file should be,
  a server that is not listening) makes MLflow retry for minutes or print a traceback. They are
  found here first, in milliseconds, and reported in one line that names the store.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from dbx.errors import UserError

SQLITE_HEADER = b"SQLite format 3\x00"
SERVER_TIMEOUT_S = 3.0


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def lock_path(database: Path) -> Path:
    return database.with_name(f".{database.name}.lock")


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold the store's lock file (sqlite stores only; a server serialises its own writes)."""
    database = sqlite_path(uri)
    if database is None:
        yield
        return
    import fcntl

    try:
        descriptor = os.open(lock_path(database), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only folder: nothing here can create or migrate the store, nor race
        yield
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def check_store(uri: str, *, writing: bool = True) -> None:
    """Fail early, before any training, when the store cannot be reached, read or (``writing``)
    written. A missing sqlite file is fine for writing (MLflow creates it)."""
    database = sqlite_path(uri)
    if database is not None:
        _check_sqlite(uri, database, writing)
    elif "://" not in uri and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise UserError(f"tracking store {uri} is a folder; MLflow 3 no longer writes folder stores. "
                        f"Use a database file instead, e.g. --tracking-uri sqlite:///{uri.rstrip('/')}/mlflow.db")
    elif uri.startswith(("http://", "https://")):
        check_server(uri)


def _check_sqlite(uri: str, database: Path, writing: bool) -> None:
    folder = database.parent
    if not folder.is_dir():
        raise UserError(f"tracking store {uri}: folder {folder} does not exist. Create it or choose "
                        f"another --tracking-uri.")
    if writing and not os.access(folder, os.W_OK):
        raise UserError(f"tracking store {uri}: folder {folder} is not writable. Choose another --tracking-uri.")
    if database.is_dir():
        raise UserError(f"tracking store {uri} is a folder, not a database file. Point --tracking-uri at "
                        f"a file inside it, e.g. sqlite:///{database}/mlflow.db")
    if not database.exists():
        return
    if not database.is_file():
        raise UserError(f"tracking store {uri} is not a regular file. Choose another --tracking-uri.")
    try:
        with open(database, "r+b" if writing else "rb") as handle:  # opens only: nothing is written
            header = handle.read(len(SQLITE_HEADER))
    except PermissionError:
        what = "written (read-only or immutable: see ls -l and lsattr)" if writing else "read"
        raise UserError(f"tracking store {uri} cannot be {what}. Make it writable or choose another "
                        f"--tracking-uri.") from None
    except OSError as exc:
        raise UserError(f"tracking store {uri} cannot be opened: {exc.strerror}. Choose another "
                        f"--tracking-uri.") from None
    if header and header != SQLITE_HEADER:
        raise UserError(f"tracking store {uri} is not an SQLite database (it starts with {header[:8]!r}). "
                        f"Move it away or choose another --tracking-uri; dbx leaves it as it is.")


def check_server(uri: str) -> None:
    """A tracking server must answer its health check within seconds (MLflow itself would retry
    for minutes before giving up)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_TIMEOUT_S)  # noqa: S310 - the user's server
    except urllib.error.HTTPError:
        return  # it answered: something is listening there, MLflow reports what it says
    except Exception as exc:  # noqa: BLE001 - any other failure means unreachable
        reason = getattr(exc, "reason", exc)
        raise UserError(f"tracking server {uri} cannot be reached ({reason}). Start it, fix --tracking-uri, "
                        f"or unset MLFLOW_TRACKING_URI to use the local ./mlflow.db.") from None


def client(uri: str) -> Any:
    """An ``MlflowClient`` on a store that is built: on a new sqlite file its tables are created
    (and migrated) under the store's lock, so that parallel first runs cannot race."""
    from mlflow import MlflowClient

    with store_lock(uri):
        try:
            return MlflowClient(tracking_uri=uri)  # builds MLflow's store for this process (it is cached)
        except Exception as exc:  # noqa: BLE001 - sqlalchemy, alembic and MLflow errors alike
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UserError(f"MLflow cannot open the store {uri}: {first}. If its schema migration was cut "
                            f"short, move the file away (keep it) and start a new store.") from exc
