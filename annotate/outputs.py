"""One run per output folder: an OS lock that dies with its process, and one line for bad ground.

Every command that writes an output folder (`refine-data annotate|merge|push|card|import-ecot|export`,
`refine-train`, `refine-eval run`) holds `OUT/.refine/lock` while it writes. The lock is
`fcntl.flock`, so the kernel releases it when the process ends however it ends (`kill -9`, a lost
machine's processes, a crash): a rerun is never blocked by a stale lock, and a second run while the
first lives is refused in one line that names the holder (pid, host, since when, command).

Shards of one `--shard i/n` run share an OUT: each holds its own `OUT/.refine/lock-0000i-of-0000n`
exclusively and the folder's lock *shared*, so shards run side by side while `merge` and `push`
(which take the folder's lock exclusively) wait for none of them and interleave with none.

On network filesystems the lock is only as good as the server's lock manager: Linux maps `flock`
to NFS byte-range locks (NFSv4, or v3 with lockd), which hold across machines; where the server
refuses locks (ENOLCK / EOPNOTSUPP) the run goes on unlocked with a warning, and on a filesystem
known to be shared the run says so, since a shard given to two machines is then the user's to avoid.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..schemas.dataset_layout import PRIVATE_DIR
from .errors import RefineError, causes

LOCK_DIR = PRIVATE_DIR  # never uploaded; the annotate store and rejects live here too
LOCK_NAME = "lock"
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "lustre", "gpfs", "beegfs", "ceph")

_held: list[Path] = []  # the output folders this process holds, newest last (named by disk-full messages)


class OutputBusy(RefineError):
    """Another live process holds the output folder."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: written into the lock file by its holder, read by the refused run."""

    pid: int
    host: str
    since: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since} ({self.command})"


def prepare_output(out: Path, flag: str = "--out") -> Path:
    """Make sure `out` is (or can become) a writable folder; one line naming it if not."""
    if out.exists() and not out.is_dir():
        raise RefineError(f"{flag} {out}: is a file, not a folder; give a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RefineError(f"{flag} {out}: a parent of it is a file, not a folder") from None
    except NotADirectoryError:
        raise RefineError(f"{flag} {out}: a parent of it is a file, not a folder") from None
    except PermissionError:
        raise RefineError(f"{flag} {out}: cannot create it (permission denied)") from None
    except OSError as exc:
        if is_disk_full(exc):
            raise RefineError(disk_full_message(exc, out)) from None
        raise RefineError(f"{flag} {out}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RefineError(f"{flag} {out}: not writable by this user")
    return out


def held_outputs() -> list[Path]:
    """The output folders this process holds now (newest last)."""
    return list(_held)


@contextlib.contextmanager
def hold_output(out: Path, command: str, *, part: str | None = None, flag: str = "--out") -> Iterator[Path]:
    """Hold `out` for as long as the block runs; refuse (`OutputBusy`) if a live process holds it.

    `part` (e.g. "-00003-of-00008"): this run writes one part of a folder that other parts share
    (annotate shards): the part is held exclusively, the folder shared.
    """
    prepare_output(out, flag)
    lock_dir = out / LOCK_DIR
    try:
        lock_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise RefineError(f"{flag} {out}: cannot create {lock_dir} ({exc.strerror or exc})") from None
    warn_if_network_filesystem(out)
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(_flock(lock_dir / LOCK_NAME, shared=part is not None, out=out, flag=flag))
        if part is None:
            _write_holder(folder, command)
        else:
            handle = stack.enter_context(_flock(lock_dir / f"{LOCK_NAME}{part}", shared=False, out=out, flag=flag))
            _write_holder(handle, command)
        _held.append(out)
        try:
            yield out
        except Exception as exc:
            if is_disk_full(exc):  # named here, while we know which output it was
                raise RefineError(disk_full_message(exc, out)) from exc
            raise
        finally:
            _held.remove(out)


@contextlib.contextmanager
def _flock(path: Path, *, shared: bool, out: Path, flag: str) -> Iterator[IO[str] | None]:
    import fcntl

    handle = path.open("a+", encoding="utf-8")
    _lock_files.append(handle)
    try:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusy(_busy_message(path, out, flag)) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(
                f"warning: {out}: this filesystem refuses file locks ({exc.strerror}); running unlocked: "
                "make sure no other run writes here",
                file=sys.stderr,
            )
            yield None
            return
        yield handle
    finally:
        _lock_files.remove(handle)
        handle.close()  # releases the lock (so does the process's death)


_lock_files: list[IO[str]] = []  # the lock files this process holds open


def _drop_inherited_locks() -> None:
    """In a child forked from a holder (`annotate --processes` workers): close its copies of the lock files.

    A flock belongs to the open file, which a forked child shares; the kernel releases it when the last
    copy is closed. Without this, a holder killed with `kill -9` would leave its lock held by its workers
    until they noticed and exited, refusing the rerun meanwhile. The workers never lock or unlock.
    """
    if not _lock_files:
        return
    # /dev/null takes each lock file's descriptor number: the child's copy of the open file (and so of the lock)
    # is dropped, while the file object the child inherited still owns a valid descriptor, so its eventual
    # close neither fails nor closes a descriptor number reused by something else.
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        for handle in _lock_files:
            with contextlib.suppress(OSError, ValueError):
                os.dup2(null, handle.fileno())
    finally:
        os.close(null)
    _lock_files.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _write_holder(handle: IO[str] | None, command: str) -> None:
    if handle is None:
        return
    holder = Holder(
        pid=os.getpid(),
        host=socket.gethostname(),
        since=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        command=command,
    )
    with contextlib.suppress(OSError):  # who holds it is a courtesy; the lock is what protects
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder.__dict__) + "\n")
        handle.flush()


