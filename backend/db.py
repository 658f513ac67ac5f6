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


class CopyError(RuntimeError):
    """:func:`copy_database` refused: the target already holds faceloop rows, or both URLs are one."""


def _tables():
    """faceloop's tables (``backend.models`` and the acceptance counts), from the metadata."""
    import backend.acceptance  # noqa: F401  (registers PrelabelAcceptance)
    import backend.models  # noqa: F401
    from sqlmodel import SQLModel

    return list(SQLModel.metadata.sorted_tables)


def copy_database(source: str, target: str, batch: int = 200, on_table=None) -> dict[str, int]:
    """Copy every faceloop row from database ``source`` to database ``target`` (e.g. the default
    SQLite file to a new PostgreSQL database, when a second machine joins). Both are upgraded to
    the newest schema first (:func:`get_engine`); the target must hold no faceloop row.

    Rows keep their ids. Foreign keys that may be empty (``project.promoted_version_id``,
    ``modelversion.parent_id``) are written after every row is in, so the cycle project ⇄ model
    version needs no deferred constraints; PostgreSQL's id sequences are moved past the copied ids.
    Rows are read ``batch`` at a time (model files are a few MB each). One transaction on the
    target: a failure leaves it empty.

    Args:
        on_table: called ``(table name, rows copied)`` after each table (progress).
    Returns: rows copied per table.
    Raises: CopyError when ``target`` already holds rows or is ``source``; SQLAlchemy's errors
        when either database cannot be reached.
    """
    from sqlalchemy import func, or_, select, update

    if source == target:
        raise CopyError("the source and the target are the same database")
    tables = _tables()
    src, dst = get_engine(source), get_engine(target)
    with dst.connect() as c:
        full = [t.name for t in tables if c.execute(select(func.count()).select_from(t)).scalar()]
    if full:
        raise CopyError(f"the target already holds faceloop rows (tables {', '.join(full)}); "
                        "copy into a new, empty database")
    # insert order: tables only after those their NOT NULL foreign keys point to
    later = {t.name: [c for c in t.columns if c.foreign_keys and c.nullable] for t in tables}
    order, done = [], set()
    while len(order) < len(tables):
        before = len(order)
        for t in tables:
            needs = {fk.column.table.name for c in t.columns if not c.nullable for fk in c.foreign_keys}
            if t.name not in done and needs <= done:
                order.append(t)
                done.add(t.name)
        if len(order) == before:  # a cycle of NOT NULL foreign keys: not in faceloop's schema
            raise CopyError(f"no insert order for tables {sorted(set(x.name for x in tables) - done)}")
    counts: dict[str, int] = {}
    with src.connect() as r, dst.begin() as w:
        for t in order:
            deferred = later[t.name]
            pk = list(t.primary_key.columns)
            n = 0
            result = r.execution_options(yield_per=batch).execute(select(t).order_by(*pk))
            for rows in result.partitions(batch):
                w.execute(t.insert(), [{**row._mapping, **{c.name: None for c in deferred}} for row in rows])
                n += len(rows)
            counts[t.name] = n
            if on_table:
                on_table(t.name, n)
        for t in order:
            if not later[t.name]:
                continue
            pk = list(t.primary_key.columns)
            cols = pk + later[t.name]
            for row in r.execute(select(*cols).where(or_(*[c.is_not(None) for c in later[t.name]]))).all():
                m = row._mapping
                w.execute(update(t).where(*[c == m[c.name] for c in pk])
                          .values({c.name: m[c.name] for c in later[t.name]}))
        if dst.dialect.name == "postgresql":
            for t in order:
                for c in t.primary_key.columns:
                    if c.autoincrement is True or (c.autoincrement == "auto" and c.type.python_type is int):
                        w.execute(text(f"SELECT setval(pg_get_serial_sequence('{t.name}', '{c.name}'), "
                                       f"GREATEST(COALESCE((SELECT MAX({c.name}) FROM {t.name}), 0), 1), "
                                       f"(SELECT MAX({c.name}) FROM {t.name}) IS NOT NULL)"))
    return counts
