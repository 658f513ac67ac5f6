"""The ``faceloop`` command line (typer).

Main commands: ``up`` (the whole loop on this machine), ``demo`` (the loop driven end to end
from ground-truth labels), ``queue`` (head of the review queue), ``versions``, ``jobs``,
``train`` / ``score`` (what *Start Training* and a promotion do), ``serve``, ``worker``,
``train-base`` (the shipped default model), ``simulate`` (active-learning benchmark).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from backend.config import LABEL_CONFIG_DIR, REPO_ROOT, get_settings

app = typer.Typer(help="faceloop: YOLO pre-annotations, retraining and uncertainty sampling for Label Studio.",
                  no_args_is_help=True, add_completion=False)
console = Console()
#: Terminal width (columns) from which `jobs`, `versions` and `queue` show every column; a narrower
#: terminal (e.g. the classic 80) gets fewer columns, a compact box and one line per row.
WIDE_COLUMNS = 120
DEFAULT_IMAGES = REPO_ROOT.parent / "shared" / "data" / "awake_sleep" / "images" / "val"


@app.callback()
def _check_settings() -> None:
    """Read the settings once before any command, so a bad environment variable (e.g. a misspelt
    QUERY_STRATEGY) is reported in one line instead of a traceback from deep inside."""
    from pydantic import ValidationError

    try:
        get_settings()
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(map(str, err['loc'])).upper()}: {err['msg']}" for err in e.errors())
        console.print(f"[red]invalid setting[/] (environment or .env): {bad}", soft_wrap=True)
        raise typer.Exit(2) from None


def _config_path(name: str) -> Path:
    p = Path(name)
    if p.exists():
        return p
    p = LABEL_CONFIG_DIR / (name if name.endswith(".xml") else f"{name}.xml")
    if not p.exists():
        choices = ", ".join(x.stem for x in LABEL_CONFIG_DIR.glob("*.xml"))
        raise typer.BadParameter(f"no label config {name!r}; choose one of: {choices}, or give a file path")
    return p


def _image_folder(folder: Path) -> Path:
    """The folder ``up`` serves, resolved; a file, a missing path or a folder without images is a
    clear error (exit 2)."""
    from backend.lsapi import IMAGE_SUFFIXES

    if folder.is_file():
        raise typer.BadParameter(f"{folder} is a file, not a folder: give the folder that holds the images")
    if not folder.is_dir():
        raise typer.BadParameter(f"image folder {folder} does not exist")
    folder = folder.resolve()
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*")):
        raise typer.BadParameter(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return folder


def _say_unreadable(folder: Path, shown: int = 10) -> None:
    """Print the image files of ``folder`` that do not read (each is a task that will show Label
    Studio's loading error instead of an image), so a person can replace or remove them now."""
    from backend.images import unreadable_images
    from backend.lsapi import IMAGE_SUFFIXES

    bad, checked, total = unreadable_images(folder, IMAGE_SUFFIXES)
    if bad:
        console.print(f"[yellow]{len(bad)} of the {total} image files are not readable images; their tasks will "
                      "show a loading error in Label Studio and get no pre-annotation (put a readable image "
                      "under the same name and the task shows it; or delete the task in Label Studio; the status "
                      "page lists task errors):[/]", soft_wrap=True)
        for rel, why in bad[:shown]:
            console.print(f"  {rel}: {why}", soft_wrap=True, markup=False, highlight=False)
        if len(bad) > shown:
            console.print(f"  ... and {len(bad) - shown} more", markup=False, highlight=False)
    if checked < total:
        console.print(f"checked {checked} of {total} image files for readability (time limit); the rest are "
                      "checked when they are predicted", soft_wrap=True, markup=False, highlight=False)


def _say_linked_out(folder: Path, shown: int = 5) -> None:
    """Print the image files of ``folder`` that link to files outside it (their tasks show the
    image in Label Studio but get no pre-annotation: ``backend.images.linked_out_images``)."""
    from backend.images import LINKED_OUT_HINT, linked_out_images
    from backend.lsapi import IMAGE_SUFFIXES

    linked, total = linked_out_images(folder, IMAGE_SUFFIXES)
    if linked:
        console.print(f"[yellow]{len(linked)} of the {total} image files are links to files outside {folder}: "
                      f"{LINKED_OUT_HINT}.[/]", soft_wrap=True)
        for rel, target in linked[:shown]:
            console.print(f"  {rel} -> {target}", soft_wrap=True, markup=False, highlight=False)
        if len(linked) > shown:
            console.print(f"  ... and {len(linked) - shown} more", markup=False, highlight=False)


def _images(folder: Path, limit: int | None) -> list[Path]:
    from backend.lsapi import IMAGE_SUFFIXES

    folder = _image_folder(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:limit] if limit else files


def _stack_root() -> Path:
    return get_settings().var_dir / "stack"


def _fail(msg: str, code: int = 1):
    console.print(f"[red]error:[/] {msg}", soft_wrap=True)
    raise typer.Exit(code)


def _use_running_stack() -> dict | None:
    """Point the settings at the stack ``faceloop up`` runs (``VAR_DIR/stack/stack.json``, or
    ``DIR/stack.json`` for ``VAR_DIR=DIR/var`` of an ``up --root DIR``): its Redis,
    Label Studio URL and token. Variables set in the environment win. Returns the state or None."""
    from backend.stack import running_stack

    st = running_stack(_stack_root())
    if not st:  # a stack started with `up --root DIR` keeps its VAR_DIR in DIR/var
        var_dir = get_settings().var_dir
        st = running_stack(var_dir.parent)
        if not st or Path(st.get("var_dir") or "") != var_dir:
            return None
    env = {"LABEL_STUDIO_URL": st.get("ls_url"), "CELERY_BROKER_URL": st.get("redis_url")}
    tok = Path(st.get("token_file") or "")
    if tok.is_file():
        env["LABEL_STUDIO_API_KEY"] = tok.read_text().strip()
    for k, v in env.items():
        if v and not os.environ.get(k):
            os.environ[k] = v
    get_settings.cache_clear()
    return st


def _require_project(project: int) -> None:
    """Exit 1 with a clear message unless ``project`` is known: a row in faceloop's database or a
    project of Label Studio. Nothing is recorded for an unknown project."""
    from backend.models import Project

    if project <= 0:
        _fail(f"project ids are positive integers, got {project}")
    with _db() as s:
        if s.get(Project, project) is not None:
            return
    settings = get_settings()
    where = settings.label_studio_url
    if not settings.label_studio_api_key:
        _fail(f"project {project} is unknown to faceloop, and no Label Studio API key is set to ask {where} "
              f"(start the stack with `faceloop up`, or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")
    from label_studio_sdk import LabelStudio

    from backend.lsapi import api_error_text

    try:
        LabelStudio(base_url=where, api_key=settings.label_studio_api_key, timeout=10).projects.get(id=project)
    except Exception as e:  # noqa: BLE001 - ApiError, connection errors: one clean line
        if getattr(e, "status_code", None) == 404:
            _fail(f"no project {project} in Label Studio at {where}")
        _fail(f"project {project} is unknown to faceloop and Label Studio at {where} could not be asked: "
              f"{api_error_text(e)}")


def _broker_reachable(url: str) -> str | None:
    """None when Redis answers PING at ``url``, else the reason."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{e.__class__.__name__}: {e}"


def _stack_var_dir(root: Path, default: Path) -> Path:
    """faceloop's state folder (VAR_DIR: database, models) for the stack at ``root``: VAR_DIR set
    in the environment wins; else ``default`` for the default stack (``VAR_DIR/stack``) and
    ``root/var`` for any other root (``--root``): two stacks never share a database unless told to.
    """
    if os.environ.get("VAR_DIR") or root == (default / "stack").resolve():
        return default
    return root / "var"


#: Folder under the stack root that Label Studio serves local files from (stacks made since
#: several folders per stack): one symlink per image folder, see :func:`_media_link`.
MEDIA_DIR = "media"


def _choose_document_root(folder: Path, asked: Path | None, recorded: str | None, root: Path) -> Path:
    """Label Studio's LOCAL_FILES_DOCUMENT_ROOT for this ``up``.

    ``asked`` (--document-root) wins; it must be a strict parent of ``folder``. Else the recorded
    one of this stack (task URLs are relative to it, so it never changes). A new stack gets
    ``root/media``, a folder faceloop owns, where each image folder is linked
    (:func:`_media_link`): any number of folders, anywhere, on one stack. A stack made before
    (recorded root = a folder of the user's) serves only folders inside that root; another folder
    is refused with what to do (exit 2), the stack's projects are left as they are.
    """
    media = root / MEDIA_DIR
    if asked:
        doc = Path(asked).resolve()
        if doc not in folder.parents:
            raise typer.BadParameter(f"{folder} is not inside --document-root {doc}: give a parent folder of it "
                                     f"(or leave --document-root out: faceloop then links each folder into "
                                     f"{media})")
        return doc
    if not recorded or Path(recorded) == media:
        return media
    doc = Path(recorded)
    if doc not in folder.parents:
        raise typer.BadParameter(
            f"{folder} is not inside {doc}, the only folder this stack's Label Studio serves images from "
            f"(chosen at its first `faceloop up`, by a faceloop before stacks served any folder; the tasks "
            f"of its projects point into it, so it cannot change without their images breaking). Either "
            f"move or copy the images into a folder under {doc} and run `faceloop up` on that, or start a "
            f"separate stack for this folder: `faceloop up {folder} --root <new empty folder>` (its own "
            f"Label Studio, login, database and models; a new stack serves any number of folders).")
    return doc


def _media_link(media: Path, folder: Path) -> Path:
    """The link ``media/<folder name>-<8 hex of sha256(folder path)>`` -> ``folder`` (made if
    missing): the Local Files storage path of ``folder`` in a stack whose document root is
    ``media``. Label Studio 1.23.2 checks storage paths and serves ``/data/local-files/?d=``
    lexically (``Path.parents``, Django's ``safe_join``: no ``realpath``), so files behind the
    link are served; the name is stable (same folder, same link) and unique per folder.

    Raises: typer.BadParameter when that name is taken by something else than a link to ``folder``.
    """
    import hashlib

    name = re.sub(r"[^A-Za-z0-9._-]+", "_", folder.name).strip("._")[:40] or "images"
    link = media / f"{name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"
    media.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if Path(os.readlink(link)) == folder:
            return link
        raise typer.BadParameter(f"{link} links to {os.readlink(link)}, not {folder}: remove that link")
    if link.exists():
        raise typer.BadParameter(f"{link} exists and is not a link to {folder}: move it away")
    link.symlink_to(folder, target_is_directory=True)
    return link


@app.command()
def up(
    images: Path = typer.Argument(DEFAULT_IMAGES, help="Folder of face images to label (stays in place; "
                                                       "subfolders included)"),
    config: str = typer.Option("awake_sleep", help="Label config in label_config/ (name) or an XML path"),
    title: Optional[str] = typer.Option(None, help="Project title (default: faces: and the folder's last three path parts)"),
    new: bool = typer.Option(False, "--new", help="Create a new project even if one exists for this folder + config"),
    root: Optional[Path] = typer.Option(None, help="Folder of the stack: services' data, secrets, logs (default "
                                                   "VAR_DIR/stack; kept between runs). Another folder: a separate "
                                                   "stack, its database and models in ROOT/var unless VAR_DIR is set"),
    document_root: Optional[Path] = typer.Option(None, help="Label Studio's local-files root, a parent of IMAGES "
                                                            "(default: the stack's; a new stack's is ROOT/media, "
                                                            "where each image folder is linked)"),
    ls_port: Optional[int] = typer.Option(None, help="Label Studio port (default: last run's, else 8080, else free)"),
    backend_port: Optional[int] = typer.Option(None, help="Backend port (default: last run's, else 9090, else free)"),
    redis_port: Optional[int] = typer.Option(None, help="Redis port (default: last run's, else 6379, else free)"),
    exit_after_setup: bool = typer.Option(False, help="Stop the services once the project is ready"),
):
    """Start Redis, Label Studio, the backend and a worker; open (or create) the project of IMAGES
    and CONFIG with the images as a Local Files storage (any number of folders on one stack:
    each is linked into ROOT/media, Label Studio's document root); connect the backend with auth on.
    A service that dies is restarted (backoff 1-16 s); one that keeps dying (5 restarts within
    10 minutes) stops everything, exit code 1."""
    import hashlib

    from label_studio_sdk import LabelStudio

    from backend.lsapi import api_error_text, connect_backend, create_project, sync_local_storage
    from backend.stack import Stack, StackError, already_running_message, read_json

    folder = _image_folder(images)
    os.umask(0o077)  # secrets, tokens, databases: this user only
    xml_path = _config_path(config)
    xml = xml_path.read_text()
    settings = get_settings()
    root = (root or _stack_root()).resolve()
    busy = already_running_message(root)
    if busy:  # refused before "starting ..." is printed and before the folder is linked into media/
        _fail(busy)
    state = read_json(root / "stack.json")
    var_dir = _stack_var_dir(root, settings.var_dir)
    if state.get("var_dir") and Path(state["var_dir"]) != var_dir:
        console.print(f"[yellow]note: this stack kept its database and models in {state['var_dir']} before; "
                      f"now in {var_dir} (a stack started with --root has its own). Set VAR_DIR="
                      f"{state['var_dir']} to go on with the old ones.[/]", soft_wrap=True)
    # how the other commands reach this stack (README, "A separate stack")
    env_hint = "" if var_dir == settings.var_dir else f"VAR_DIR={var_dir} "
    if var_dir != settings.var_dir:  # this stack's own database and models, for every service
        os.environ["VAR_DIR"] = str(var_dir)
        get_settings.cache_clear()
        settings = get_settings()
    doc_root = _choose_document_root(folder, document_root, state.get("document_root"), root)
    storage_folder = _media_link(doc_root, folder) if doc_root == root / MEDIA_DIR else folder
    asked = {k: v for k, v in (("label-studio", ls_port), ("backend", backend_port), ("redis", redis_port)) if v}
    console.print(f"[bold]starting[/] redis-server, Label Studio, backend, worker under {root} ...")
    t0 = time.time()
    _stop_on_signals()
    try:
        st = Stack.start(root, document_root=doc_root, var_dir=settings.var_dir, ports=asked, stable_ports=True)
    except StackError as e:
        _fail(str(e))
    failed = False
    try:
        console.print(f"services up in {time.time() - t0:.0f} s")
        client = LabelStudio(base_url=st.ls_url, api_key=st.api_key)
        key = {"folder": str(folder), "config_sha256": hashlib.sha256(xml.encode()).hexdigest()}
        projects = [p for p in (st.state().get("projects") or []) if isinstance(p, dict)]
        entry = None if new else next((p for p in reversed(projects) if all(p.get(k) == v for k, v in key.items())),
                                      None)
        pid = None
        if entry is not None:
            try:
                pid = int(client.projects.get(id=entry["id"]).id)
            except Exception as e:  # noqa: BLE001 - deleted in Label Studio: make a new one
                console.print(f"[yellow]project {entry['id']} of this folder is gone ({api_error_text(e)}); "
                              "creating a new one[/]")
                projects.remove(entry)
                entry = None
        if entry is None and not new:  # made with an earlier version of this shipped config?
            entry = _reopen_earlier_version(client, projects, folder, xml, xml_path)
            if entry is not None:
                pid = int(entry["id"])
                st.save_state(running=True, projects=projects)
        if entry is None:
            pid = create_project(client, title or default_title(folder), xml)
            entry = {"id": pid, **key, "config": str(xml_path), "storage_id": None}
            projects.append(entry)
            st.save_state(running=True, projects=projects)  # reopened next time even if a later step fails
        try:
            sid, n_new = sync_local_storage(client, pid, storage_folder, entry.get("storage_id"))
        except Exception as e:  # noqa: BLE001
            _fail(f"Label Studio did not accept the folder as a Local Files storage: {api_error_text(e)}")
        entry["storage_id"] = sid
        _say_linked_out(folder)
        if n_new:
            _say_unreadable(folder)
        _check_project_instance(pid, st.secrets.get("instance_id"))
        ml_id = connect_backend(client, pid, st.backend_url, basic_auth=st.basic_auth, webhook_secret=st.webhook_secret)
        from backend.status import status_link

        status_url = status_link(st.backend_url, pid, st.webhook_secret)
        if _link_status_page(client, pid, status_url, entry):
            console.print(f"project {pid}: its instructions, with the status page's link, now open when a person "
                          "starts labeling (Settings -> Instructions -> 'Show before labeling' turned on; "
                          "switch it off there if you prefer, faceloop leaves it then)", soft_wrap=True)
        if _follow_review_queue(client, pid, entry):
            console.print(f"project {pid}: Label All Tasks now serves the review queue's order (Settings -> "
                          "Annotation -> Task Sampling: 'Uncertainty sampling'; pick another there if you prefer, "
                          "faceloop leaves it then)", soft_wrap=True)
        others = _reconnect_projects(client, st, exclude={pid})
        for e in projects:  # the earlier projects of this stack's folders follow their review queue too
            if e.get("id") in others:
                try:
                    _follow_review_queue(client, int(e["id"]), e)
                except Exception as err:  # noqa: BLE001 - one broken project does not stop `up`
                    console.print(f"[yellow]project {e['id']}: could not set its task sampling: "
                                  f"{api_error_text(err)}[/]")
        st.save_state(running=True, projects=projects)
        n_tasks = int(client.projects.get(id=pid).task_number or 0)
        retry = [] if n_new else _unscored_tasks(pid)
        if n_new or retry:
            from backend.config import Settings
            from backend.events import enqueue

            broker = Settings(celery_broker_url=st.redis_url, var_dir=settings.var_dir)
            if n_new:
                enqueue(broker, "faceloop.score", [pid])
            else:  # the images may read now (replaced, copied in): only those tasks are tried again
                enqueue(broker, "faceloop.preannotate", [pid, retry])
                console.print(f"project {pid}: {len(retry)} tasks could not be pre-annotated last time (the status "
                              "page says why); they are tried again now", soft_wrap=True)
        _say_project_ready(pid, n_tasks, n_new, folder, ml_id, len(others))
        login = (f"{st.ls_user} / {st.ls_password}   (shown once; stored in {root / 'secrets.json'})"
                 if st.first_start else f"{st.ls_user} / password in {root / 'secrets.json'}")
        console.print(f"\n  Label Studio  {st.ls_url}/projects/{pid}/data\n  login         {login}\n"
                      f"  status page   {status_url}\n"
                      f"  backend       {st.backend_url}\n  logs          {root / 'logs'}\n"
                      f"  state         {settings.var_dir}\n", soft_wrap=True)
        console.print(f"Label some faces, then Settings -> Model -> Start Training (or `{env_hint}faceloop train "
                      f"{pid}`); the switch 'Start model training on annotation submission' on the same page retrains "
                      f"every {settings.retrain_min_annotations} new labels.\nThe review queue: view "
                      f"'{settings.review_view_title}' (Label All Tasks follows it), or `{env_hint}faceloop queue {pid}`.",
                      soft_wrap=True)
        console.print(f"UP {time.time() - t0:.1f} s project={pid} ls={st.ls_url}")  # one line for scripts/tests
        if exit_after_setup:
            return
        console.print("\nCtrl-C stops everything. A service that dies is restarted (up to 5 times in 10 min).")
        from backend.stack import ServiceFailed, Supervisor

        sup = Supervisor(st, say=lambda m: console.print(m, soft_wrap=True, markup=False, highlight=False))
        try:
            while True:
                time.sleep(1)
                sup.check()
        except KeyboardInterrupt:
            console.print("\nstopping: the worker, the backend and Label Studio, then Redis (at most 30 s)...",
                          soft_wrap=True, markup=False, highlight=False)
        except ServiceFailed as e:
            console.print(f"error: {e}", soft_wrap=True, markup=False, highlight=False)
            failed = True
    except Exception as e:
        if getattr(e, "status_code", None) is None:
            raise
        _fail(f"Label Studio answered {api_error_text(e)}; see {root / 'logs'}")  # no headers, no cookies
    finally:
        st.stop()
    console.print("every service stopped", soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def _reopen_earlier_version(client, projects: list[dict], folder: Path, xml: str, xml_path: Path) -> dict | None:
    """The project of ``folder`` made with an earlier shipped version of ``xml_path`` (its
    ``stack.json`` entry's SHA-256 is listed in ``label_config/earlier_versions.json``, see
    ``backend.config_versions``), reopened by this ``up`` instead of a new one. Its label config
    in Label Studio becomes ``xml`` when it still is an earlier shipped version with the same tags
    and classes (Label Studio 1.23.2 checks it against the project's annotations); a config a
    person changed in Label Studio since is left as it is. The entry moves to ``xml``'s SHA-256,
    so the next ``up`` finds it directly. One line says what happened.

    Returns: the entry (updated in place), or None when there is no such project or it is gone
    from Label Studio (then ``up`` makes a new project).
    Raises: the SDK's ApiError when Label Studio answers an unexpected error on reading the project.
    """
    from backend import config_versions as cv
    from backend.lsapi import api_error_text

    entry = cv.earlier_entry(projects, str(folder), xml_path)
    if entry is None:
        return None
    name = cv.shipped_name(xml_path)
    try:
        current = client.projects.get(id=entry["id"]).label_config or ""
    except Exception as e:  # noqa: BLE001 - deleted in Label Studio: make a new one
        console.print(f"[yellow]project {entry['id']} of this folder is gone ({api_error_text(e)}); "
                      "creating a new one[/]")
        projects.remove(entry)
        return None
    new_sha = cv.config_sha256(xml)
    if current.strip() == xml.strip():  # Label Studio keeps it stripped (backend.config_versions)
        console.print(f"project {entry['id']}: reopened; its label config already is the current "
                      f"label_config/{name}", soft_wrap=True)
    elif cv.is_earlier_version(name, current) and cv.same_tags(current, xml):
        try:
            client.projects.update(id=entry["id"], label_config=xml)
        except Exception as e:  # refused: keep the project and its config, try next time
            if getattr(e, "status_code", None) is None:
                raise
            console.print(f"[yellow]project {entry['id']}: reopened; Label Studio refused the current "
                          f"label_config/{name} ({api_error_text(e)}), so the project keeps its earlier "
                          f"one[/]", soft_wrap=True)
            return entry
        console.print(f"project {entry['id']}: label config updated to the current label_config/{name} "
                      "(same tags and classes, a new layout; its tasks and annotations kept)", soft_wrap=True)
    else:
        console.print(f"project {entry['id']}: reopened; its label config was changed in Label Studio, so "
                      f"faceloop leaves it (the current label_config/{name} is not applied)", soft_wrap=True)
    entry.update(config_sha256=new_sha, config=str(xml_path))
    return entry


def _check_project_instance(pid: int, instance: str | None) -> None:
    """Exit 1 with what to do when faceloop's database holds project ``pid`` of another Label
    Studio (two stacks on one VAR_DIR or DATABASE_URL); the backend's ``/setup`` refuses it too."""
    from backend.models import Project
    from backend.registry import ProjectOfAnotherLabelStudio, check_instance

    with _db() as s:
        try:
            check_instance(s.get(Project, pid), instance)
        except ProjectOfAnotherLabelStudio as e:
            _fail(f"{e} (this database: {get_settings().database_url.split('@')[-1]}). Nothing of that project "
                  "was changed.")


def _unscored_tasks(pid: int) -> list[int]:
    """Ids of ``pid``'s tasks whose last pre-annotation by the served version failed (an image that
    did not read, a link out of its folder, ...: the status page and `faceloop queue` list them)."""
    from sqlmodel import select

    from backend import registry
    from backend.models import Project, TaskScore

    with _db() as s:
        if s.get(Project, pid) is None:
            return []
        v = registry.promoted_version(s, pid, get_settings()).version
        rows = s.exec(select(TaskScore.task_id).where(TaskScore.project_id == pid, TaskScore.model_version == v,
                                                      TaskScore.error != "")).all()
    return sorted(set(rows))


def _say_project_ready(pid: int, n_tasks: int, n_new: int, folder: Path, ml_id, reconnected: int = 0) -> None:
    """`faceloop up`'s summary of the project: its tasks and folder on one line (the path unbroken),
    the ML backend on the next. One sentence with "; " after the folder path wrapped after it in a
    narrow terminal, and the line ended in a dangling "; " (tried as a new user)."""
    console.print(f"project {pid}: {n_tasks} tasks ({n_new} new) from {folder}", soft_wrap=True, markup=False,
                  highlight=False)
    more = f", {reconnected} earlier project{'s' if reconnected != 1 else ''} reconnected" if reconnected else ""
    console.print(f"  faceloop connected as its ML backend {ml_id} (basic auth){more}", markup=False, highlight=False)


def _link_status_page(client, pid: int, status_url: str, entry: dict) -> bool:
    """Put the status page's link in the project's instructions and description
    (``backend.lsapi.set_status_link``) and, once per project (``entry["show_instruction_set"]``
    in ``stack.json``), turn on its "Show before labeling" (``show_instruction``), so that the
    instructions, and the link, open when a person starts labeling: one click, also for projects
    made before faceloop turned it on at creation. A person who switches it off later keeps it off.

    Returns: True when this call turned ``show_instruction`` on (it was off).
    Raises: the SDK's ApiError when Label Studio refuses.
    """
    from backend.lsapi import set_status_link

    set_status_link(client, pid, status_url)
    if entry.get("show_instruction_set"):
        return False
    turned_on = not bool(getattr(client.projects.get(id=pid), "show_instruction", False))
    if turned_on:
        client.projects.update(id=pid, show_instruction=True)
    entry["show_instruction_set"] = True
    return turned_on


def default_title(folder: Path, limit: int = 50) -> str:
    """A new project's title: ``faces: `` and the folder's last three path parts, e.g. ``faces:
    awake_sleep/images/val`` and ``faces: expressions/images/val`` (by its name alone both were
    ``faces: val`` in Label Studio's project list). Longer than ``limit`` characters (Label Studio
    1.23's title limit is 50): the leading parts are cut, marked with ``…``."""
    parts = [x for x in folder.parts if x != folder.anchor]
    tail = "/".join(parts[-3:]) or str(folder)
    room = limit - len("faces: ")
    if len(tail) > room:
        tail = "…" + tail[-(room - 1):]
    return f"faces: {tail}"


def _follow_review_queue(client, pid: int, entry: dict) -> bool:
    """Once per project (``entry["sampling_set"]`` in ``stack.json``), set its task sampling to
    ``backend.lsapi.QUEUE_SAMPLING``, so that *Label All Tasks* serves the review queue's order, also
    for projects made before faceloop set it at creation. A person who picks another sampling later
    keeps it.

    Returns: True when this call changed the sampling.
    Raises: the SDK's ApiError when Label Studio refuses.
    """
    from backend.lsapi import use_queue_sampling

    if entry.get("sampling_set"):
        return False
    changed = use_queue_sampling(client, pid)
    entry["sampling_set"] = True
    return changed


def _stop_on_signals() -> None:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP stop the stack: the services are stopped, not left behind.

    SIGINT is set explicitly: a process started in the background by a non-interactive shell
    (``nohup faceloop up &`` in a script) inherits SIGINT ignored, and Python then keeps it
    ignored, so ``kill -INT`` would do nothing and the services would outlive a later SIGKILL.
    """
    def _interrupt(*_):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


def _reconnect_projects(client, st, exclude: set) -> list[int]:
    """Point every other project that has faceloop as ML backend at this run's backend URL, with
    this install's auth and webhook (their backend showed "Disconnected" after a port change)."""
    from backend.lsapi import all_pages, api_error_text, connect_backend

    done = []
    for p in all_pages(client.projects.list):
        if int(p.id) in exclude:
            continue
        try:
            if any(m.title == "faceloop" for m in client.ml.list(project=p.id)):
                connect_backend(client, int(p.id), st.backend_url, basic_auth=st.basic_auth,
                                webhook_secret=st.webhook_secret)
                done.append(int(p.id))
        except Exception as e:  # noqa: BLE001 - one broken project does not stop `up`
            console.print(f"[yellow]project {p.id}: could not reconnect the backend: {api_error_text(e)}[/]")
    return done


@app.command()
def demo(
    data: Path = typer.Option(REPO_ROOT.parent / "shared" / "data" / "awake_sleep",
                              help="YOLO-layout dataset (images/, labels/, data.yaml)"),
    config: str = typer.Option("awake_sleep", help="Label config"),
    n_images: int = typer.Option(30, help="Images to import"),
    n_labelled: int = typer.Option(20, help="Images annotated from ground truth before training"),
    epochs: int = typer.Option(50, help="Training epochs"),
    root: Path = typer.Option(REPO_ROOT / "var" / "demo", help="Folder for the services' data and logs"),
    keep_running: bool = typer.Option(False, help="Keep the services up at the end (Ctrl-C stops)"),
):
    """The whole loop, unattended: import, pre-annotate, label from ground truth, Start Training,
    wait for the new version, print its metrics and the review queue."""
    from label_studio_sdk import LabelStudio

    from backend.demo import annotate_from_ground_truth, dataset_names, retrieve_predictions, wait_for_job
    from backend.labels import ProjectSchema
    from backend.lsapi import connect_backend, create_project, review_queue, upload_images
    from backend.stack import Stack

    imgs = _images(data / "images" / "train", None)
    step = max(1, len(imgs) // n_images)
    files = imgs[::step][:n_images]
    xml = _config_path(config).read_text()
    var_dir = root / "var"
    t0 = time.time()
    _stop_on_signals()
    st = Stack.start(root, var_dir=var_dir, extra_env={"TRAIN_EPOCHS": epochs})
    try:
        console.print(f"services up in {time.time() - t0:.0f} s: Label Studio {st.ls_url} "
                      f"({st.ls_user} / password in {root / 'secrets.json'})")
        client = LabelStudio(base_url=st.ls_url, api_key=st.api_key)
        pid = create_project(client, "faceloop demo", xml)
        ids = upload_images(client, st.ls_url, pid, files)
        connect_backend(client, pid, st.backend_url, basic_auth=st.basic_auth, webhook_secret=st.webhook_secret)
        t1 = time.time()
        retrieve_predictions(client, pid)
        console.print(f"{len(ids)} tasks pre-annotated by the default model in {time.time() - t1:.1f} s")
        schema = ProjectSchema.parse(xml)
        annotate_from_ground_truth(client, pid, dict(zip(ids[:n_labelled], files[:n_labelled])), schema,
                                   dataset_names(data))
        console.print(f"{n_labelled} tasks annotated; pressing Start Training")
        ml = client.ml.list(project=pid)[0]
        client.ml.train(id=ml.id)
        t2 = time.time()
        db_url = st.env.get("DATABASE_URL") or f"sqlite:///{var_dir.resolve() / 'faceloop.db'}"
        job = wait_for_job(db_url, pid, 3600,
                           on_progress=lambda m: console.print("  " + m))
        console.print(f"training job {job.id} {job.state} in {time.time() - t2:.0f} s: {job.message or job.error}")
        os.environ["VAR_DIR"] = str(var_dir.resolve())
        get_settings.cache_clear()
        versions(pid)
        queue(pid, limit=10)
        console.print("Label Studio's review view, head:", review_queue(client, pid, get_settings().review_view_title, 10))
        if keep_running:
            console.print(f"\nservices stay up: {st.ls_url}/projects/{pid}/data ; Ctrl-C stops")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    finally:
        st.stop()


def _narrow() -> bool:
    """True when the terminal is narrower than :data:`WIDE_COLUMNS` (rich reads ``COLUMNS`` or the tty)."""
    return console.width < WIDE_COLUMNS


def _table(title: str) -> Table:
    """A table for this terminal: rich's default box when wide; when narrow a compact one (header rule
    only, no outer edge), so more of the width holds figures."""
    if _narrow():
        return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title_justify="left")
    return Table(title=title)


def _one_line(text: str) -> Text:
    """A text cell that never wraps: its first line, cut with an ellipsis when the column is narrow."""
    return Text((text or "").splitlines()[0] if text else "", no_wrap=True, overflow="ellipsis")


def _hidden_columns_note(hidden: list[str]) -> None:
    console.print(f"[dim]narrow terminal: {', '.join(hidden)} not shown ({WIDE_COLUMNS}+ columns show them)[/]")


def _db():
    from backend.db import session_scope

    return session_scope(get_settings().database_url)


@app.command()
def prune(project: Optional[int] = typer.Option(None, help="Only this Label Studio project (default: all)"),
          keep_retired: int = typer.Option(2, min=0, help="Retired versions per project whose weights are kept"),
          yes: bool = typer.Option(False, "--yes", help="Delete; without it, only list what would go")):
    """Free the database space of weights no one serves: rejected versions, and retired ones older
    than the newest --keep-retired. Metrics, plots and version rows stay (see modelstore.prune)."""
    import modelstore

    _use_running_stack()
    rows = modelstore.prune(get_settings(), keep_retired=keep_retired, dry_run=not yes, project_id=project)
    t = Table(title="weights deleted" if yes else "weights that --yes would delete")
    for c in ("project", "version", "status", "files", "MB"):
        t.add_column(c)
    for r in rows:
        t.add_row(str(r["project_id"]), r["version"], r["status"], ", ".join(r["files"]), f"{r['bytes'] / 1e6:.1f}")
    console.print(t)
    total = sum(r["bytes"] for r in rows) / 1e6
    console.print(f"{len(rows)} versions, {total:.1f} MB {'freed' if yes else 'to free (run again with --yes)'}")


@app.command("db-copy")
def db_copy(target: str = typer.Argument(..., help="URL of the new, empty database, e.g. "
                                         "postgresql+psycopg://USER:PASSWORD@HOST:5432/faceloop"),
            source: Optional[str] = typer.Option(None, "--from", help="URL to copy from (default: DATABASE_URL, "
                                                 "i.e. var/faceloop.db)")):
    """Copy every faceloop row (projects, versions and their files, jobs, scores, counts) into an
    empty database, e.g. from the default SQLite file to PostgreSQL when a second machine joins.
    Stop faceloop first; then point DATABASE_URL at the target."""
    from sqlalchemy.engine import make_url

    from backend.db import CopyError, copy_database

    src = source or get_settings().database_url

    def shown(url: str) -> str:
        return make_url(url).render_as_string(hide_password=True)

    console.print(f"copying {shown(src)} -> {shown(target)}")
    try:
        counts = copy_database(src, target, on_table=lambda name, n: console.print(f"  {name}: {n} rows"))
    except CopyError as e:
        console.print(f"[red]not copied:[/] {e}")
        raise typer.Exit(1)
    console.print(f"copied {sum(counts.values())} rows; now set DATABASE_URL={shown(target)} "
                  "for the backend and every worker")


@app.command()
def queue(project: int = typer.Argument(..., help="Label Studio project id"),
          limit: int = typer.Option(20, help="Rows to show")):
    """Print the head of the review queue: most informative unlabelled tasks first."""
    from sqlmodel import select

    from backend import registry
    from backend.models import TaskScore, WebhookEvent

    _use_running_stack()
    _require_project(project)
    settings = get_settings()
    with _db() as s:
        v = registry.promoted_version(s, project, settings)
        # tasks annotated since they were scored leave the queue, as in Label Studio's Review queue
        # view and the status page (backend.status)
        labelled = select(WebhookEvent.task_id).where(WebhookEvent.project_id == project,
                                                      WebhookEvent.action.in_(registry.ANNOTATION_ACTIONS),
                                                      WebhookEvent.task_id.is_not(None))
        rows = s.exec(select(TaskScore).where(TaskScore.project_id == project, TaskScore.model_version == v.version,
                                              TaskScore.error == "", TaskScore.task_id.not_in(labelled))
                      .order_by(TaskScore.rank, TaskScore.task_id).limit(limit)).all()
        errs = s.exec(select(TaskScore).where(TaskScore.project_id == project, TaskScore.model_version == v.version,
                                              TaskScore.error != "")).all()
    from ml_worker.scoring import ls_task_score

    narrow = _narrow()
    t = _table(f"project {project} review queue ({v.version}, measure {settings.uncertainty_measure})")
    # "boxes": the predicted boxes of the task (a false box counts too), not the faces in the image
    cols = ["#", "task", "uncertainty", "LS score", "least-conf.", "margin", "entropy", "boxes", "query batch"]
    if narrow:  # the task score Label Studio shows (1 - uncertainty; the batch's below 0.001): dropped when narrow
        cols.remove("LS score")
    for c in cols:
        t.add_column("batch" if narrow and c == "query batch" else c, justify="right", no_wrap=True)
    for place, r in enumerate(rows, 1):  # the place in the queue now (labelled tasks left), as the status page
        cells = {"#": str(place), "task": str(r.task_id), "uncertainty": f"{r.uncertainty:.3f}",
                 # as written to Label Studio: the query batch's below 0.001, the others 1 - uncertainty (within 0.001)
                 "LS score": "<0.001" if r.in_query_batch else f"{ls_task_score(1 - r.uncertainty, r.task_id, []):.3f}",
                 "least-conf.": f"{r.least_confidence:.3f}",
                 "margin": f"{r.margin:.3f}", "entropy": f"{r.entropy:.3f}", "boxes": str(r.n_boxes),
                 "query batch": "yes" if r.in_query_batch else ""}
        t.add_row(*(cells[c] for c in cols))
    console.print(t)
    if narrow:
        _hidden_columns_note(["LS score (= 1 - uncertainty; the query batch's below 0.001, served first)"])
        if any(r.in_query_batch for r in rows):
            console.print("[dim]batch: in the query batch[/]")
    if not rows:
        console.print("no scored tasks yet: the pool is scored after each promotion (or `faceloop score`)")
    for r in errs[:10]:
        console.print(f"[yellow]task {r.task_id} not scored:[/] {r.error}")


def _project_state_lines(s, pid: int, now=None) -> list[str]:
    """What `faceloop status` says of one project, one line each: the version served now (when it
    was promoted, by which job, and the gate's reason), the running job (the stage's epoch k of n
    named by stage, e.g. "detector epoch 3 of 10", else the stage; time left per stage from
    :func:`backend.jobprogress.estimate`, as the status page), and the latest job when it is not
    the running one (e.g. a queued or skipped job after the one that promoted). Reads only;
    registers nothing (the shipped default model is named, not recorded)."""
    from datetime import timezone

    from sqlmodel import select

    from backend import jobprogress
    from backend.models import ModelVersion, Project, TrainingJob
    from backend.status import _previous_job

    p = s.get(Project, pid)
    v = s.get(ModelVersion, p.promoted_version_id) if p is not None and p.promoted_version_id else None
    if v is None:
        out = ["serving: the shipped default model (no version promoted yet)"]
    else:
        at = v.promoted_at
        at = at.astimezone(timezone.utc) if at is not None and at.tzinfo is not None else at  # stored UTC
        when = f"promoted {at:%Y-%m-%d %H:%M} UTC" if at else ""
        by = f"by job {v.training_job_id}" if v.training_job_id else ""
        how = " ".join(x for x in (when, by) if x)
        why = f": {v.gate_reason}" if v.gate_reason else ""
        out = [f"serving: {v.version}" + (f" ({how}{why})" if how or why else "")]
    jobs = s.exec(select(TrainingJob).where(TrainingJob.project_id == pid).order_by(TrainingJob.id.desc())).all()
    running = next((j for j in jobs if j.state == "running"), None)
    if running is not None:
        # the stage's own epochs, named by stage ("detector epoch 3 of 10"), as the status page
        what = jobprogress.epoch_text(running) or running.stage
        line = f"running: job {running.id}" + (f", {what}" if what else "")
        est = jobprogress.estimate(running, _previous_job(jobs, running), now)
        if est is not None:
            line += f"; {est.text()}"
        out.append(line)
    if not jobs:
        out.append("no training yet")
    elif jobs[0] is not running:
        j = jobs[0]
        msg = (j.error or "").splitlines()[0] if j.state == "failed" and j.error else j.message
        out.append(f"latest: job {j.id} {j.state}" + (f" ({msg})" if msg else ""))
    return out


@app.command()
def status(project: Optional[int] = typer.Argument(None, help="Only this Label Studio project (default: all)")):
    """Print, per project of the running stack: the model version served now (when and why it was
    promoted), the running training job (stage, epoch, time left) and the latest job when it is
    another, and the status page's link (one click opens it: jobs, versions, acceptance, the review
    queue)."""
    st = _use_running_stack()
    if st is None:
        _fail(f"no stack is running from {_stack_root()}: start one with `faceloop up [FOLDER]` (its status "
              "page links are printed there too); for a stack started with `faceloop up --root DIR`, run "
              "`VAR_DIR=DIR/var faceloop status`")
    entries = [e for e in (st.get("projects") or []) if isinstance(e, dict) and e.get("id")]
    if project is not None:
        entries = [e for e in entries if int(e["id"]) == project]
        if not entries:
            _fail(f"project {project} is not a project of this stack (its projects: "
                  f"{', '.join(str(e['id']) for e in st.get('projects') or [] if isinstance(e, dict)) or 'none'})")
    for e in entries:
        pid = int(e["id"])
        with _db() as s:
            lines = _project_state_lines(s, pid)
        console.print(f"project {pid} ({e.get('folder', '')})", soft_wrap=True, markup=False, highlight=False)
        for line in lines:
            console.print(f"  {line}", soft_wrap=True, markup=False, highlight=False)
        console.print(f"  {_status_page_link(st, pid)}", soft_wrap=True, markup=False, highlight=False)
    if not entries:
        console.print("this stack has no project yet: `faceloop up FOLDER` makes one")


#: Classes of the shipped default model named in its `faceloop versions` row before "…".
DEFAULT_CLASSES_SHOWN = 3


def _default_classes(model_classes: list[str], label_config: str) -> str:
    """What the shipped default model (a ``base-<sha8>`` version, :func:`backend.registry.promoted_version`)
    names in this project, for its `faceloop versions` row: the project's labels it matches by name
    (:meth:`backend.labels.ProjectSchema.label_map`: exact, case, synonyms such as fearful/fear), e.g.
    ``"happy, sad by name; not: awake"``; when it matches none (an awake/sleep project) ``"– faces
    only (knows neutral, happy, sad, …: none of this project's)"``: it boxes faces without a class. A new
    user read the default's expression classes in an awake/sleep project's row and asked why they
    were there. Without a label config it can parse: the classes it knows, ``"knows neutral, …"``.
    """
    from backend.labels import ProjectSchema

    if not model_classes:
        return ""
    # ", " between names: a wrapping column breaks there rather than cutting the list
    names = ", ".join(model_classes[:DEFAULT_CLASSES_SHOWN]) + (", …" if len(model_classes) > DEFAULT_CLASSES_SHOWN
                                                                   else "")
    try:
        schema = ProjectSchema.parse(label_config)
    except ValueError:  # no label config stored yet (or one faceloop cannot serve)
        return f"knows {names}"
    matched = set(schema.label_map(model_classes).values())
    if not matched:
        return f"– faces only (knows {names}: none of this project's)"
    missing = [lab for lab in schema.labels if lab not in matched]
    return (", ".join(lab for lab in schema.labels if lab in matched) + " by name"
            + (f"; not: {', '.join(missing)}" if missing else ""))


@app.command()
def versions(project: int = typer.Argument(..., help="Label Studio project id")):
    """List a project's model versions with their validation metrics and gate decision. The shipped
    default model's row (``base-…``) gives, as its classes, this project's labels it names (matched
    by name), or "faces only" when it knows none of them."""
    from sqlmodel import select

    from backend.models import ModelVersion, Project
    from backend.registry import is_shipped_default

    _use_running_stack()
    _require_project(project)
    with _db() as s:
        rows = s.exec(select(ModelVersion).where(ModelVersion.project_id == project).order_by(ModelVersion.id)).all()
        p = s.get(Project, project)
        label_config = p.label_config if p is not None else ""

    def classes(v) -> str:
        return _default_classes(v.classes, label_config) if is_shipped_default(v.version) else ",".join(v.classes)
    cands = [v.metrics.get("candidate") or {} for v in rows]
    # a Choices project's gate decides on image accuracy (ml_worker.training.gate_choices), a boxes
    # project's on mAP50: a column for each kind of version the project has
    choices = any("accuracy" in m for m in cands)
    boxes = any("mAP50" in m for m in cands) or not choices
    cols = [("version", None), ("status", None), ("classes", None)]
    if choices:
        cols.append(("image acc.", "accuracy"))
    if boxes:
        cols += [("mAP50", "mAP50"), ("face mAP50", "face_mAP50")]
    cols.append(("class acc.", "class_accuracy"))
    if boxes:
        cols += [("accepted", "acceptance_rate"), ("boxes/face", "boxes_per_face")]
    narrow = _narrow()
    # a narrow terminal keeps the gate's figure and the acceptance; the gate's reason goes below the table
    hidden = [c for c, _ in cols if c in ("classes", "face mAP50", "class acc.", "boxes/face")] if narrow else []
    shown = [(c, k) for c, k in cols if c not in hidden]
    t = _table(f"project {project} model versions (validation split)")
    for c, k in shown:
        t.add_column(c, no_wrap=narrow or c != "classes", justify="right" if k else "left")
    t.add_column("train/val", no_wrap=True, justify="right")
    if not narrow:
        t.add_column("why")

    def fig(m, k):
        v = m.get(k)
        return f"{v:.3f}" if isinstance(v, (int, float)) else "-"

    for v, m in zip(rows, cands):
        cells = [v.version, v.status] + ([] if "classes" in hidden else [classes(v)])
        cells += [fig(m, k) for _, k in shown[len(cells):]]
        cells.append(f"{v.metrics.get('n_train', '-')}/{v.metrics.get('n_val', '-')}")
        t.add_row(*cells, *(() if narrow else (v.gate_reason,)))
    console.print(t)
    if narrow:
        for v in rows:
            console.print(f"  {v.version} why: {v.gate_reason}", markup=False, highlight=False)
            if is_shipped_default(v.version) and classes(v):  # the classes column is not shown: what it names here
                console.print(f"  {v.version} classes: {classes(v)}", markup=False, highlight=False)
        _hidden_columns_note(hidden)
    for v in rows:
        for name, p in (v.metrics.get("plots") or {}).items():
            # a bare file name is a file of the version's folder (ml_worker.training): print where it
            # lies, unbroken (soft_wrap) so that it can be copied from a narrow terminal
            path = Path(str(p)) if Path(str(p)).is_absolute() else Path(v.path).parent / str(p)
            console.print(f"  {v.version} {name}: {path}", soft_wrap=True, markup=False, highlight=False)
    from backend.acceptance import acceptance_rows, acceptance_table

    acc = acceptance_rows(get_settings(), project)  # recounted from Label Studio; stored counts if it is down
    if acc:
        console.print(_acceptance_narrow(acc) if narrow else acceptance_table(acc))


#: `faceloop versions`' pre-label acceptance in a narrow terminal: the outcomes of pre-labels only
#: (annotations, boxes drawn and choices made by hand are not shown), headers on two lines.
_NARROW_ACCEPTANCE = {
    "boxes": (("predicted", "predicted"), ("accepted", "accepted"), ("relabelled", "relabelled"),
              ("moved", "moved"), ("deleted", "deleted"), ("accepted %", "accepted\n%")),
    "image-level choices": (("choices predicted", "choices\npredicted"), ("choice accepted", "choice\naccepted"),
                            ("choice changed", "choice\nchanged"), ("choice removed", "choice\nremoved"),
                            ("choices accepted %", "choices\naccepted %")),
}


def _acceptance_narrow(rows: list[dict]):
    """The tables of :func:`backend.acceptance.acceptance_tables` for a narrow terminal: one line per
    version, numbers never cut (the version name is, with an ellipsis, if it must be)."""
    from rich.console import Group

    has_choices = any(r.get("choices predicted") or r.get("chosen by hand") for r in rows)
    has_boxes = any(r.get("predicted") or r.get("drawn") for r in rows) or not has_choices
    out = []
    for what, wanted in (("boxes", has_boxes), ("image-level choices", has_choices)):
        if not wanted:
            continue
        t = _table(f"pre-label acceptance ({what})")
        t.add_column("version", overflow="ellipsis")
        for _, header in _NARROW_ACCEPTANCE[what]:
            t.add_column(header, justify="right", no_wrap=True)
        for r in rows:
            t.add_row(_one_line(r["version"]), *(str(r.get(k, "")) for k, _ in _NARROW_ACCEPTANCE[what]))
        out.append(t)
    hidden = "annotations, drawn" + (", chosen by hand" if has_choices else "")
    out.append(Text(f"narrow terminal: {hidden} not shown ({WIDE_COLUMNS}+ columns show them)", style="dim"))
    return Group(*out)


@app.command()
def jobs(project: int = typer.Argument(..., help="Label Studio project id")):
    """List a project's training jobs with their progress (epoch k of n of the stage shown: detector,
    classifier or its refit) and errors."""
    from sqlmodel import select

    from backend import jobprogress
    from backend.models import TrainingJob

    _use_running_stack()
    _require_project(project)
    with _db() as s:
        rows = s.exec(select(TrainingJob).where(TrainingJob.project_id == project).order_by(TrainingJob.id)).all()
    narrow = _narrow()
    t = _table(f"project {project} training jobs")
    for c in ("job", "trigger", "state", "stage", "epoch", "train/val"):
        if not (narrow and c == "trigger"):
            t.add_column(c, no_wrap=True, justify="right" if c in ("job", "epoch", "train/val") else "left")
    t.add_column("message", overflow="ellipsis")
    if not narrow:
        t.add_column("error")
    for j in rows:
        first_error = (j.error or "").splitlines()[0] if j.error else ""
        se = jobprogress.stage_epochs(j)  # the stage's own epochs (the stage column names it), as the status page
        cells = [str(j.id)] + ([] if narrow else [j.trigger]) + [j.state, j.stage, f"{se[1]}/{se[2]}" if se else "–",
                                                                 f"{j.n_train}/{j.n_val}"]
        if narrow:  # one line per job: the error (else the message) cut to the width; errors in full below
            t.add_row(*cells, _one_line(first_error or j.message))
        else:
            t.add_row(*cells, j.message, first_error)
    console.print(t)
    if narrow:
        for j in rows:
            if j.error:
                console.print(f"  job {j.id} error: {j.error.splitlines()[0]}", markup=False, highlight=False)
        _hidden_columns_note(["trigger"])


def _status_page_link(st: dict | None, pid: int) -> str | None:
    """The project's status page link with its token, as `faceloop up` and `faceloop status` print
    it; None without a running stack (`_use_running_stack`)."""
    if not st or not st.get("backend_url"):
        return None
    from backend.stack import SECRETS_FILE, read_json
    from backend.status import status_link

    key = read_json(Path(st.get("root") or _stack_root()) / SECRETS_FILE).get("webhook_secret", "")
    return status_link(st["backend_url"], pid, key)


@app.command()
def train(project: int = typer.Argument(..., help="Label Studio project id"),
          as_json: bool = typer.Option(False, "--json", help="Print the answer as one JSON object, for scripts: "
                                       '{"job": "6", "queued": true, "joined_existing": false}')):
    """Queue a retrain, as *Start Training* in Label Studio does (coalesced with a queued one).

    Prints which job was queued (or joined) and where to follow it. A job asked for while another
    runs is skipped when that one succeeds and no annotation changed since its snapshot
    (``ml_worker.tasks.take_snapshot``): that is known only when the job starts, so it is said as a rule.
    Exits 1 (and records no job) when the project is unknown or Redis cannot be reached."""
    import json

    from sqlmodel import select

    from backend.events import queue_training
    from backend.models import TrainingJob

    st = _use_running_stack()
    _require_project(project)
    settings = get_settings()
    why = _broker_reachable(settings.celery_broker_url)
    if why:
        _fail(f"Redis at {settings.celery_broker_url} cannot be reached ({why}); no job recorded. "
              "Start the stack with `faceloop up` (other commands find it), or set CELERY_BROKER_URL.")
    out = queue_training(settings, project, "cli")
    with _db() as s:
        job = s.get(TrainingJob, int(out["job"]))
        sent = bool(job is not None and job.celery_id)
        state = job.state if job is not None else "queued"
        running = s.exec(select(TrainingJob.id).where(TrainingJob.project_id == project,
                                                      TrainingJob.state == "running",
                                                      TrainingJob.id != int(out["job"]))).first()
    if as_json:
        console.print(json.dumps(out), soft_wrap=True, markup=False, highlight=False)
    else:
        link = _status_page_link(st, project)
        follow = f"follow it on {link} or `faceloop jobs {project}`" if link else f"follow it with `faceloop jobs {project}`"
        head = (f"job {out['job']} queued (project {project})" if out["queued"]
                else f"joined job {out['job']}, already {state} (project {project})")
        console.print(f"{head}; {follow}", soft_wrap=True, markup=False, highlight=False)
        if running is not None:
            console.print(f"job {running} is training now: job {out['job']} is skipped if job {running} succeeds "
                          f"and no annotation is created, updated or deleted since job {running}'s snapshot",
                          soft_wrap=True, markup=False, highlight=False)
    if not sent:
        _fail(f"job {out['job']} is recorded but could not be sent to Redis at {settings.celery_broker_url}; "
              "it is sent again when a worker starts")


@app.command()
def score(project: int = typer.Argument(..., help="Label Studio project id"),
          here: bool = typer.Option(False, help="Score in this process instead of on the worker")):
    """Score the unlabelled pool with the promoted version and refresh the review queue."""
    _use_running_stack()
    _require_project(project)
    settings = get_settings()
    if here:
        from rich.progress import Progress

        from ml_worker.scoring import score_pool

        with Progress(console=console) as prog:
            task = prog.add_task("scoring pool", total=None)
            o = score_pool(settings, project, progress=lambda d, n: prog.update(task, completed=d, total=n))
        console.print(o)
    else:
        from backend.events import enqueue

        why = _broker_reachable(settings.celery_broker_url)
        cid = None if why else enqueue(settings, "faceloop.score", [project])
        if cid is None:
            _fail(f"could not queue the scoring: Redis at {settings.celery_broker_url} cannot be reached"
                  f"{f' ({why})' if why else ''}. Start the stack with `faceloop up`, or use --here.")
        console.print({"celery_id": cid})


@app.command()
def serve(host: str = "127.0.0.1", port: int = 9090):
    """Run the ML backend (uvicorn)."""
    import uvicorn

    uvicorn.run("backend.main:app", host=host, port=port)


@app.command()
def worker(queues: str = typer.Option("train,score", "--queues", "-Q",
                                      help="Comma-separated queues: train (a GPU machine), score (CPU machines)"),
           concurrency: int = typer.Option(1, "--concurrency", "-c", help="Tasks at once (processes)"),
           name: str = typer.Option("", "--name", "-n", help="Celery node name (default faceloop-<queues>@<host>)")):
    """Run a Celery worker; on any machine that reaches the database, Redis and Label Studio.

    It needs only DATABASE_URL, CELERY_BROKER_URL, LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: model
    versions come from the database (modelstore) into its own VAR_DIR, images through Label Studio's URLs.
    """
    import re

    qs = [q.strip() for q in queues.split(",") if q.strip()]
    if not qs or not all(re.fullmatch(r"[A-Za-z0-9_.-]+", q) for q in qs):
        _fail(f"--queues takes comma-separated queue names (train, score), got {queues!r}")
    if not os.environ.get("DATABASE_URL"):
        console.print(f"DATABASE_URL is not set: using {get_settings().database_url} (a worker on another machine "
                      "needs the shared database's URL)", soft_wrap=True)
    os.execv(sys.executable, [sys.executable, "-m", "celery", "-A", "ml_worker.celery_app", "worker",
                              "-Q", ",".join(qs), "-c", str(concurrency), "-n", name or f"faceloop-{'-'.join(qs)}@%h",
                              "--loglevel", "INFO"])


@app.command("train-base")
def train_base_cmd(
    out: Path = typer.Option(REPO_ROOT / "var" / "base", help="Output folder"),
    hours: Optional[float] = typer.Option(None, help="Wall-clock budget (ultralytics time=)"),
    epochs: int = typer.Option(60), imgsz: int = typer.Option(256), seed: int = typer.Option(0),
    device: str = typer.Option("", help="'' = GPU if any"),
    install: bool = typer.Option(False, help="Copy the result to models/faceloop-base.pt (+ .json)"),
    init: Optional[Path] = typer.Option(None, help="Continue from these weights (second stage) instead of the yaml"),
    scale: float = typer.Option(0.5, help="Random scale gain 1 +- SCALE (0.9: faces as small as in scenes)"),
):
    """Train the default model (yolov5nu from its yaml) on ../shared/data/expressions."""
    from ml_worker.base_model import install_base, train_base

    if init is not None and not init.exists():
        raise typer.BadParameter(f"no weights at {init}")
    w = train_base(out, epochs=epochs, hours=hours, imgsz=imgsz, seed=seed, device=device, init=init, scale=scale)
    console.print(f"weights: {w}")
    if install:
        console.print(f"installed: {install_base(w)}")


@app.command()
def simulate(
    data: Path = typer.Option(REPO_ROOT.parent / "shared" / "data" / "awake_sleep",
                              help="YOLO-layout dataset read in place (pool = train split, test = val split)"),
    strategies: str = typer.Option("random,least_confidence,margin,entropy,diverse_margin,typiclust,cluster_margin",
                                   help="Comma-separated sampler strategies (random is always included)"),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds (seed set and training seed)"),
    k: int = typer.Option(20, help="Seed-set size: random images labelled before round 1"),
    b: int = typer.Option(20, help="Query batch: images labelled per round"),
    rounds: int = typer.Option(7, help="Query rounds (budget k + rounds*b labels)"),
    epochs: int = typer.Option(10, help="Fine-tuning epochs per round"),
    imgsz: int = typer.Option(160, help="Training/inference size, pixels"),
    batch: int = typer.Option(16, help="Training batch (the product's TRAIN_BATCH; one optimizer step per batch)"),
    aggregation: str = typer.Option("max", help="Box uncertainties -> image: max | mean | sum"),
    candidates: int = typer.Option(3, help="diverse_*: k-center over the candidates*b most uncertain"),
    prefilter: int = typer.Option(10, help="cluster_*: k-means over the prefilter*b most uncertain"),
    pool_size: Optional[int] = typer.Option(None, help="Subsample the pool (default: all of it)"),
    test_size: Optional[int] = typer.Option(None, help="Subsample the test split (default: all of it)"),
    init: Path = typer.Option(REPO_ROOT / "models" / "faceloop-base.pt", help="Weights every round starts from"),
    config: str = typer.Option("awake_sleep", help="Label config (classes, score threshold)"),
    reference_map50: Optional[float] = typer.Option(None, help="Known full-pool mAP50 (skips the reference run)"),
    warm_start: bool = typer.Option(False, help="Fine-tune from the previous round's weights, not from --init"),
    out: Path = typer.Option(REPO_ROOT / "benchmarks" / "out" / "simulate", help="Output folder"),
    device: str = typer.Option("", help="'' = GPU if any"),
):
    """Active-learning simulation without Label Studio: the product's sampler and training on a
    labelled pool; writes rounds.csv, learning_curves.png and summary.md to OUT."""
    from ml_worker.simulate import SimConfig, run_simulation

    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    cfg = SimConfig(data=data, label_config=_config_path(config), init_weights=init,
                    strategies=tuple(s.strip() for s in strategies.split(",") if s.strip()),
                    seeds=seed_list, k=k, b=b, rounds=rounds,
                    epochs=epochs, imgsz=imgsz, train_batch=batch, aggregation=aggregation, candidates=candidates, prefilter=prefilter,
                    pool_size=pool_size, test_size=test_size, reference_map50=reference_map50, warm_start=warm_start,
                    device=device)
    try:
        cfg.check()
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:
        res = run_simulation(cfg, out, on_round=lambda r: console.print(
            f"{r['strategy']} s{r['seed']} r{r['round']}: {r['n_labelled']} labels mAP50 {r['mAP50']:.3f} "
            f"mAP50-95 {r['mAP50-95']:.3f} {r['seconds']:.0f}s{' (cached)' if r['cached'] else ''}", soft_wrap=True))
    except (FileNotFoundError, ValueError) as e:  # bad data set, k larger than the pool, ...
        console.print(f"[red]simulation stopped:[/] {e}")
        raise typer.Exit(2) from None
    console.print(res.files["summary_md"].read_text())
    for name, p in res.files.items():
        console.print(f"{name}: {p}")


@app.command("simulate-report")
def simulate_report(
    runs: list[Path] = typer.Argument(..., help="--out folders of `faceloop simulate` runs (e.g. one per seed)"),
    out: Path = typer.Option(REPO_ROOT / "benchmarks" / "out" / "simulate", help="Output folder"),
    reference: Optional[Path] = typer.Option(None, help="reference.json of a measured full-pool run"),
):
    """Merge simulations run in parallel (same settings, other seeds or strategies) into one
    rounds.csv, summary.md and learning_curves.png."""
    import json as _json

    from ml_worker.simulate import merge_runs

    absent = [str(r) for r in runs if not r.is_dir()]
    if absent:
        raise typer.BadParameter(f"no such folder: {', '.join(absent)}")
    if reference is not None and not reference.is_file():
        raise typer.BadParameter(f"no reference file at {reference}")
    try:
        ref = _json.loads(reference.read_text()) if reference else None
        if ref is not None and "mAP50" not in ref:
            raise ValueError(f"{reference} has no mAP50 (expected a simulation's reference.json)")
        files = merge_runs(runs, out, ref)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    console.print(files["summary_md"].read_text())
    for name, p in files.items():
        console.print(f"{name}: {p}")


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="Model version: a two-stage bundle (.json) or YOLO weights (.pt)"),
    data: Path = typer.Argument(..., help="Labelled YOLO folder (images/, labels/, data.yaml)"),
    split: str = typer.Option("val", help="Split to evaluate on"),
    limit: Optional[int] = typer.Option(None, help="At most this many images (spread over the split)"),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON"),
):
    """Score any model on a labelled folder through the product's prediction path: mAP50,
    face mAP50, class accuracy of found faces, and what a person would accept, fix or delete."""
    import json as _json

    from ml_worker.bench import evaluate_folder

    if not model.is_file():
        raise typer.BadParameter(f"no model file at {model}")
    try:
        r = evaluate_folder(model, data, split, get_settings(), limit)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]cannot evaluate:[/] {e}")
        raise typer.Exit(1) from None
    if as_json:
        print(_json.dumps(r, indent=2))
        return
    t = Table(title=f"{model.name} on {data.name}/{split} ({r['images']} images, {r['faces']} faces)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k in ("mAP50", "face_mAP50", "class_accuracy", "acceptance_rate", "accepted", "class_fixed", "box_fixed",
              "missed", "false_boxes", "edits_per_image", "boxes_per_face", "recall_iou30", "false_boxes_per_image"):
        v = r[k]
        t.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(t)


@app.command("bench-accept")
def bench_accept_cmd(
    data: Path = typer.Option(REPO_ROOT.parent / "shared" / "data" / "awake_sleep",
                              help="YOLO folder: pool = train split, test = val split (unseen people)"),
    sizes: str = typer.Option("0,20,40,80", help="Comma-separated numbers of labelled images"),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds"),
    strategies: str = typer.Option("sampler,random", help="sampler (QUERY_STRATEGY) and/or random"),
    test_limit: Optional[int] = typer.Option(None, help="Evaluate on at most this many test images"),
    out: Path = typer.Option(REPO_ROOT / "benchmarks" / "out" / "bench_accept", help="Output folder"),
    reference: bool = typer.Option(False, "--reference", help="Also retrain once on every pool image (first seed): "
                                   "the reference of labels-to-95%; kept in OUT/reference.json"),
    query_batch: int = typer.Option(0, help="The sampler picks this many per round (the product's QUERY_BATCH_SIZE) "
                                    "and the person labels the first (size step) of them, as Label Studio serves the "
                                    "batch in pick order; 0 = picks exactly the size step"),
):
    """Simulate a person: label N images (picked by the sampler, or at random), retrain through the
    worker's code, pre-annotate the held-out images, and count what the person accepts, fixes,
    draws and deletes. Writes rounds.csv, summary.json, acceptance.png, labels_to_target.{json,md}
    (labels to reach 95% of the full-pool reference, or of the best size without one) and each
    round's model. `--sizes ""` with `--reference` only adds the reference to an existing run."""
    from ml_worker.bench import bench_accept, bench_reference, bench_report

    try:
        size_list = [int(x) for x in sizes.split(",") if x.strip()]
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter("--sizes and --seeds are comma-separated integers") from None
    strat = tuple(x.strip() for x in strategies.split(",") if x.strip())
    if not set(strat) <= {"sampler", "random"} or not strat:
        raise typer.BadParameter("--strategies: sampler and/or random")
    if any(n < 0 for n in size_list):
        raise typer.BadParameter("--sizes must be >= 0")
    if query_batch < 0:
        raise typer.BadParameter("--query-batch must be >= 0")
    if not size_list and not reference:
        raise typer.BadParameter("--sizes is empty (give sizes, or --reference to add the reference only)")
    if not seed_list:
        raise typer.BadParameter("--seeds is empty")
    if reference:
        try:
            ref = bench_reference(data, out, get_settings(), seed=seed_list[0], test_limit=test_limit)
        except (FileNotFoundError, ValueError) as e:
            console.print(f"[red]benchmark stopped:[/] {e}")
            raise typer.Exit(1) from None
        console.print(f"reference ({ref['labels']} labels, seed {ref['seed']}): acceptance {ref['acceptance_rate']:.3f}, "
                      f"mAP50 {ref['mAP50']:.3f}, class acc. {ref['class_accuracy']:.3f}, train {ref['train_seconds']:.0f} s")
        if not size_list:
            if (out / "rounds.csv").is_file():
                for name, p in bench_report(out).items():
                    console.print(f"{name}: {p}")
                console.print((out / "labels_to_target.md").read_text(), soft_wrap=True)
            return
    try:
        res = bench_accept(data, size_list, seed_list, out, get_settings(), strategies=strat, test_limit=test_limit,
                           query_batch=query_batch,
                           on_row=lambda r: console.print(
                               f"{r['strategy']} seed {r['seed']} {r['labels']} labels: acceptance "
                               f"{r['acceptance_rate']:.3f}, edits/image {r['edits_per_image']:.2f}, mAP50 "
                               f"{r['mAP50']:.3f}, class acc. {r['class_accuracy']:.3f}, boxes/face "
                               f"{r['boxes_per_face']:.2f}, train {r['train_seconds']:.0f} s", soft_wrap=True))
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]benchmark stopped:[/] {e}")
        raise typer.Exit(1) from None
    for name, p in res["files"].items():
        console.print(f"{name}: {p}")
    console.print(res["files"]["labels_to_target_md"].read_text(), soft_wrap=True)


@app.command("bench-report")
def bench_report_cmd(
    out: Path = typer.Argument(..., help="A `faceloop bench-accept` output folder (rounds.csv, reference.json)"),
):
    """Rewrite a bench-accept folder's report (summary.json, acceptance.png, labels_to_target.{json,md})
    from its rounds.csv, with its reference.json when present."""
    from ml_worker.bench import bench_report

    try:
        files = bench_report(out)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]cannot report:[/] {e}")
        raise typer.Exit(1) from None
    console.print(files["labels_to_target_md"].read_text(), soft_wrap=True)
    for name, p in files.items():
        console.print(f"{name}: {p}")


def _one_line_summaries() -> None:
    """`faceloop --help` lists each command with the first paragraph of its docstring; typer's rich
    mode keeps that paragraph's line breaks, which at 80 columns cut sentences mid-line. Give each
    command that paragraph as one line (its ``short_help``), which rich then wraps to the terminal."""
    import inspect

    for info in app.registered_commands:
        if info.short_help is None and info.help is None and info.callback is not None and info.callback.__doc__:
            info.short_help = " ".join(inspect.cleandoc(info.callback.__doc__).split("\n\n")[0].split())


_one_line_summaries()


if __name__ == "__main__":  # pragma: no cover
    app()
