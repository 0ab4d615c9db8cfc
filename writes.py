"""Writes that cannot corrupt and reads that survive a torn one: atomic file replacement, whole-line appends,
JSON-lines that drop a torn last line, and every full disk, read-only file system or denied permission met while
writing turned into one line naming the folder (with the space needed and free)."""
import contextlib
import errno
import json
import os
import shutil
import sys
from pathlib import Path

from labels import UserError

# OSErrors a user fixes (space, mounts, permissions), as the words of their one line; any other errno is a bug.
WRITE_ERRORS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def size_text(nbytes):
    """A size for a person: GiB from 1 GiB up, then MiB, KiB below 1 MiB (a 40 MB preload must not read
    "0.00 GiB")."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KiB"


def free_bytes(folder):
    """Bytes free to this user in folder's file system (the nearest existing folder above it)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def write_error(path, exc, needed=None, fix=None):
    """The one-line UserError for an OSError met writing path (full disk with the space needed and free,
    read-only file system, permission denied), naming the folder; None for any other error."""
    what = WRITE_ERRORS.get(getattr(exc, "errno", None))
    if what is None:
        return None
    path = Path(path)
    if exc.errno in FULL:
        space = f"needs {size_text(needed)}, " if needed else ""
        return UserError(f"{path.parent}: {what} writing {path.name} ({space}{size_text(free_bytes(path.parent))} "
                         f"free); {fix or 'free space and run again'}")
    return UserError(f"{path.parent}: {what} writing {path.name}; "
                     f"{fix or 'make the folder writable or pass another one'}")


def _unlink_quietly(path):
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def atomic_write(path, write, needed=None, fix=None):
    """write(temporary path) then rename over path, so a kill mid-write leaves the previous file intact; a full
    disk, read-only file system or denied permission is a UserError (see write_error; needed: bytes the
    file needs, for the message).

    The temporary name carries this process's id (see remove_stale_temporaries); whatever stands there is
    removed first, so a planted symlink is never written through, and rename replaces a link at path itself.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        error = write_error(path, exc, needed, fix)
        if error is None:
            raise
        raise error from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def append_line(path, line, fix=None):
    """Appends one line whole: a single os.write on an O_APPEND descriptor, then fsync. A write the disk cut
    short is truncated back, so a full disk never leaves half a line (a kill mid-write still could: read_jsonl
    drops a torn last line)."""
    payload = (line.rstrip("\n") + "\n").encode()
    fd = None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        start = os.fstat(fd).st_size
        try:
            if os.write(fd, payload) != len(payload):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    except OSError as exc:
        error = write_error(path, exc, len(payload), fix)
        if error is None:
            raise
        raise error from None
    finally:
        if fd is not None:
            os.close(fd)


def read_jsonl(path):
    """The records of a JSON-lines file. A torn last line (a write cut short by a kill or an older full-disk
    failure) is dropped with a note on stderr; a broken line before it is a UserError naming its number."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({getattr(exc, 'strerror', None) or exc}); restore it or start a "
                        "fresh run folder") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if any(rest.strip() for rest in lines[number:]):
                raise UserError(f"{path}: line {number} is not JSON; restore the file or remove that line") from None
            print(f"note: {path}: dropped its torn last line {number} ({len(line)} characters, a write cut short)",
                  file=sys.stderr, flush=True)
    return records


def remove_stale_temporaries(folder):
    """Removes atomic_write's temporary files in folder whose writing process is gone (killed mid-write)."""
    for tmp in Path(folder).glob(".*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            tmp.unlink(missing_ok=True)
