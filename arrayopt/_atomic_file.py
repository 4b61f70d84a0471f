"""Write a file atomically: a private temporary file in the target's folder, renamed over it.

``atomic_write(path, write)`` creates ``.<name>.arrayopt-tmp-<pid>-<random>`` next to
``path`` with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode ``0o600`` (so a symlink or any
existing file at that name is never followed or overwritten), lets ``write(f)`` fill it,
gives it the mode a plain ``open(path, "wb")`` would (``0o666 & ~umask``), ``fsync``\\ s it,
``os.replace``\\ s it onto ``path`` and ``fsync``\\ s the folder. Two writers to one path
each use their own temporary file, so ``path`` always holds one whole file and the last
rename wins. On any failure the temporary file is removed and the old ``path`` is untouched.

A writer killed mid-write leaves its temporary file behind; the next write to the same
path removes such leftovers, and only those: a name of exactly our pattern for this
``path``, a regular file owned by this user, empty or starting with a zip signature
(what the writers here produce), whose writing process no longer exists.
"""

from __future__ import annotations

import os
import re
import secrets
from typing import Callable

__all__ = ["atomic_write", "temp_name_pattern", "remove_stale_temps"]

_TAG = ".arrayopt-tmp-"
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a member, or an empty archive


def temp_name_pattern(name: str) -> re.Pattern:
    """The names of our temporary files for the target file name ``name``."""
    return re.compile(rf"\.{re.escape(name)}{re.escape(_TAG)}(\d+)-([0-9a-f]{{16}})")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # exists (another user's), or cannot tell: keep the file
    return True


def _is_our_leftover(full: str) -> bool:
    import stat

    try:
        st = os.lstat(full)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
        return False
    if st.st_size == 0:
        return True
    try:
        fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        head = os.read(fd, 4)
    finally:
        os.close(fd)
    return head in _ZIP_SIGNATURES


def remove_stale_temps(path) -> list:
    """Remove the temporary files of dead writers to ``path`` (see the module doc); return their names."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    pattern = temp_name_pattern(name)
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        full = os.path.join(folder, entry)
        if _is_our_leftover(full):
            try:
                os.remove(full)
                removed.append(entry)
            except OSError:  # another writer removed it first, or no permission: leave it
                pass
    return removed


def _default_mode() -> int:
    """``0o666 & ~umask``, read without changing the process umask where the OS allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def _fsync_folder(folder: str) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:  # e.g. Windows, where folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable) -> None:
    """Call ``write(f)`` on a fresh private temporary file, then rename it onto ``path``."""
    target = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(target))
    remove_stale_temps(target)
    tmp = os.path.join(folder, f".{name}{_TAG}{os.getpid()}-{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | \
        getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _default_mode())
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)
