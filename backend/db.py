"""Database engine, sessions and schema migrations (SQLModel over SQLAlchemy; Alembic).

SQLite (``sqlite:///<var_dir>/faceloop.db``) is the default; PostgreSQL works with a
``postgresql+psycopg://user:password@host:5432/faceloop`` URL (psycopg 3). The schema is
Alembic's (``backend/migrations``): :func:`get_engine` upgrades a database to the newest
revision the first time a process uses it, so the backend, the Celery worker and the CLI
(``faceloop up`` included) all start on the current schema. Add a migration with
:func:`make_migration` (README, "Database").
"""

from __future__ import annotations

import fcntl
import logging
import threading
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event, inspect, text
from sqlmodel import Session, create_engine

log = logging.getLogger(__name__)
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # "setup plugin ..." on every start

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: The revision whose schema equals what ``SQLModel.metadata.create_all`` made before migrations.
BASELINE_REVISION = "0001_baseline"
#: Key of the PostgreSQL advisory lock that serialises upgrades of one database (ASCII "fcl1").
_PG_LOCK_KEY = 0x66636C31

_engines: dict[str, object] = {}
_lock = threading.Lock()


def _sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL; None for other databases and in-memory SQLite."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1].split("?", 1)[0]
    return None if not path or path == ":memory:" else path


def _create_engine(url: str):
    kwargs = {}
    if url.startswith("sqlite"):
        path = _sqlite_path(url)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    eng = create_engine(url, pool_pre_ping=True, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(eng, "connect")
        def _pragmas(dbapi_conn, _rec):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    return eng


def get_engine(url: str):
    """Engine for ``url``, created once per process; the schema is upgraded to the newest
    migration on first use (:func:`upgrade_schema`).

    SQLite gets WAL mode and a 30 s busy timeout so the backend and the worker can share the file.
    Raises: sqlalchemy.exc.OperationalError when the database cannot be reached; alembic's
        errors when the database holds a revision this code does not know (a newer faceloop's).
    """
    with _lock:
        eng = _engines.get(url)
        if eng is None:
            eng = _create_engine(url)
            _upgrade(eng, url)
            _engines[url] = eng
        return eng


def alembic_config(url: str | None = None):
    """Alembic configuration in code: ``script_location`` = ``backend/migrations`` (no alembic.ini,
    no dependency on the working directory); ``url`` as ``sqlalchemy.url`` when given."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextmanager
def _file_lock(url: str):
    """An exclusive lock on ``<database file>.migrate.lock`` (SQLite: processes of one machine)."""
    path = _sqlite_path(url)
    if path is None:
        yield
        return
    with open(path + ".migrate.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _upgrade(eng, url: str, revision: str = "head", down: bool = False) -> None:
    from alembic import command
    from alembic.util.exc import CommandError

    cfg = alembic_config(url)
    with _file_lock(url), eng.begin() as conn:
        if conn.dialect.name == "postgresql":  # one upgrader per database; the others wait, then find it done
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" not in tables and tables & {"project", "modelversion", "trainingjob"}:
            # made by create_all before migrations: the baseline keeps its tables, adds any it lacks
            log.warning("database %s predates migrations: adopting it at revision %s",
                        eng.url.render_as_string(hide_password=True), BASELINE_REVISION)
        cfg.attributes["connection"] = conn
        try:
            (command.downgrade if down else command.upgrade)(cfg, revision)
        except CommandError as e:
            from alembic.runtime.migration import MigrationContext

            current = MigrationContext.configure(conn).get_current_revision()
            raise RuntimeError(f"database {eng.url.render_as_string(hide_password=True)} is at schema revision "
                               f"{current!r}, which this faceloop does not know (written by a newer faceloop?): "
                               f"{e}") from e


def upgrade_schema(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (default: the newest), now.

    Safe to run from several processes at once: PostgreSQL serialises them with an advisory lock
    held for the upgrade's transaction, SQLite with a file lock beside the database. A database
    created by ``create_all`` before migrations (tables, no ``alembic_version``) is adopted:
    the baseline revision keeps its tables and data and creates only the tables it lacks.
    """
    if revision == "head":
        get_engine(url)
        return
    eng = _create_engine(url)
    try:
        _upgrade(eng, url, revision)
    finally:
        eng.dispose()


def downgrade_schema(url: str, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision`` (``"base"``: drop every table; data is lost).
    A process that already uses ``url`` keeps its engine: call :func:`forget_engine` first."""
    eng = _create_engine(url)
    try:
        _upgrade(eng, url, revision, down=True)
    finally:
        eng.dispose()


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at (None: not under migrations)."""
    from alembic.runtime.migration import MigrationContext

    eng = _create_engine(url)
    try:
        with eng.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        eng.dispose()


def head_revision() -> str:
    """The newest revision in ``backend/migrations/versions``."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def make_migration(url: str, message: str) -> list:
    """Write a new revision file in ``backend/migrations/versions`` with the operations that take
    the database at ``url`` (upgraded to the newest revision first) to the models' schema
    (Alembic autogenerate; review the file before committing it).

    Returns: alembic's Script objects of the revisions written.
    """
    from alembic import command

    get_engine(url)
    return command.revision(alembic_config(url), message=message, autogenerate=True)


def insert_missing(s: Session, row) -> bool:
    """INSERT ``row`` (a SQLModel table object) in the session's transaction unless a row with the
    same primary or unique key exists: ``INSERT ... ON CONFLICT DO NOTHING`` (SQLite >= 3.24,
    PostgreSQL >= 9.5). Two processes creating the same row at once: one inserts, the other waits
    for it and does nothing; neither fails. ``row`` itself is not added to the session.

    Returns: True when this call inserted the row.
    Raises: NotImplementedError on other databases.
    """
    table = type(row).__table__
    values = {c.name: getattr(row, c.name) for c in table.columns if getattr(row, c.name, None) is not None}
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"insert_missing: no ON CONFLICT DO NOTHING for {dialect}")
    return s.connection().execute(insert(table).values(**values).on_conflict_do_nothing()).rowcount == 1


@contextmanager
def session_scope(url: str):
    """A session that commits on success and rolls back on error."""
    with Session(get_engine(url), expire_on_commit=False) as s:
        try:
            yield s
            s.commit()
        except Exception:
            s.rollback()
            raise


def forget_engine(url: str) -> None:
    """Close the pooled connections of ``url``'s engine and forget it (before dropping that
    database; the next :func:`get_engine` makes a new one)."""
    with _lock:
        eng = _engines.pop(url, None)
    if eng is not None:
        eng.dispose()
