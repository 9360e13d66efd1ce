"""Atomic writes of files and folders: whatever instant a kill or a power cut strikes, a reader (or a resumed run)
finds the old version or the new one whole.

A file is written under a temporary name beside it, fsynced and renamed over the old one. A folder is written
complete into a temporary folder beside it (`staging_folder`), fsynced, and swapped in (`replace_folder`): on Linux
in one step with renameat2(RENAME_EXCHANGE); elsewhere in three renames (the complete folder becomes `.NAME.new-*`,
the old one `.NAME.old-*`, the new one NAME), where a kill between the second and the third leaves NAME missing but
a whole `.NAME.new-*`. `recover_folder` (run by the next save) puts that one back and removes what killed writes
left behind. Only a complete folder ever carries a `.new-` name; `.tmp-` and `.old-` folders are never put back.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["write_file", "write_text", "fsync_tree", "staging_folder", "replace_folder", "remove_folder",
           "recover_folder", "recover_all", "exchange"]

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|new|old)-[A-Za-z0-9_]+$")
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a folder's entries (new names, renames) durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under `folder`, so that a rename publishing it publishes its bytes too."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)


def write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write `path` atomically: `write(tmp)` fills a temporary file beside it, which is fsynced and renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically (see `write_file`)."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def staging_folder(dst: str | os.PathLike) -> Path:
    """A new empty folder `.NAME.tmp-*` beside `dst`, to fill and then `replace_folder` into place."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (old glibc, musl)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where the system or
    the file system cannot, and the caller falls back to renames."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _sibling(dst: Path, kind: str) -> Path:
    return dst.with_name(f".{dst.name}.{kind}-{uuid.uuid4().hex[:12]}")


def replace_folder(tmp: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Put the complete folder `tmp` (beside `dst`, on its file system) in place of `dst`, so that `dst` is at every
    instant the old folder or the new one, whole (or missing with a whole `.NAME.new-*` that `recover_folder`
    puts back, where renameat2 is not available). The old folder is removed."""
    tmp, dst = Path(tmp), Path(dst)
    fsync_tree(tmp)
    if dst.exists() and exchange(tmp, dst):  # dst is the new folder; tmp holds the old one
        fsync_dir(dst.parent)
        shutil.rmtree(tmp)
        return dst
    new, old = _sibling(dst, "new"), _sibling(dst, "old")
    os.rename(tmp, new)  # complete and durable: from here on it may be put back
    fsync_dir(dst.parent)
    had_old = dst.exists()
    if had_old:
        os.rename(dst, old)  # dst is missing until the next rename
    os.rename(new, dst)
    fsync_dir(dst.parent)
    if had_old:
        shutil.rmtree(old)
    return dst


def _leftovers(parent: Path) -> list[tuple[str, str, Path]]:
    """(folder name, kind, path) of every `.NAME.{tmp,new,old}-*` in `parent`."""
    if not parent.is_dir():
        return []
    return [(m["name"], m["kind"], p) for p in parent.iterdir() if (m := _LEFTOVER.match(p.name))]


def remove_folder(path: str | os.PathLike) -> None:
    """Remove a folder (or a leftover of one) so that a kill midway never leaves a part of it under a name that
    counts: it is renamed `.NAME.tmp-*` first (a `.new-` leftover thus stops being one), which `recover_folder`
    removes if the kill comes before the deletion ends."""
    path = Path(path)
    if not path.is_dir():
        path.unlink(missing_ok=True)
        return
    m = _LEFTOVER.match(path.name)
    doomed = path if m and m["kind"] == "tmp" else _sibling(path.parent / (m["name"] if m else path.name), "tmp")
    if doomed != path:
        os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def recover_folder(dst: str | os.PathLike) -> bool:
    """After a kill: put `dst` back from a whole `.NAME.new-*` when a swap left it missing, then remove every
    leftover of killed writes and swaps of `dst`. True when `dst` was put back."""
    dst = Path(dst)
    mine = [(kind, p) for name, kind, p in _leftovers(dst.parent) if name == dst.name]
    restored = False
    if not dst.exists():
        new = sorted((p for kind, p in mine if kind == "new"), key=lambda p: p.stat().st_mtime)
        if new:
            os.rename(new[-1], dst)
            fsync_dir(dst.parent)
            restored = True
    for _, p in mine:
        if p.exists() or p.is_symlink():
            remove_folder(p)
    return restored


def recover_all(parent: str | os.PathLike) -> None:
    """`recover_folder` for every folder in `parent` that killed writes or swaps left leftovers of."""
    for name in sorted({name for name, _, _ in _leftovers(Path(parent))}):
        recover_folder(Path(parent) / name)
