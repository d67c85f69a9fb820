"""What the dashboard's tabs share: the checks on what a form sends, the families a page can pick, and the
one path that turns a handler's error into what the page shows.

Handlers (in `app.launch`, `app.jobs`, `app.compare`, `app.chat`) are plain functions of
(services, inputs) -> outputs that return data and raise the library's error (`BoomerangError`) when a
user must fix something. `bind` wires one to an event: with `refused="Not launched"` the error becomes the
one-line message "**Not launched:** ..." in the event's message output; without, a short pop-up. Any
other exception is a one-line "went wrong" with the details in the server log, never a traceback in
the browser.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from pathlib import Path

import gradio as gr
from sqlmodel import Session

from boomerang.errors import BoomerangError, excerpt
from boomerang.models import loads_quickly
from db import crud
from db.models import Student

log = logging.getLogger("boomerang.app")

USER_ERRORS = (BoomerangError, ValueError, TypeError, LookupError)
"""What a user's input can raise (the library's error, a number that is not one, a job id that is not there)."""
MESSAGE_CHARS = 400
"""At most this much of an error reaches the page: a 200,000-character input is not echoed back."""

MAX_TEXT = 4096
"""Characters a form's text field may hold (a path, a layer list, a task list); longer is refused unread."""
MAX_MESSAGE = 20_000
"""Characters of one chat message."""
CUT = "cut:"
"""A chat family value "cut:SOURCE": the teacher's undistilled family, chattable before any distillation."""


# ----------------------------------------------------------------------------- errors to the page


def error_text(exc: Exception) -> str:
    return excerpt(str(exc), MESSAGE_CHARS).strip("'\"")


def _short(exc: Exception) -> gr.Error:
    if isinstance(exc, USER_ERRORS):
        return gr.Error(error_text(exc), print_exception=False)
    log.exception("dashboard handler failed")
    return gr.Error(f"Something went wrong ({type(exc).__name__}); the server log has the details.",
                    print_exception=False)


def safe(fn):
    """`fn` for an event: a user's error becomes a short pop-up, anything else a one-line 'went wrong'."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args):
            try:
                yield from fn(*args)
            except gr.Error:
                raise
            except Exception as exc:
                raise _short(exc) from None
        return stream

    @functools.wraps(fn)
    def call(*args):
        try:
            return fn(*args)
        except gr.Error:
            raise
        except Exception as exc:
            raise _short(exc) from None
    return call


def reported(fn, refused: str, blank: tuple = ()):
    """`fn` whose user errors come back as the message "**{refused}:** {error}" (then `blank` for the event's
    other outputs) instead of being raised."""
    @functools.wraps(fn)
    def call(*args):
        try:
            return fn(*args)
        except USER_ERRORS as exc:
            text = f"**{refused}:** {error_text(exc)}"
            return (text, *blank) if blank else text
    return call


def bind(handler, services, *, refused: str | None = None, blank: tuple = ()):
    """A handler with its services bound, made safe for the browser (see the module's docstring)."""
    fn = functools.partial(handler, services)
    return safe(reported(fn, refused, blank) if refused else fn)


# ----------------------------------------------------------------------------- checks on what a form sends


def check_text(name: str, value, limit: int = MAX_TEXT) -> None:
    if isinstance(value, str) and len(value) > limit:
        raise BoomerangError(f"{name} is too long ({len(value):,} characters, at most {limit:,}): {excerpt(value, 40)}")


def check_path(services, what: str, path: str) -> None:
    """Refuse a server path outside the dashboard's allowed folders, before anything is looked up on disk."""
    check_text(what, path)
    if not services.path_allowed(path):
        roots = ", ".join(str(r) for r in services.roots())
        raise BoomerangError(f"{what} must be inside a folder this dashboard may read ({roots}); "
                             "start it with --allow-path DIR to add one")


def teacher_is_path(teacher: str) -> bool:
    """Whether a teacher string names a local path (not the default, not a hub id such as org/name)."""
    return teacher != "default" and not re.fullmatch(r"[\w.-]+/[\w.-]+", teacher) or teacher.startswith((".", "/", "~"))


def check_sources(services, teacher: str | None, data: str | None = None) -> None:
    if teacher and teacher_is_path(teacher):
        check_path(services, "the teacher folder", teacher)
    if data and data != "teacher" and not data.startswith("hub:"):
        check_path(services, "the training data", data)


def quick_to_load(source: str) -> bool:
    """models.loads_quickly, with a source that cannot be loaded at all counted as not quick."""
    try:
        return loads_quickly(source)
    except BoomerangError:
        return False


# ----------------------------------------------------------------------------- families a page can pick


def teacher_choices(services) -> list[str]:
    with Session(services.engine) as s:
        used = [t.source for t in crud.list_teachers(session=s)]
    return ["default", *[u for u in used if u != "default"]]


def family_choices(services) -> list[tuple[str, str]]:
    with Session(services.engine) as s:
        students = crud.list_students(session=s)
    return [(f"#{st.id} {Path(st.folder).parent.name}/{Path(st.folder).name} "
             f"({st.manifest.get('teacher', {}).get('source', '?')})", str(st.id)) for st in students]


def student_folder(services, student_id) -> str | None:
    """The folder of a distilled family (a student row's id); None for none picked or an undistilled family."""
    if not student_id or not str(student_id).isdigit():
        return None
    with Session(services.engine) as s:
        st = s.get(Student, int(student_id))
    return st.folder if st else None


def patched_text(n: int) -> str:
    return f"{n} block{'' if n == 1 else 's'} patched"
