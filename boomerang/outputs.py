"""Safe output folders: never write outside the folder asked for, never overwrite silently.

Every folder the library writes (students, exported sizes) is built in a hidden temporary sibling
and moved into place in one rename, so a crash or a bad input never leaves a half-written folder
and never damages the one that was there before.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from boomerang.errors import BoomerangError

# Files that mark a folder as one of ours (or a model folder) that may be replaced with --overwrite.
_REPLACEABLE_MARKERS = ("boomerang.json", "config.json")


def check_output_dir(out: str | Path, *, overwrite: bool = False) -> Path:
    """Validate an output folder path and return it resolved; raise a `BoomerangError` otherwise."""
    if not str(out).strip():
        raise BoomerangError("no output folder given")
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise BoomerangError(f"{path} exists and is a file; give a folder path for --out")
    if path == Path(path.anchor) or path == Path.home().resolve():
        raise BoomerangError(f"refusing to write a model into {path}; give a dedicated folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise BoomerangError(f"{path} already exists and is not empty; choose another folder or pass --overwrite")
        if not any((path / m).is_file() for m in _REPLACEABLE_MARKERS):
            raise BoomerangError(
                f"{path} is not empty and does not hold a model (no config.json): refusing to replace it "
                "even with --overwrite"
            )
    if not path.parent.is_dir():
        raise BoomerangError(f"the parent folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise BoomerangError(f"cannot write in {path.parent}: permission denied")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_dir_atomically(out: str | Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Run `write(tmp)` into a fresh temporary sibling of `out`, then move it into place."""
    path = check_output_dir(out, overwrite=overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as exc:
        raise BoomerangError(f"cannot write in {path.parent}: {exc.strerror}") from None
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a model folder is as readable as any other
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
