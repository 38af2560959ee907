"""Atomic writes: every file or folder vitkit writes goes through here.

A writer works on a hidden temporary next to the target (same directory, so the final ``os.replace`` is a
rename on one file system) and moves it into place only after everything was written: an interrupted run
leaves either the old target or nothing, never half a file. A killed process may leave its temporary
behind (``.NAME.tmp-HOST-PID-XXXXXXXX``); the next write of ``NAME`` on that host deletes it once that
process is gone (:func:`temp_path`). A folder cannot be renamed over a non-empty one, so replacing an existing
folder takes two renames (old -> backup, new -> target); the target is missing only between them.

::

    with atomic_path("peaks.csv") as tmp:      # any writer that takes a path
        write_my_file(tmp)
    write_text("metrics.json", text)           # the common cases
    tmp = temp_path(target); ...; commit(tmp, target)   # a temporary that outlives one block (stream writer)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "commit", "discard", "temp_path", "write_bytes", "write_json", "write_text"]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def _tmp_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh hidden temporary ``.NAME.tmp-HOST-PID-XXXXXXXX`` next to ``path`` (to be renamed onto it), after
    deleting the temporaries of ``path`` that killed processes left behind.

    Only entries named for ``path`` by a process on this host that no longer runs are deleted (a temporary of
    another host, e.g. on a shared file system, or of a running process is never touched), so re-running an
    interrupted command cleans up after the killed run instead of piling up its partial files.
    """
    path = Path(path)
    stale = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}$")
    if path.parent.is_dir():
        for e in os.scandir(path.parent):
            m = stale.match(e.name)
            if m and m.group("host") == _host() and int(m.group("pid")) != os.getpid() \
                    and not _running(int(m.group("pid"))):
                discard(Path(e.path))
    return _tmp_name(path)


def discard(p: str | os.PathLike) -> None:
    """Delete a temporary file or folder (nothing happens when it is not there)."""
    p = Path(p)
    if p.is_dir() and not p.is_symlink():
        for wait in (0.0, 0.05, 0.2, 1.0):  # a writer's worker threads (zarr's I/O loop) may still be
            time.sleep(wait)                 # finishing files in it after the error that brought us here
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                break
    else:
        p.unlink(missing_ok=True)


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the finished temporary ``tmp`` onto ``path``: a file is synced to disk and renamed; a folder
    replaces an existing one through a backup that is deleted afterwards (restored if the second rename fails)."""
    tmp, path = Path(tmp), Path(path)
    if not tmp.is_dir():
        _fsync(tmp)
        os.replace(tmp, path)
    elif not path.exists() and not path.is_symlink():
        os.replace(tmp, path)
    else:  # a folder cannot be renamed over a non-empty one: old -> backup, new -> target, drop backup
        backup = _tmp_name(path, "old")
        os.replace(path, backup)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(backup, path)
            raise
        discard(backup)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds (else delete
    it). The block may write a file or a folder (e.g. a zarr store) there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (with a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")