def read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Holder(int(data["pid"]), str(data["host"]), str(data["since"]), str(data["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_held(path: Path) -> bool:
    import fcntl

    try:
        with path.open("a", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
    except OSError:
        return False


def _busy_message(path: Path, out: Path, flag: str) -> str:
    holders = [read_holder(path)]
    if path.name == LOCK_NAME:  # held shared by shards: name the live ones
        holders += [read_holder(part) for part in sorted(path.parent.glob(f"{LOCK_NAME}-*")) if _is_held(part)]
    named = "; ".join(h.describe() for h in holders if h is not None) or "another process"
    return (
        f"{flag} {out} is in use by {named}. One run writes an output at a time: wait for it to finish "
        f"(or stop it), or give another {flag}. A killed run releases it at once; its rerun continues."
    )


def warn_if_network_filesystem(out: Path) -> None:
    fstype = filesystem_type(out)
    if fstype is not None and fstype.lower().startswith(NETWORK_FILESYSTEMS):
        print(
            f"warning: {out} is on {fstype}: its lock holds across machines only where the server's lock manager "
            "works (NFSv4, or v3 with lockd); give each machine its own --shard",
            file=sys.stderr,
        )


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path` (Linux: the longest mount point in /proc/mounts)."""
    try:
        mounts = Path("/proc/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    real = str(path.resolve())
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


# --------------------------------------------------------------------------- full disks


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a full disk or quota: ENOSPC, EDQUOT, SQLite's SQLITE_FULL,
    and the libraries that report it in words only (pyarrow, safetensors, torch.save)."""
    for current in causes(exc):
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(current, sqlite3.OperationalError) and (
            getattr(current, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(current)
        ):
            return True
        text = str(current)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
    return False


def disk_full_message(exc: BaseException, path: Path | None = None) -> str:
    """One line: which path, how much room is left, and that the rerun loses nothing."""
    where = _filename(exc) or path or (_held[-1] if _held else None)
    room = ""
    if where is not None:
        probe = Path(where)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        with contextlib.suppress(OSError):
            usage = shutil.disk_usage(probe)
            room = f" ({_size(usage.free)} free of {_size(usage.total)})"
    named = f"writing {where}" if where is not None else "writing the output"
    return (
        f"disk full {named}{room}. Free space (or give an output on another disk) and run the same command "
        "again: everything finished is kept, and nothing half-written is used"
    )


def _filename(exc: BaseException) -> Path | None:
    for current in causes(exc):
        if isinstance(current, OSError) and current.filename:
            return Path(os.fsdecode(current.filename))
    return None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
