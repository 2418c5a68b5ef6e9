"""Atomic, durable file writes and the pack directory lock (shared by compiler and runtime).

A file is written to ``.tmp-<pid>-<name>`` in its directory, fsynced, renamed over its final
name and the directory fsynced: readers see the old file or the complete new one, never a part.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"


def tmp_path(path: Path) -> Path:
    """The temporary name `path` is written under before its atomic rename."""
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


@dataclass
class AtomicTarget:
    tmp: Path  # write here
    final: Path  # renamed to this on success (the body may change it, e.g. to a content hash)


@contextmanager
def atomic_file(path: Path):
    """Yield an `AtomicTarget` for `path`; when the body succeeds, fsync the temporary file,
    rename it to ``target.final`` and fsync the directory; when it fails, remove it."""
    target = AtomicTarget(tmp=tmp_path(Path(path)), final=Path(path))
    try:
        yield target
        fsync_file(target.tmp)
        os.replace(target.tmp, target.final)
    finally:
        if target.tmp.exists():
            target.tmp.unlink()
    fsync_dir(target.final.parent)


@contextmanager
def h5_image(target: Path):
    """Yield a writable in-memory HDF5 file (earliest format, no order tracking, so equal data gives
    equal bytes); when the body succeeds, write its image to `target` with plain file I/O.

    A full disk is then an ordinary OSError from `write_bytes`, never a failed flush inside HDF5
    (which prints 'Exception ignored' tracebacks and can leave a broken handle that crashes at exit).
    """
    import h5py

    f = h5py.File(Path(target).name, "w", libver="earliest", track_order=False, driver="core",
                  backing_store=False)
    try:
        yield f
        f.flush()
        image = f.id.get_file_image()
    finally:
        f.close()
    Path(target).write_bytes(image)


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON (sorted keys, 2-space indent, trailing newline) atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_file(path) as t:
        t.tmp.write_text(text, encoding="utf-8")


@contextmanager
def pack_lock(directory: Path, error_cls, what: str):
    """Hold an exclusive non-blocking flock on ``directory/.lock``; raise error_cls(message) if taken."""
    lock_path = Path(directory) / LOCK_NAME
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error_cls(f"{directory}: {what} (lock {lock_path} is held)") from None
        yield
    finally:
        os.close(fd)
