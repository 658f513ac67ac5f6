"""The model version store: every file of a model version lives in the database; each process
keeps a verified local copy under its own ``MODEL_DIR``.

Why the database and not an S3-compatible bucket: faceloop needs the database anyway (SQLite on
one machine, PostgreSQL across machines), so workers on other machines need nothing else to read a
version; a bucket would be one more service, credential and failure mode. A version is a few MB
(measured: 6.6 MB; detector 5.2 MB, face-crop classifier 1.3 MB, plots 0.3 MB; about 18 MB with
both stages' ONNX exports), written once per training.
Limits: a single file is held in memory while stored or read, and PostgreSQL's ``bytea`` takes at
most 1 GB per value; :data:`MAX_FILE_BYTES` (256 MiB) refuses anything near that with a clear error.
Large objects / a bucket are the way if versions ever grow to hundreds of MB.

Layout: one :class:`backend.models.ModelArtifact` row per file (project, version, file name,
SHA-256, size, bytes). The local copy of version ``v`` of project ``p`` is the folder
``<MODEL_DIR>/project_<p>/<v>/`` (the folder the worker used to write, so a machine that had
versions on disk before the store keeps serving them). :func:`materialise` writes missing or
changed files there (temporary file in the same folder, fsync, ``os.replace``; the bundle JSON
last, so a bundle that is visible always has its weights) after checking each file's SHA-256.

Used by the backend (``/predict``, the status page's plots) and the worker (training continues
from the promoted version, scoring, evaluation); it sits beside both, not inside one of them. It
imports only the shared database layer (``backend.db``, ``backend.models``, ``backend.config``).

The shipped default model (``models/faceloop-default.json`` and its weights) is part of the code
package and is never stored: :func:`model_path` finds it in this machine's checkout.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path, PurePosixPath

from sqlmodel import Session, select

from backend.config import Settings
from backend.db import session_scope
from backend.hashing import file_sha256
from backend.models import ModelArtifact, ModelVersion
from facemodels.files import atomic_write

#: Largest single file stored (bytes); PostgreSQL's bytea holds at most 1 GB per value.
MAX_FILE_BYTES = 256 * 1024 * 1024

#: Seconds :func:`model_path` trusts its last answer for a version (files added to a stored
#: version later, e.g. an export, reach this machine within this time); keeps ``/predict`` from
#: asking the database on every request.
RECHECK_S = 30.0

# (database URL, MODEL_DIR, project, version, path, sha256) -> (local path, time checked)
_resolved: dict[tuple, tuple[Path, float]] = {}
# (path, size, mtime_ns) -> sha256 of local files already checked by this process
_verified: dict[tuple[str, int, int], str] = {}
_verified_lock = threading.Lock()


class ArtifactError(ValueError):
    """A stored file is unusable: bad name, too large, or its bytes do not match its SHA-256."""


def check_name(name: str) -> str:
    """``name`` if it is a safe relative POSIX path inside a version folder.

    Raises: ArtifactError for absolute paths, ``..``, empty parts, backslashes or hidden files.
    """
    p = PurePosixPath(name)
    if (not name or "\\" in name or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts)
            or any(part.startswith(".") for part in p.parts) or str(p) != name):
        raise ArtifactError(f"not a file name inside a model version folder: {name!r}")
    return name


def version_dir(settings: Settings, project_id: int, version: str) -> Path:
    """This machine's folder of a version: ``<MODEL_DIR>/project_<id>/<version>``."""
    return Path(settings.model_dir) / f"project_{int(project_id)}" / check_name(version)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _local_sha(path: Path) -> str | None:
    """SHA-256 of a local file, computed once per (path, size, mtime) in this process; None if absent."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _verified_lock:
        sha = _verified.get(key)
    if sha is None:
        sha = file_sha256(path)
        with _verified_lock:
            _verified[key] = sha
    return sha


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``folder`` as ``(POSIX name relative to folder, path)``, sorted;
    hidden files and folders (temporary files) and symbolic links are left out."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or p.is_symlink() or not p.is_file():
            continue
        out.append((rel.as_posix(), p))
    return out


def store_files(s: Session, project_id: int, version: str, files: list[tuple[str, Path]]) -> list[ModelArtifact]:
    """Store files of version ``version`` (in the caller's transaction: commit with the version row).

    Args:
        files: ``(name, local path)``; ``name`` is the file's path inside the version folder.
    Returns: the rows (new, or existing with the same bytes).
    Raises: ArtifactError when a name is unsafe, a file is over :data:`MAX_FILE_BYTES`, or the
        version already holds a different file of that name (versions never change);
        FileNotFoundError when a path is missing.
    """
    rows = []
    for name, path in files:
        check_name(name)
        size = Path(path).stat().st_size
        if size > MAX_FILE_BYTES:
            raise ArtifactError(f"{name} of {version} is {size} bytes; the store takes files up to "
                                f"{MAX_FILE_BYTES} bytes")
        data = Path(path).read_bytes()
        sha = _sha(data)
        old = s.exec(select(ModelArtifact).where(ModelArtifact.project_id == project_id,
                                                 ModelArtifact.version == version, ModelArtifact.name == name)).first()
        if old is not None:
            if old.sha256 != sha:
                raise ArtifactError(f"{version} already has a different {name} (sha256 {old.sha256[:12]}...)")
            rows.append(old)
            continue
        row = ModelArtifact(project_id=project_id, version=version, name=name, sha256=sha, size=len(data), data=data)
        s.add(row)
        rows.append(row)
    s.flush()
    return rows


def store_folder(s: Session, project_id: int, version: str, folder: Path) -> list[ModelArtifact]:
    """Store every file of a version folder (:func:`folder_files`); see :func:`store_files`."""
    files = folder_files(folder)
    if not files:
        raise FileNotFoundError(f"model version folder {folder} holds no file")
    return store_files(s, project_id, version, files)


def listing(s: Session, project_id: int, version: str) -> list[tuple[str, str, int]]:
    """``(name, sha256, size)`` of a version's stored files (no bytes read), by name."""
    q = select(ModelArtifact.name, ModelArtifact.sha256, ModelArtifact.size).where(
        ModelArtifact.project_id == project_id, ModelArtifact.version == version).order_by(ModelArtifact.name)
    return [tuple(r) for r in s.exec(q).all()]


def _write_atomic(dest: Path, data: bytes) -> None:
    with atomic_write(dest) as f:
        f.write(data)


def materialise(settings: Settings, project_id: int, version: str) -> Path | None:
    """Make this machine's copy of a stored version complete and correct; its folder.

    Files already present with the stored SHA-256 are kept (each local file is hashed once per
    process while its size and mtime stay the same); missing or different ones are read from the
    database, checked against their SHA-256 and written atomically. ``.json`` files come last.
    Safe when several processes of one machine do it at once (each writes its own temporary file).

    Returns: the folder, or None when the database holds no file of that version.
    Raises: ArtifactError when stored bytes do not match their SHA-256 (nothing is written then).
    """
    with session_scope(settings.database_url) as s:
        files = listing(s, project_id, version)
    if not files:
        return None
    folder = version_dir(settings, project_id, version)
    todo = [name for name, sha, size in files if _local_sha(folder / check_name(name)) != sha]
    todo.sort(key=lambda n: (n.endswith(".json"), n))
    for name in todo:
        with session_scope(settings.database_url) as s:
            row = s.exec(select(ModelArtifact).where(ModelArtifact.project_id == project_id,
                                                     ModelArtifact.version == version,
                                                     ModelArtifact.name == name)).first()
            data, sha = bytes(row.data), row.sha256
        if _sha(data) != sha:
            raise ArtifactError(f"stored {name} of {version} does not match its sha256: the database copy is damaged")
        _write_atomic(folder / name, data)
    return folder


def stored_bytes(settings: Settings, project_id: int, version: str, name: str) -> bytes | None:
    """The bytes of one stored file (checked against its SHA-256), or None when not stored."""
    with session_scope(settings.database_url) as s:
        row = s.exec(select(ModelArtifact).where(ModelArtifact.project_id == project_id,
                                                 ModelArtifact.version == version, ModelArtifact.name == name)).first()
        if row is None:
            return None
        data, sha = bytes(row.data), row.sha256
    if _sha(data) != sha:
        raise ArtifactError(f"stored {name} of {version} does not match its sha256: the database copy is damaged")
    return data


def model_path(settings: Settings, v: ModelVersion) -> Path:
    """The local file to load for version ``v`` (a bundle ``.json`` or YOLO ``.pt``), ready to use.

    A stored version is materialised (:func:`materialise`) and its entry file is the one named
    like ``v.path``'s last part. A version without stored files is the shipped default (found in
    this checkout by its SHA-256 when ``v.path`` is another machine's) or a version written to
    this machine's disk before the store existed (``v.path`` as is).

    The answer is reused for :data:`RECHECK_S` seconds while its file exists.

    Raises: FileNotFoundError when the version is nowhere to be found (the message says where it
        was looked for); ArtifactError as :func:`materialise`.
    """
    key = (settings.database_url, str(settings.model_dir), v.project_id, v.version, v.path, v.sha256)
    with _verified_lock:
        hit = _resolved.get(key)
    if hit is not None and time.monotonic() - hit[1] < RECHECK_S and hit[0].is_file():
        return hit[0]
    path = _model_path(settings, v)
    with _verified_lock:
        _resolved[key] = (path, time.monotonic())
    return path


def _model_path(settings: Settings, v: ModelVersion) -> Path:
    folder = materialise(settings, v.project_id, v.version)
    if folder is not None:
        entry = folder / Path(v.path).name
        if not entry.is_file():
            raise FileNotFoundError(f"model version {v.version} has no stored file {Path(v.path).name}")
        return entry
    p = Path(v.path)
    if p.is_file():
        return p
    default = Path(settings.default_model_path)
    if default.is_file() and _local_sha(default.resolve()) == v.sha256:
        return default
    raise FileNotFoundError(f"model version {v.version} is neither in the database's model store nor at {p} "
                            f"(nor is it the shipped default {default})")


def adopt_local_versions(settings: Settings) -> list[str]:
    """Store the versions this machine trained before the store existed (issue 12): every
    ``modelversion`` row with no stored file whose files lie in this machine's ``MODEL_DIR``
    (a bundle's folder ``<MODEL_DIR>/project_<id>/<version>/``, or a single ``.pt`` of the first
    release) gets them stored, so that workers on other machines can use it. The shipped default
    and versions whose files are not here are left alone. Safe to repeat and to run from several
    processes (a file already stored with the same bytes is kept; a concurrent insert of the same
    file fails that version's transaction only, and the other process stored it).

    Returns: the names of the versions stored now.
    """
    from sqlalchemy.exc import IntegrityError

    store = Path(settings.model_dir).resolve()
    with session_scope(settings.database_url) as s:
        stored = set(s.exec(select(ModelArtifact.project_id, ModelArtifact.version).distinct()).all())
        todo = [(v.project_id, v.version, v.path) for v in s.exec(select(ModelVersion)).all()
                if (v.project_id, v.version) not in stored]
    done = []
    for pid, version, path in todo:
        p = Path(path)
        try:
            rp = p.resolve()
            if not p.is_file() or not rp.is_relative_to(store):
                continue
            if rp.suffix == ".json" and rp.parent == (store / f"project_{pid}" / version).resolve():
                files = folder_files(rp.parent)
            elif rp.suffix == ".pt":
                files = [(rp.name, rp)]
            else:
                continue
            with session_scope(settings.database_url) as s:
                store_files(s, pid, version, files)
            done.append(version)
        except (OSError, ArtifactError, IntegrityError) as e:
            import logging

            logging.getLogger(__name__).warning("model version %s not stored in the database: %s", version, e)
    return done


#: File name endings of weights (what :func:`prune` removes); plots, CSVs and bundle JSONs stay.
WEIGHT_SUFFIXES = (".pt", ".onnx", ".onnx.data")


def prune(settings: Settings, keep_retired: int = 2, dry_run: bool = True,
          project_id: int | None = None) -> list[dict]:
    """Free the space of weights no process will load again (each version holds about 18 MB).

    Per project, the weight files (:data:`WEIGHT_SUFFIXES`) of ``rejected`` versions and of
    ``retired`` versions older than the newest ``keep_retired`` (by promotion time) are deleted
    from the database and from this machine's ``MODEL_DIR``. Never touched: the ``promoted``
    version, ``candidate`` versions (a training may be evaluating them), the shipped default, and
    every version's rows, metrics, plots and bundle JSON (the status page keeps showing them).
    PostgreSQL returns the space to the database after (auto)vacuum; SQLite's file shrinks only
    after ``VACUUM``.

    Args:
        keep_retired: retired versions whose weights are kept per project (0 or more).
        dry_run: True lists what would go and deletes nothing.
        project_id: one Label Studio project, or None for all.
    Returns: one dict per version pruned (or to prune): ``project_id``, ``version``, ``status``,
        ``files`` (names), ``bytes``.
    Raises: ValueError when ``keep_retired`` is negative.
    """
    if keep_retired < 0:
        raise ValueError(f"keep_retired must be 0 or more, not {keep_retired}")
    from sqlalchemy import delete

    out = []
    with session_scope(settings.database_url) as s:
        q = select(ModelVersion).where(ModelVersion.status.in_(("rejected", "retired")))
        if project_id is not None:
            q = q.where(ModelVersion.project_id == project_id)
        versions = s.exec(q).all()
        retired: dict[int, list[ModelVersion]] = {}
        for v in versions:
            if v.status == "retired":
                retired.setdefault(v.project_id, []).append(v)
        kept = set()
        for vs in retired.values():
            vs.sort(key=lambda v: (v.promoted_at or v.created_at, v.id), reverse=True)
            kept.update(v.id for v in vs[:keep_retired])
        for v in sorted(versions, key=lambda v: (v.project_id, v.id)):
            if v.id in kept:
                continue
            files = [(name, size) for name, _sha, size in listing(s, v.project_id, v.version)
                     if name.endswith(WEIGHT_SUFFIXES)]
            if not files:
                continue
            names = [n for n, _ in files]
            out.append({"project_id": v.project_id, "version": v.version, "status": v.status,
                        "files": names, "bytes": sum(size for _, size in files)})
            if dry_run:
                continue
            s.exec(delete(ModelArtifact).where(ModelArtifact.project_id == v.project_id,
                                               ModelArtifact.version == v.version,
                                               ModelArtifact.name.in_(names)))
            folder = version_dir(settings, v.project_id, v.version)
            for name in names:
                (folder / name).unlink(missing_ok=True)
    return out
